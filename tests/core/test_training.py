"""lora_core.training alone: a toy attention denoiser learns a hidden teacher LoRA."""
import pytest
import torch
import torch.nn.functional as F

from autograd_probe import saved_tensor_bytes
from lora_core.errors import LoRAError
from lora_core.training import (
    CheckpointedForward,
    LoRATrainLayer,
    Sample,
    TrainForward,
    TrainHooks,
    TrainingDiverged,
    TrainSettings,
    bucket_sizes,
    fit_image,
    lr_factor,
    nearest_bucket,
    select_targets,
    simple_noise_model,
    train,
)
from lora_core.training.objective import EPS, FLOW


class ToyDenoiser(torch.nn.Module):
    """Tokens attend to a text context through to_q/to_k/to_v/to_out linears, like a UNet block."""

    def __init__(self, dim=16, ctx=8, depth=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            shapes = {"to_q": (dim, dim), "to_k": (dim, ctx), "to_v": (dim, ctx), "to_out": (dim, dim)}
            for name, (o, i) in shapes.items():
                lin = torch.nn.Linear(i, o, bias=False)
                lin.weight.data = torch.randn(o, i, generator=g) / i ** 0.5
                setattr(block, name, lin)
            self.blocks.append(block)
        self.requires_grad_(False)

    def forward(self, x_t, sigma, cond):
        b, c, h, w = x_t.shape
        tokens = (x_t / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            q, k, v = blk.to_q(tokens), blk.to_k(cond["ctx"]), blk.to_v(cond["ctx"])
            tokens = tokens + blk.to_out(F.scaled_dot_product_attention(q, k, v))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


def _install(model, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for blk in model.blocks:
        for name in ("to_q", "to_k", "to_v", "to_out"):
            lin = getattr(blk, name)
            layer = LoRATrainLayer(lin.in_features, lin.out_features, rank, alpha or rank, g, name=name)
            lin.forward = TrainForward(lin, layer)
            layers.append(layer)
    return layers


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randn(16, 4, 4, generator=g), {"ctx": torch.randn(1, 5, 8, generator=g)}) for _ in range(n)]


def _held_out_error(student, teacher, noise_model, seed=99, n=64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 16, 4, 4, generator=g)
    ctx = torch.randn(n, 5, 8, generator=g)
    sigma = noise_model.sigma_of(torch.rand(n, generator=g, dtype=torch.float64)).float()
    x_t = noise_model.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.no_grad():
        return float((student(x_t, sigma, {"ctx": ctx}) - teacher(x_t, sigma, {"ctx": ctx})).pow(2).mean())


def _teacher(seed=5):
    teacher = ToyDenoiser()
    layers = _install(teacher, rank=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in layers:
        layer.up.data = torch.randn(layer.up.shape, generator=g) * 0.5
    return teacher


def _recover(prediction, steps=150):
    noise_model = simple_noise_model(prediction)
    teacher, student = _teacher(), ToyDenoiser()
    base_error = _held_out_error(student, teacher, noise_model)
    layers = _install(student, rank=4, seed=3)
    params = [p for layer in layers for p in layer.parameters()]
    settings = TrainSettings(steps=steps, learning_rate=3e-3, batch_size=4, seed=7, min_snr_gamma=5.0,
                             lr_schedule="constant")
    result, _ = train(student, _data(), params, noise_model, settings, target=teacher)
    return base_error, _held_out_error(student, teacher, noise_model), result, layers


@pytest.mark.parametrize("prediction", [EPS, FLOW])
def test_student_recovers_a_hidden_teacher_lora(prediction):
    base_error, trained_error, result, _ = _recover(prediction, steps=300)
    assert trained_error <= 0.2 * base_error  # at least 80% of the gap to the teacher closed
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first


def test_step_zero_is_the_base_model_and_base_gets_no_gradient():
    model = ToyDenoiser()
    x, sigma, cond = torch.randn(2, 16, 4, 4), torch.tensor([1.0, 2.0]), {"ctx": torch.randn(2, 5, 8)}
    before = model(x, sigma, cond)
    layers = _install(model, rank=4, seed=0)
    assert torch.equal(model(x, sigma, cond), before)
    model(x, sigma, cond).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(layer.down.grad is not None for layer in layers)


def test_same_seed_same_lora_bit_for_bit():
    runs = [_recover(EPS, steps=20)[3] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_nan_loss_stops_with_a_clear_message_and_keeps_finite_weights():
    model = ToyDenoiser()
    layers = _install(model, rank=2, seed=0)
    params = [p for layer in layers for p in layer.parameters()]
    calls = {"n": 0}

    def flaky(x_t, sigma, cond):
        calls["n"] += 1
        out = model(x_t, sigma, cond)
        return out * float("nan") if calls["n"] == 4 else out
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        train(flaky, _data(), params, simple_noise_model(), TrainSettings(steps=10, learning_rate=1e-3))
    assert all(torch.isfinite(p).all() for p in params)


def test_hooks_report_each_step_and_stop_within_one_step():
    model = ToyDenoiser()
    layers = _install(model, rank=2, seed=0)
    seen = []
    hooks = TrainHooks(on_step=lambda s, loss, lr: seen.append((s, loss, lr)), should_stop=lambda: len(seen) >= 3)
    result, _ = train(model, _data(), [p for layer in layers for p in layer.parameters()], simple_noise_model(),
                      TrainSettings(steps=50, warmup_steps=10, learning_rate=1e-3), hooks)
    assert result.stopped_early and result.steps_done == 3 and [s for s, _, _ in seen] == [1, 2, 3]
    assert seen[0][2] == pytest.approx(1e-4)  # warm-up: 1/10 of the base rate at the first step


def test_cosine_schedule_with_warmup():
    assert lr_factor(0, 100, "cosine", 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, "cosine", 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, "constant", 0) == 1.0


def test_rank_larger_than_layer_is_an_error():
    with pytest.raises(Exception, match="rank 20 does not fit layer 'to_k' \\(16x8\\)"):
        LoRATrainLayer(8, 16, 20, 20, torch.Generator(), name="to_k")


def test_gradient_checkpointing_saves_activation_memory():
    def saved_bytes(checkpointed):
        model = ToyDenoiser(dim=64, depth=4)
        layers = _install(model, rank=4, seed=0)
        for layer in layers:
            layer.up.data.normal_()
        if checkpointed:
            for blk in model.blocks:
                blk.forward = CheckpointedForward(blk)
        x = torch.randn(8, 64, 8, 8)
        with saved_tensor_bytes() as total:
            out = x
            tokens = out.flatten(2).transpose(1, 2)
            ctx = torch.randn(8, 5, 8)
            for blk in model.blocks:
                def run(t, blk=blk):
                    return t + blk.to_out(F.scaled_dot_product_attention(blk.to_q(t), blk.to_k(ctx), blk.to_v(ctx)))
                tokens = CheckpointedForward(blk, inner=run)(tokens) if checkpointed else run(tokens)
        tokens.sum().backward()
        return total["bytes"]
    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < 0.5 * plain


def test_targets_and_buckets():
    shapes = {"diffusion_model.a.attn1.to_q.weight": (4, 4), "diffusion_model.a.attn1.to_out.0.weight": (4, 4),
              "diffusion_model.a.ff.net.2.weight": (4, 4), "diffusion_model.a.norm1.weight": (4,),
              "diffusion_model.double_blocks.0.img_attn.qkv.weight": (12, 4)}
    assert select_targets(shapes) == ["diffusion_model.a.attn1.to_out.0.weight", "diffusion_model.a.attn1.to_q.weight",
                                      "diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert "diffusion_model.a.ff.net.2.weight" in select_targets(shapes, "attention + feed-forward")
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and all(w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert nearest_bucket(1024, 512, sizes)[0] > nearest_bucket(1024, 512, sizes)[1]
    img = torch.rand(300, 200, 3)
    assert fit_image(img, 128, 192).shape == (192, 128, 3)


def test_v_pred_like_loss_weights_noisy_steps_as_kohya_does():
    """kohya's --v_pred_like_loss: loss + lambda * loss * (SNR + 1) / SNR, on top of min-SNR (x0 space here)."""
    from lora_core.training.objective import V_PRED, simple_noise_model
    eps = simple_noise_model(EPS)
    sigma = torch.tensor([2.0, 0.1])                      # SNR 0.25 and 100
    assert torch.allclose(eps.loss_weight(sigma, 5.0), torch.tensor([0.25, 5.0]))
    assert torch.allclose(eps.loss_weight(sigma, 5.0, 1.0), torch.tensor([0.25 * 6.0, 5.0 * 2.01]))
    # the noisy step gains 6x, the clean one 2x: the balance moves to where shapes are decided
    assert torch.allclose(simple_noise_model(V_PRED).loss_weight(sigma, 5.0, 1.0),
                          simple_noise_model(V_PRED).loss_weight(sigma, 5.0))


# ---------------------------------------------------------------- output preservation (twins)

TRIGGER = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(42)) * 3


def _twinned_data(n=12, seed=1):
    """Samples whose context carries a trigger token first; each twin is the same latent with that token
    blanked, as a caption without its trigger word."""
    out = []
    for s in _data(n, seed):
        plain = s.cond["ctx"].clone()
        plain[:, 0] = 0
        triggered = plain.clone()
        triggered[:, :1] = TRIGGER
        out.append(Sample(s.latent, {"ctx": triggered}, twin=Sample(s.latent, {"ctx": plain})))
    return out


def _base_of(model, layers):
    from lora_core.training import base_outputs

    def base_denoise(x, sigma, cond):
        with base_outputs(layers):
            return model(x, sigma, cond)
    return base_denoise


def _untriggered_drift(preserve: bool, steps=150, weight=1.0):
    """Train on the twinned data (clean latents as targets); how far the untriggered outputs move from the
    base model's, and how well the triggered samples are fitted."""
    noise_model = simple_noise_model(EPS)
    model, reference = ToyDenoiser(), ToyDenoiser()
    layers = _install(model, rank=4, seed=3)
    params = [p for layer in layers for p in layer.parameters()]
    data = _twinned_data()
    settings = TrainSettings(steps=steps, learning_rate=3e-3, batch_size=4, seed=7, lr_schedule="constant",
                             preservation_weight=weight)
    result, _ = train(model, data, params, noise_model, settings,
                      base_denoise=_base_of(model, layers) if preserve else None)
    g = torch.Generator().manual_seed(99)
    plain = torch.cat([s.twin.cond["ctx"] for s in data])
    x_t = torch.randn(len(data), 16, 4, 4, generator=g)
    sigma = torch.full((len(data),), 1.0)
    with torch.no_grad():
        drift = float((model(x_t, sigma, {"ctx": plain}) - reference(x_t, sigma, {"ctx": plain})).pow(2).mean())
    return drift, result.losses


def test_output_preservation_keeps_untriggered_outputs_near_the_base_model():
    drift_plain, losses_plain = _untriggered_drift(False)
    drift_kept, losses_kept = _untriggered_drift(True)
    assert drift_plain > 1e-3                # without it the LoRA moves prompts without the trigger
    assert drift_kept < 0.4 * drift_plain    # with it they stay near the base model (measured 0.28x)
    # and the triggered samples are still learned (the loss includes the twins' rows, which start at 0)
    assert sum(losses_kept[-10:]) < 0.8 * sum(losses_kept[:10])


def test_a_higher_preservation_weight_keeps_untriggered_outputs_nearer_the_base_model():
    drift_1, _ = _untriggered_drift(True)
    drift_4, losses_4 = _untriggered_drift(True, weight=4.0)
    assert drift_4 < 0.7 * drift_1, (drift_4, drift_1)  # measured 0.44x
    assert sum(losses_4[-10:]) < 0.8 * sum(losses_4[:10])  # still learning


def test_the_preservation_weight_scales_only_the_twin_rows_loss(monkeypatch):
    from lora_core.training import loop
    seen = []

    def weighted(pred, x0, weight):
        seen.append(weight.clone())
        return ((pred - x0) ** 2).mean()
    monkeypatch.setattr(loop, "weighted_x0_loss", weighted)
    for w in (1.0, 2.5):
        model = ToyDenoiser()
        layers = _install(model, rank=2, seed=0)
        train(model, _twinned_data(n=4), [p for layer in layers for p in layer.parameters()], simple_noise_model(),
              TrainSettings(steps=1, batch_size=4, learning_rate=1e-9, preservation_weight=w),
              base_denoise=_base_of(model, layers))
    plain, scaled = seen
    assert len(plain) == 8 and torch.equal(scaled[:4], plain[:4]) and torch.equal(scaled[4:], plain[4:] * 2.5)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_preservation_weight_that_is_not_positive_and_finite_is_refused(weight):
    with pytest.raises(LoRAError, match="preservation_weight must be > 0"):
        TrainSettings(preservation_weight=weight).validate()


def test_twins_share_their_samples_noise_and_regress_onto_the_base_prediction():
    model = ToyDenoiser()
    layers = _install(model, rank=2, seed=0)
    for layer in layers:
        layer.up.data.normal_()  # a LoRA that already changes the output: base and model differ
    seen = {}

    def denoise(x_t, sigma, cond):
        seen["x_t"], seen["sigma"], seen["ctx"] = x_t, sigma, cond["ctx"]
        seen["pred"] = model(x_t, sigma, cond)
        return seen["pred"]

    def base_denoise(x_t, sigma, cond):
        seen["base_x_t"] = x_t
        return _base_of(model, layers)(x_t, sigma, cond)
    data = _twinned_data(n=4)
    params = [p for layer in layers for p in layer.parameters()]
    train(denoise, data, params, simple_noise_model(), TrainSettings(steps=1, batch_size=4, learning_rate=1e-9),
          base_denoise=base_denoise)
    x_t, ctx = seen["x_t"], seen["ctx"]
    assert x_t.shape[0] == 8                                  # 4 samples + their 4 twins
    assert torch.equal(x_t[4:], x_t[:4]) and torch.equal(seen["sigma"][4:], seen["sigma"][:4])
    assert torch.equal(seen["base_x_t"], x_t[:4])
    assert (ctx[:4, 0] != 0).all() and (ctx[4:, 0] == 0).all()  # the twins carry the untriggered context
    with torch.no_grad():  # the base prediction is the model with every layer off, not the model itself
        base = _base_of(model, layers)(x_t[4:], seen["sigma"][4:], {"ctx": ctx[4:]})
        assert not torch.allclose(base, seen["pred"][4:].detach(), atol=1e-3)
        assert torch.allclose(base, ToyDenoiser()(x_t[4:], seen["sigma"][4:], {"ctx": ctx[4:]}), atol=1e-6)


def test_twins_are_ignored_without_a_base_denoiser_bit_for_bit():
    def run(data):
        model = ToyDenoiser()
        layers = _install(model, rank=2, seed=0)
        train(model, data, [p for layer in layers for p in layer.parameters()], simple_noise_model(),
              TrainSettings(steps=5, batch_size=4, learning_rate=1e-3))
        return layers
    twinned = _twinned_data()
    plain = [Sample(s.latent, s.cond) for s in twinned]
    for a, b in zip(run(twinned), run(plain)):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
