"""lora_core alone: parsing every layout, the patch math, bypass, and key resolution."""
import math

import pytest
import torch

from lora_core import (
    BypassForward,
    LoHaAdapter,
    LoKrAdapter,
    Term,
    apply_terms,
    dense_delta,
    parse_lora,
)
from lora_core.formats.keymap import candidate_names, resolve
from lora_factory import LAYOUTS, lora_state_dict, low_rank_factors

SHAPES = {"lora_unet_a_to_q": (24, 16), "lora_unet_a_to_k": (24, 16)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_parses_to_the_same_low_rank_delta(layout):
    factors = low_rank_factors(SHAPES, rank=4, seed=1)
    lora = parse_lora(lora_state_dict(factors, alpha=None, layout=layout), "x.safetensors")
    assert sorted(lora.adapters) == sorted(SHAPES)
    assert lora.kinds() == {"lora": 2} and not lora.unrecognised and not lora.foreign
    for prefix, (up, down) in factors.items():
        got = lora.adapters[prefix].delta(torch.Size(SHAPES[prefix]), "cpu")
        torch.testing.assert_close(got, up @ down, rtol=0, atol=0)


def test_alpha_scales_by_alpha_over_rank():
    factors = low_rank_factors(SHAPES, rank=4, seed=2)
    lora = parse_lora(lora_state_dict(factors, alpha=2.0), "x")
    adapter = lora.adapters["lora_unet_a_to_q"]
    assert adapter.rank == 4 and adapter.scale == 0.5
    up, down = factors["lora_unet_a_to_q"]
    torch.testing.assert_close(adapter.delta(torch.Size((24, 16)), "cpu"), 0.5 * up @ down)


def test_fused_merge_equals_sum_of_dense_deltas_with_negative_strengths():
    w = torch.randn(24, 16, dtype=torch.float64).float()
    loras = [parse_lora(lora_state_dict(low_rank_factors(SHAPES, 4 + i, seed=10 + i), alpha=3.0 + i), f"l{i}")
             for i in range(3)]
    terms = [Term(lora.adapters["lora_unet_a_to_q"], s) for lora, s in zip(loras, (0.8, -0.5, 1.3))]
    expected = w.double() + sum(t.strength * t.adapter.delta(w.shape, "cpu").double() for t in terms)
    got = apply_terms(w.clone(), terms)
    rel = (got.double() - expected).norm() / expected.norm()
    assert rel < 1e-6
    torch.testing.assert_close(dense_delta(terms, w.shape, "cpu"), (expected - w.double()).float(), rtol=1e-5,
                               atol=1e-6)


def test_merge_into_a_half_precision_slice_writes_in_place():
    w = torch.randn(72, 16).half()  # a fused qkv weight; the LoRA covers rows 24..47
    lora = parse_lora(lora_state_dict(low_rank_factors({"q": (24, 16)}, 4, seed=3), alpha=None), "x")
    view = w.narrow(0, 24, 24)
    before = w.clone()
    apply_terms(view, [Term(lora.adapters["q"], 1.0)])
    torch.testing.assert_close(w[:24], before[:24], rtol=0, atol=0)
    expected = (before[24:48].float() + lora.adapters["q"].delta(torch.Size((24, 16)), "cpu")).half()
    torch.testing.assert_close(w[24:48], expected, rtol=0, atol=1e-3)


def test_dora_follows_comfyui_weight_decompose():
    w = torch.randn(24, 16)
    up, down = low_rank_factors({"m": (24, 16)}, 4, seed=4)["m"]
    magnitude = torch.rand(24, 1) + 0.5
    lora = parse_lora({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(4.0),
                       "m.dora_scale": magnitude}, "dora")
    adapter = lora.adapters["m"]
    assert lora.kinds() == {"lora+dora": 1}
    got = apply_terms(w.clone(), [Term(adapter, 0.7)])
    calc = w + up @ down
    norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps  # core takes W's norm on this axis
    expected = w + 0.7 * (calc * (magnitude / norm) - w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_loha_and_lokr_deltas():
    g = torch.Generator().manual_seed(5)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((8, 2), (2, 6), (8, 2), (2, 6)))
    loha = LoHaAdapter.claim({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                              "alpha": torch.tensor(1.0)})
    torch.testing.assert_close(loha.delta(torch.Size((8, 6)), "cpu"), 0.5 * (w1a @ w1b) * (w2a @ w2b))
    k1, k2a, k2b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 2, generator=g)
    lokr = LoKrAdapter.claim({"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(1.0)})
    assert lokr.target_shape_2d() == (8, 6)
    torch.testing.assert_close(lokr.delta(torch.Size((8, 6)), "cpu"), 0.5 * torch.kron(k1, k2a @ k2b))


def test_bypass_output_equals_merged_weights_and_leaves_weights_alone():
    torch.manual_seed(6)
    layer = torch.nn.Linear(16, 24)
    lora = parse_lora(lora_state_dict(low_rank_factors(SHAPES, 4, seed=7), alpha=2.0), "x")
    terms = [Term(lora.adapters["lora_unet_a_to_q"], 0.9), Term(lora.adapters["lora_unet_a_to_k"], -0.4)]
    x = torch.randn(5, 16)
    merged = torch.nn.Linear(16, 24)
    merged.load_state_dict(layer.state_dict())
    with torch.no_grad():
        apply_terms(merged.weight, terms)
    before = layer.weight.detach().clone()
    layer.forward = BypassForward(layer, terms)
    torch.testing.assert_close(layer(x), merged(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.weight, before)


def test_bypass_on_a_fused_qkv_slice_only_moves_that_slice():
    torch.manual_seed(8)
    layer = torch.nn.Linear(16, 72)
    lora = parse_lora(lora_state_dict(low_rank_factors({"q": (24, 16)}, 4, seed=9), alpha=None), "x")
    x = torch.randn(3, 16)
    base = layer(x).detach()
    layer.forward = BypassForward(layer, [Term(lora.adapters["q"], 1.0)], offset=(0, 24, 24))
    out = layer(x)
    torch.testing.assert_close(out[:, :24], base[:, :24])
    torch.testing.assert_close(out[:, 48:], base[:, 48:])
    expected = base[:, 24:48] + x @ lora.adapters["q"].delta(torch.Size((24, 16)), "cpu").T
    torch.testing.assert_close(out[:, 24:48], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
     "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"),
    ("base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder_2.text_model.encoder.layers.3.mlp.fc1", "lora_te2_text_model_encoder_layers_3_mlp_fc1"),
])
def test_modern_peft_names_resolve_to_names_the_host_knows(name, expected):
    assert expected in candidate_names(name)
    assert resolve(name, {expected: "diffusion_model.x.weight"}) == (expected, "diffusion_model.x.weight")


def test_unknown_algorithm_modules_are_kept_for_the_host_not_dropped():
    lora = parse_lora({"m.diff": torch.zeros(4, 4), "n.oft_blocks": torch.zeros(2, 2, 2),
                       "junk_without_suffix": torch.zeros(1)}, "mixed")
    assert set(lora.foreign) == {"m", "n"} and lora.unrecognised == ["junk_without_suffix"]
    assert math.isclose(len(lora.adapters), 0)


@pytest.mark.parametrize("kernel,mid", [((1, 1), False), ((3, 3), False), ((3, 3), True)])
def test_conv_loras_patch_like_comfyui_and_measure_from_their_factors(kernel, mid):
    """Conv LoRAs (proj_in/out 1x1, LoCon 3x3, with or without a Tucker mid): the merge patch equals
    ComfyUI's formula (up.flatten(1) @ down.flatten(1), reshaped to the kernel, x alpha/rank), and
    their Frobenius norms and products come from the factors like linear ones."""
    from lora_core.stacking import frobenius
    g = torch.Generator().manual_seed(7)
    kh, kw = kernel
    sd = {"c.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g), "c.alpha": torch.tensor(2.0)}
    if mid:
        sd |= {"c.lora_down.weight": torch.randn(4, 6, 1, 1, generator=g),
               "c.lora_mid.weight": torch.randn(4, 4, kh, kw, generator=g)}
    else:
        sd["c.lora_down.weight"] = torch.randn(4, 6, kh, kw, generator=g)
    adapter = parse_lora(sd, "conv").adapters["c"]
    other = parse_lora({"c.lora_up.weight": torch.randn(8, 3, 1, 1, generator=g),
                        "c.lora_down.weight": torch.randn(3, 6, kh, kw, generator=g)}, "other").adapters["c"]
    weight = torch.randn(8, 6, kh, kw, generator=g)
    shape = weight.shape
    if mid:
        expected = adapter.delta(shape, "cpu")  # ComfyUI's LoCon contraction (see adapters)
    else:
        expected = (sd["c.lora_up.weight"].flatten(1) @ sd["c.lora_down.weight"].flatten(1)).reshape(shape) * 0.5
    terms = [Term(adapter, 0.8), Term(other, -0.3)]
    got = apply_terms(weight.clone(), terms) - weight
    want = 0.8 * expected - 0.3 * other.delta(shape, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (adapter.low_rank() is None) == mid
    dense = want.double().flatten()
    assert frobenius.terms_norm(terms) == pytest.approx(float(dense.norm()), rel=1e-6)
    assert frobenius.terms_inner(terms[:1], terms[1:]) == pytest.approx(
        float((0.8 * expected).double().flatten() @ (-0.3 * other.delta(shape, "cpu")).double().flatten()), rel=1e-6)
