"""TrainLoRA's training path really learns: a student recovers a hidden teacher LoRA.

The teacher is a rank-2 LoRA on the same attention linears; the training targets are the
teacher's denoiser outputs (ComfyUI's apply_model with the teacher switched in). Errors are
measured on held-out noise and timesteps against the teacher, relative to the base model's.
"""
import torch
import torch.nn.functional as F

from lora_fixtures import SD15

TEACHER = {"on": False}


class TeacherSwitch:
    """Test-only forward: the teacher's delta when TEACHER['on'], else the student's TrainForward."""

    def __init__(self, student_forward, up, down):
        self.student, self.up, self.down = student_forward, up, down

    def __call__(self, x, *args, **kwargs):
        if not TEACHER["on"]:
            return self.student(x, *args, **kwargs)
        module = self.student.module
        base = type(module).forward(module, x, *args, **kwargs)
        return base + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def _install_teacher(trainer, layers, seed, scale):
    g = torch.Generator().manual_seed(seed)
    for key, layer in layers.items():
        name = key[: -len(".weight")] + ".forward"
        up = torch.randn(layer.up.shape[0], 2, generator=g) * scale
        down = torch.randn(2, layer.down.shape[1], generator=g) / layer.down.shape[1] ** 0.5
        trainer.add_object_patch(name, TeacherSwitch(trainer.object_patches[name], up, down))


def _teacher(denoise):
    def target(x_t, sigma, cond):
        TEACHER["on"] = True
        try:
            return denoise(x_t, sigma, cond)
        finally:
            TEACHER["on"] = False
    return target


def _held_out(denoise, noise_model, samples, collate, seed=1234, n=16):
    from lora_core.training.loop import collate_batch
    g = torch.Generator().manual_seed(seed)
    idx = [int(i) for i in torch.randint(len(samples), (n,), generator=g)]
    x0, cond = collate_batch(samples, idx, "cpu", collate)
    sigma = noise_model.sigma_of(torch.rand(n, generator=g, dtype=torch.float64)).float()
    x_t = noise_model.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.no_grad():
        student = denoise(x_t, sigma, cond)
        teacher = _teacher(denoise)(x_t, sigma, cond)
    return float(((student - teacher) ** 2).mean())


def _recover(comfy_host, model, samples, steps, lr, teacher_scale, schedule="constant"):
    pack = comfy_host.pack
    bridge, training = pack.nodes.train_bridge, pack.lora_core.training
    with torch.inference_mode(False), torch.enable_grad():
        trainer, layers = bridge.attach_trainable(model, "attention", rank=4, alpha=4.0, seed=0, init="kaiming",
                                                  checkpointing=False)
        _install_teacher(trainer, layers, seed=11, scale=teacher_scale)
        try:
            device = bridge.load_for_training(trainer)
            denoise, noise_model = bridge.denoiser(trainer), bridge.noise_model_of(trainer)
            with bridge.training_context():
                before = _held_out(denoise, noise_model, samples, bridge.collate_host_conds)
                params = [p for layer in layers.values() for p in layer.parameters()]
                settings = training.TrainSettings(steps=steps, learning_rate=lr, batch_size=4, seed=5,
                                                  lr_schedule=schedule, min_snr_gamma=5.0)
                result, _ = training.train(denoise, samples, params, noise_model, settings, device=device,
                                           target=_teacher(denoise), collate=bridge.collate_host_conds)
                after = _held_out(denoise, noise_model, samples, bridge.collate_host_conds)
        finally:
            bridge.unload(trainer)
    return before, after, result.losses, noise_model.prediction


def _assert_learned(before, after, losses):
    print(f"held-out error vs teacher: base {before:.4g}, trained {after:.4g} ({1 - after / before:.1%} recovered); "
          f"loss first {losses[0]:.4g}, last {losses[-1]:.4g}")
    assert after <= 0.2 * before, f"student error {after:.4g} vs base {before:.4g}: less than 80% recovered"
    k = max(1, len(losses) // 10)
    assert sum(losses[-k:]) / k < 0.5 * sum(losses[:k]) / k


def test_sd15_epsilon_model_recovers_the_teacher(comfy_host):
    pack = comfy_host.pack
    with torch.inference_mode():
        model, clip = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:2]
    captions = ["a red fox", "a lighthouse", "a bowl of fruit", "a city at night"]
    g = torch.Generator().manual_seed(0)
    bridge = pack.nodes.train_bridge
    with torch.no_grad():
        conditionings = bridge.encode_captions(clip, captions)
        latents = [torch.randn(4, 8, 8, generator=g) for _ in range(8)]
        samples = bridge.build_samples(model, latents, [conditionings[captions[i % 4]] for i in range(8)])
    before, after, losses, prediction = _recover(comfy_host, model, samples, steps=160, lr=5e-3, teacher_scale=0.3)
    assert prediction == "eps"
    _assert_learned(before, after, losses)


def test_flux_flow_matching_model_recovers_the_teacher(comfy_host):
    pack = comfy_host.pack
    model = comfy_host.nodes.UNETLoader().load_unet("lw_tiny_flux.safetensors", "default")[0]
    g = torch.Generator().manual_seed(1)
    latents, conditionings = [], []
    for _ in range(8):  # no tiny Flux text encoder: conditioning of the documented shapes, seeded
        latents.append(torch.randn(16, 8, 8, generator=g))
        cross = torch.randn(1, 8, 32, generator=g)
        conditionings.append([cross, {"pooled_output": torch.randn(1, 32, generator=g)}])
    samples = pack.nodes.train_bridge.build_samples(model, latents, conditionings)
    before, after, losses, prediction = _recover(comfy_host, model, samples, steps=300, lr=1e-2, teacher_scale=0.3,
                                                  schedule="cosine")
    assert prediction == "flow"
    _assert_learned(before, after, losses)
