"""lora_core merging and export with real numbers: concat, svd, ties, dare, and kohya files."""
import json
import os

import pytest
import torch

import lora_core.formats.safetensors_io as safetensors_io
from lora_core import LoHaAdapter, LoRA, LoRAError, LowRankAdapter, parse_lora, read_lora_file
from lora_core.formats.export import build_metadata, kohya_prefix, lora_state_dict, save_lora
from lora_core.formats.metadata import read_info
from lora_core.merging import MergeInput, merge_loras
from lora_factory import lora_state_dict as factory_state_dict
from lora_factory import low_rank_factors

SHAPES = {"lora_unet_a_to_q": (24, 16), "lora_unet_a_to_k": (24, 16)}


def make_lora(seed, rank=4, alpha=None, shapes=SHAPES, name=None, layout="kohya", metadata=None):
    sd = factory_state_dict(low_rank_factors(shapes, rank, seed=seed), alpha=alpha, layout=layout)
    return parse_lora(sd, name or f"l{seed}.safetensors", metadata)


def delta(lora, prefix, shape=None):
    adapter = lora.adapters[prefix]
    return adapter.delta(torch.Size(shape or adapter.target_shape_2d()), "cpu", torch.float64)


def exact_sum(weighted, prefix, shape):
    """sum_i w_i dW_i in fp64 over the inputs that have the layer."""
    total = torch.zeros(shape, dtype=torch.float64)
    for lora, w in weighted:
        if prefix in lora.adapters:
            total += w * delta(lora, prefix, shape)
    return total


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer_report(report, name):
    return next(r for r in report.layers if r.name == name)


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ---------------------------------------------------------------- concat

def test_concat_is_exact_with_mixed_ranks_alphas_and_a_layer_only_one_input_has():
    extra = {"lora_unet_b_ff": (40, 24)}
    a = make_lora(1, rank=4, alpha=2.0, shapes={**SHAPES, **extra})
    b = make_lora(2, rank=8, alpha=3.0)
    c = make_lora(3, rank=6, alpha=None)
    weighted = [(a, 0.8), (b, -0.5), (c, 1.3)]
    merged, report = merge_loras(weighted, method="concat", name="m")
    assert merged.name == "m" and merged.metadata == {}
    assert sorted(merged.adapters) == sorted([*SHAPES, *extra])
    for prefix, shape in {**SHAPES, **extra}.items():
        adapter = merged.adapters[prefix]
        assert isinstance(adapter, LowRankAdapter) and adapter.scale == 1.0
        assert rel(delta(merged, prefix), exact_sum(weighted, prefix, shape)) < 1e-5
        assert layer_report(report, prefix).rel_error < 1e-6
    assert merged.adapters["lora_unet_a_to_q"].rank == 4 + 8 + 6
    assert merged.adapters["lora_unet_b_ff"].rank == 4
    assert layer_report(report, "lora_unet_b_ff").inputs == 1


def test_kohya_and_peft_names_of_one_layer_align():
    peft_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    a = make_lora(4, shapes={kohya_name: (24, 16), "lora_te1_text_model_encoder_layers_0_mlp_fc1": (12, 8)})
    b = make_lora(5, shapes={peft_name: (24, 16), "text_encoder.text_model.encoder.layers.0.mlp.fc1": (12, 8)},
                  layout="peft")
    merged, _ = merge_loras([(a, 1.0), (b, 1.0)], method="concat")
    assert sorted(merged.adapters) == ["lora_te1_text_model_encoder_layers_0_mlp_fc1", kohya_name]
    want = delta(a, kohya_name) + delta(b, peft_name)
    assert rel(delta(merged, kohya_name), want) < 1e-6


def test_clip_weight_applies_to_text_encoder_layers_only():
    shapes = {"lora_unet_x": (8, 6), "lora_te_text_model_encoder_layers_0_mlp_fc1": (8, 6)}
    a = make_lora(6, shapes=shapes)
    merged, _ = merge_loras([MergeInput(a, weight=2.0, clip_weight=0.5)], method="concat")
    assert rel(delta(merged, "lora_unet_x"), 2.0 * delta(a, "lora_unet_x")) < 1e-6
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert rel(delta(merged, te), 0.5 * delta(a, te)) < 1e-6


# ---------------------------------------------------------------- svd

def test_svd_error_is_the_dense_optimum_and_matches_dense_truncation():
    shapes = {"lora_unet_big": (96, 80)}
    loras = [make_lora(10 + i, rank=8 + 4 * i, alpha=4.0 + i, shapes=shapes) for i in range(3)]
    weighted = list(zip(loras, (1.0, -0.7, 0.4)))
    k = 10
    merged, report = merge_loras(weighted, method="svd", target_rank=k)
    exact = exact_sum(weighted, "lora_unet_big", (96, 80))
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    optimum = float((s[k:] ** 2).sum().sqrt() / s.square().sum().sqrt())
    got = layer_report(report, "lora_unet_big")
    assert got.rank == k and merged.adapters["lora_unet_big"].rank == k
    assert abs(got.rel_error - optimum) / optimum < 1e-5
    truncated = (u[:, :k] * s[:k]) @ vh[:k]
    mine = delta(merged, "lora_unet_big")
    assert rel(mine, truncated) < 1e-5
    assert abs(rel(mine, exact) - optimum) / optimum < 1e-5  # the report tells the truth about the file
    assert abs(report.retained_energy - float((s[:k] ** 2).sum() / (s ** 2).sum())) < 1e-9


def test_svd_rank_above_what_a_layer_allows_is_reduced_and_noted():
    a, b = make_lora(20, rank=4), make_lora(21, rank=3)
    merged, report = merge_loras([(a, 1.0), (b, 1.0)], method="svd", target_rank=64)
    assert {ad.rank for ad in merged.adapters.values()} == {7}
    assert all(r.rel_error < 1e-6 for r in report.layers)
    assert any("allow less than rank 64" in n for n in report.notes)


def test_energy_mode_picks_the_smallest_rank_that_keeps_the_energy():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # energy 16, 25, 29, 30 of 30
    up, down = orthonormal(20, 4, 1) * s, orthonormal(12, 4, 2).T.contiguous()
    lora = parse_lora({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(4.0)}, "e")
    cases = [(0.5, 64, 1), (0.8, 64, 2), (0.9, 64, 3), (29 / 30 - 1e-5, 64, 3), (29 / 30 + 1e-5, 64, 4),
             (1.0, 64, 4), (0.9, 2, 2)]  # (threshold, target rank cap, expected k)
    for threshold, cap, want in cases:
        merged, report = merge_loras([(lora, 1.0)], method="svd", rank_mode="energy", energy=threshold,
                                     target_rank=cap)
        assert merged.adapters["m"].rank == want, threshold
        assert report.retained_energy == pytest.approx(float((s[:want] ** 2).sum() / 30), rel=1e-6)


def test_loha_input_goes_through_its_dense_delta():
    g = torch.Generator().manual_seed(30)
    shapes = {"hada_w1_a": (24, 3), "hada_w1_b": (3, 16), "hada_w2_a": (24, 3), "hada_w2_b": (3, 16)}
    roles = {role: torch.randn(shape, generator=g) for role, shape in shapes.items()}
    loha = LoHaAdapter.claim({**roles, "alpha": torch.tensor(3.0)})
    lyco = LoRA("loha.safetensors", {"lora_unet_a_to_q": loha})
    plain = make_lora(31, rank=4)
    weighted = [(lyco, 0.5), (plain, 1.0)]
    merged, report = merge_loras(weighted, method="svd", target_rank=6)
    exact = exact_sum(weighted, "lora_unet_a_to_q", (24, 16))
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    assert rel(delta(merged, "lora_unet_a_to_q"), (u[:, :6] * s[:6]) @ vh[:6]) < 1e-5
    exact_merge, _ = merge_loras(weighted, method="concat")
    assert rel(delta(exact_merge, "lora_unet_a_to_q"), exact) < 1e-5


def test_conv_layers_keep_their_kernel_shape():
    g = torch.Generator().manual_seed(32)
    sd = {"lora_unet_conv.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g),
          "lora_unet_conv.lora_down.weight": torch.randn(4, 6, 3, 3, generator=g)}
    a, b = parse_lora(sd, "a"), parse_lora({k: v.flip(0) for k, v in sd.items()}, "b")
    merged, _ = merge_loras([(a, 1.0), (b, 0.5)], method="svd", target_rank=5)
    adapter = merged.adapters["lora_unet_conv"]
    assert tuple(adapter.roles["up"].shape) == (8, 5, 1, 1) and tuple(adapter.roles["down"].shape) == (5, 6, 3, 3)
    concat, _ = merge_loras([(a, 1.0), (b, 0.5)], method="concat")
    exact = delta(a, "lora_unet_conv") + 0.5 * delta(b, "lora_unet_conv")
    assert rel(delta(concat, "lora_unet_conv"), exact) < 1e-6


# ---------------------------------------------------------------- ties and dare

def full_rank_lora(matrix, name):
    """A 2x2 'LoRA' whose delta is exactly `matrix` (up = matrix, down = I, alpha = rank)."""
    return parse_lora({"m.lora_up.weight": matrix, "m.lora_down.weight": torch.eye(2), "m.alpha": torch.tensor(2.0)},
                      name)


def test_ties_matches_a_hand_computed_example():
    a = full_rank_lora(torch.tensor([[3.0, -1.0], [0.5, -2.0]]), "a")
    b = full_rank_lora(torch.tensor([[-1.5, 2.0], [1.0, -0.5]]), "b")
    # Trim to the top half: a -> [[3, 0], [0, -2]], b -> [[-1.5, 2], [0, 0]]. Elected signs of the sum
    # [[1.5, 2], [0, -2]]: [[+, +], [0, -]]. Disjoint mean of agreeing entries: [[3, 2], [0, -2]].
    merged, report = merge_loras([(a, 1.0), (b, 1.0)], method="ties", density=0.5, target_rank=2)
    torch.testing.assert_close(delta(merged, "m"), torch.tensor([[3.0, 2.0], [0.0, -2.0]], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    assert report.trimmed_fraction == 0.5
    assert report.layers[0].sign_conflicts == 1  # b's -1.5 lost the vote
    # Weights scale the tasks before trimming: 2a and 1b elect the same signs, mean is 2x on a's entries.
    merged2, _ = merge_loras([(a, 2.0), (b, 1.0)], method="ties", density=0.5, target_rank=2)
    torch.testing.assert_close(delta(merged2, "m"), torch.tensor([[6.0, 2.0], [0.0, -4.0]], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_dare_matches_its_documented_masks():
    ma, mb = torch.tensor([[3.0, -1.0], [0.5, -2.0]]), torch.tensor([[-1.5, 2.0], [1.0, -0.5]])
    a, b = full_rank_lora(ma, "a"), full_rank_lora(mb, "b")
    merged, report = merge_loras([(a, 1.0), (b, 0.5)], method="dare", density=0.5, seed=7, target_rank=2)
    g = torch.Generator().manual_seed(7)  # one stream, layers in sorted order, inputs in order
    keep_a, keep_b = torch.rand(2, 2, generator=g) < 0.5, torch.rand(2, 2, generator=g) < 0.5
    want = (ma * keep_a + 0.5 * mb * keep_b) / 0.5
    torch.testing.assert_close(delta(merged, "m").float(), want, rtol=1e-5, atol=1e-5)
    assert report.dropped_fraction == (8 - int(keep_a.sum()) - int(keep_b.sum())) / 8


def test_dare_with_density_one_is_the_plain_weighted_sum():
    a, b = make_lora(40, rank=4), make_lora(41, rank=4)
    merged, report = merge_loras([(a, 1.0), (b, 0.3)], method="dare", density=1.0, target_rank=8)
    for prefix, shape in SHAPES.items():
        assert rel(delta(merged, prefix), exact_sum([(a, 1.0), (b, 0.3)], prefix, shape)) < 1e-5
    assert report.dropped_fraction == 0.0


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_are_deterministic_under_a_seed(method):
    shapes = {"lora_unet_x": (64, 48), "lora_unet_y": (32, 48)}
    loras = [(make_lora(50 + i, rank=6, alpha=3.0, shapes=shapes), w) for i, w in enumerate((1.0, 0.6, -0.4))]
    first, rep1 = merge_loras(loras, method=method, density=0.3, seed=123, target_rank=8)
    second, rep2 = merge_loras(loras, method=method, density=0.3, seed=123, target_rank=8)
    for prefix in shapes:
        for role in ("up", "down"):
            assert torch.equal(first.adapters[prefix].roles[role], second.adapters[prefix].roles[role])
    assert rep1.to_dict() == rep2.to_dict()
    if method == "dare":
        other, _ = merge_loras(loras, method=method, density=0.3, seed=124, target_rank=8)
        assert not torch.equal(other.adapters["lora_unet_x"].roles["up"], first.adapters["lora_unet_x"].roles["up"])
        assert abs(rep1.dropped_fraction - 0.7) < 0.03
    else:
        assert abs(rep1.trimmed_fraction - 0.7) < 1e-3
    text = rep1.to_text()
    assert text.splitlines()[0].startswith(f"{method} merge of 3 LoRAs") and "worst layers:" in text


def test_report_lists_worst_layers_first_and_serialises():
    shapes = {"lora_unet_x": (64, 48), "lora_unet_y": (32, 8)}
    loras = [(make_lora(60 + i, rank=6, shapes=shapes), 1.0) for i in range(3)]
    _, report = merge_loras(loras, method="svd", target_rank=4)
    lines = report.to_text().splitlines()
    worst = [line for line in lines if "lora_unet_" in line]
    errors = sorted((r.rel_error for r in report.layers), reverse=True)
    assert [float(line.split("%")[0]) / 100 for line in worst] == pytest.approx(errors, abs=1e-4)
    json.dumps(report.to_dict())


# ---------------------------------------------------------------- errors

def test_merge_errors_are_clear():
    a = make_lora(70)
    with pytest.raises(LoRAError, match="no LoRAs"):
        merge_loras([], method="svd")
    with pytest.raises(LoRAError, match="at least 1"):
        merge_loras([(a, 1.0)], method="svd", target_rank=0)
    with pytest.raises(LoRAError, match="not a finite"):
        merge_loras([(a, float("nan"))])
    with pytest.raises(LoRAError, match="unknown merge method"):
        merge_loras([(a, 1.0)], method="average")
    sd1 = make_lora(71, name="sd1.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    xl = make_lora(72, name="xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoRAError, match="different base models.*SD1.x: sd1.safetensors.*SDXL: xl.safetensors"):
        merge_loras([(sd1, 1.0), (xl, 1.0)])


def test_shape_disagreement_names_the_layer_and_both_files():
    a = make_lora(80, name="small.safetensors")
    b = make_lora(81, name="big.safetensors", shapes={"lora_unet_a_to_q": (32, 16)})
    with pytest.raises(LoRAError, match=r"lora_unet_a_to_q.*small\.safetensors.*24x16.*big\.safetensors.*32x16"):
        merge_loras([(a, 1.0), (b, 1.0)], method="svd")


def test_non_finite_tensors_name_the_layer_and_file():
    a = make_lora(82, name="good.safetensors")
    b = make_lora(83, name="broken.safetensors")
    b.adapters["lora_unet_a_to_k"].roles["up"][0, 0] = float("inf")
    with pytest.raises(LoRAError, match="lora_unet_a_to_k.*broken.safetensors"):
        merge_loras([(a, 1.0), (b, 1.0)], method="svd")


# ---------------------------------------------------------------- export

def test_kohya_prefix():
    assert kohya_prefix("lora_unet_a_to_q") == "lora_unet_a_to_q"
    assert kohya_prefix("unet.down_blocks.0.attn1.to_q") == "lora_unet_down_blocks_0_attn1_to_q"
    assert kohya_prefix("text_encoder.text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_prefix("some.unknown.module") == "some.unknown.module"


def test_export_round_trips_to_the_same_deltas(tmp_path):
    loras = [(make_lora(90 + i, rank=4 + i, alpha=2.0, layout="peft" if i else "kohya",
                        shapes={"unet.a.to_q" if i else "lora_unet_a_to_q": (24, 16)}), w)
             for i, w in enumerate((1.0, 0.5))]
    merged, report = merge_loras(loras, method="svd", target_rank=6, name="merged")
    sd = lora_state_dict(merged)
    assert set(sd) == {"lora_unet_a_to_q.lora_up.weight", "lora_unet_a_to_q.lora_down.weight",
                       "lora_unet_a_to_q.alpha"}
    assert sd["lora_unet_a_to_q.alpha"].dim() == 0 and all(t.is_contiguous() for t in sd.values())
    meta = build_metadata(title="merged", base_family="SD1.x", rank=report.max_rank, alpha=report.max_rank,
                          scope="style", provenance={"method": "svd", "inputs": report.inputs},
                          trigger_words=["zxc style", "blue"])
    path = tmp_path / "merged.safetensors"
    save_lora(str(path), merged, meta)
    tensors, read_meta = read_lora_file(str(path))
    back = parse_lora(tensors, "merged.safetensors", read_meta)
    assert rel(delta(back, "lora_unet_a_to_q"), delta(merged, "lora_unet_a_to_q")) < 1e-7
    assert read_meta["ss_network_dim"] == "6" and read_meta["ss_network_module"] == "networks.lora"
    assert read_meta["ss_base_model_version"] == "sd_v1"
    assert read_meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(read_meta["lw.provenance"]) == {"method": "svd", "inputs": report.inputs}
    assert read_info(read_meta).trigger_words == ["zxc style", "blue"]
    assert all(isinstance(v, str) for v in read_meta.values())


@pytest.mark.parametrize("family,version,arch", [
    ("SD1.x", "sd_v1", "stable-diffusion-v1/lora"), ("SD2.x", "sd_v2", "stable-diffusion-v2-768-v/lora"),
    ("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"), ("Flux", "flux1", "flux-1-dev/lora"),
    ("SD3", "sd3", "stable-diffusion-3/lora"),
])
def test_metadata_names_the_base_model_as_kohya_and_modelspec_do(family, version, arch):
    meta = build_metadata(title="t", base_family=family, rank=16, alpha=8, scope="character", provenance={},
                          training={"max_train_steps": 500, "ss_learning_rate": 1e-4}, extra={"lw.note": "x"})
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert meta["ss_network_alpha"] == "8.0" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["ss_max_train_steps"] == "500" and meta["ss_learning_rate"] == "0.0001"
    assert meta["lw.scope"] == "character" and meta["lw.note"] == "x" and "lw.version" in meta
    assert meta["modelspec.implementation"] == "https://github.com/kohya-ss/sd-scripts"
    assert "ss_tag_frequency" not in meta and all(isinstance(v, str) for v in meta.values())


def test_export_refuses_adapters_that_are_not_low_rank():
    g = torch.Generator().manual_seed(95)
    loha = LoHaAdapter.claim({r: torch.randn(4, 2, generator=g) if r.endswith("a") else torch.randn(2, 3, generator=g)
                              for r in LoHaAdapter.ROLES})
    with pytest.raises(LoRAError, match="lora_unet_loha_layer"):
        lora_state_dict(LoRA("x", {"lora_unet_loha_layer": loha}))


def test_a_failing_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    first = make_lora(96)
    save_lora(str(path), first, {"v": "1"})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_lora(str(path), make_lora(97), {"v": "2"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.safetensors"]  # the temporary file is gone too
