"""The spectral cap (lora_core.stacking.spectral): a layer's change's top singular value, from the factors, capped
relative to the weight's; the fast stack path and the general one agree."""
import math

import pytest
import torch

from lora_core import LoHaAdapter, LowRankAdapter, Target, Term, apply_terms, match_lora, parse_lora
from lora_core.patching.block_weights import model_block_strengths, resolve_block_weights
from lora_core.stacking.clamping import cap_layers, layer_change_ratio
from lora_core.stacking.interference import plan_named
from lora_core.stacking.spectral import (
    LayerCore,
    WeightSpectra,
    core_top,
    spectral_cap_layers,
    terms_top,
    top_singular_value,
    top_singular_value_floor,
)
from lora_factory import lora_state_dict, low_rank_factors

ROWS, COLS = 48, 40


def low_rank(up, down, alpha=None):
    roles = {"up": up, "down": down}
    if alpha is not None:
        roles["alpha"] = torch.tensor(float(alpha))
    return LowRankAdapter.claim(roles)


def dense_top(terms, weight=None):
    if weight is not None:
        w = weight.double()
        changed = apply_terms(w.clone().float(), list(terms)).double()
        return float(torch.linalg.svdvals(changed - w)[0])
    total = sum(t.adapter.delta(torch.Size((ROWS, COLS)), "cpu", torch.float64) * float(t.strength) for t in terms)
    return float(torch.linalg.svdvals(total)[0])


def spiky_stack(seed=0):
    """Three rank-4 LoRAs that each carry the same rank-1 direction u v^T besides their own noise: together
    that direction piles up (a spike) while the whole change stays small in Frobenius norm."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(ROWS, 1, generator=g), torch.randn(1, COLS, generator=g)
    u, v = u / u.norm(), v / v.norm()
    adapters = []
    for _ in range(3):
        up = torch.randn(ROWS, 4, generator=g) * 0.02
        down = torch.randn(4, COLS, generator=g) * 0.02
        up[:, :1], down[:1] = u * 0.9, v * 0.9  # the shared direction, sigma 0.81 each
        adapters.append(low_rank(up, down, alpha=4.0))
    return adapters


def test_core_top_equals_the_dense_svd():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(ROWS, 7, generator=g, dtype=torch.float64), torch.randn(7, COLS, generator=g,
                                                                                    dtype=torch.float64)
    assert core_top(up, down) == pytest.approx(float(torch.linalg.svdvals(up @ down)[0]), rel=1e-12)
    terms = [Term(a, s) for a, s in zip(spiky_stack(), (0.7, -0.2, 0.5))]
    assert terms_top(terms) == pytest.approx(dense_top(terms), rel=1e-10)
    core = LayerCore([t.adapter.low_rank() for t in terms])
    assert core.top([0.7, -0.2, 0.5]) == pytest.approx(dense_top(terms), rel=1e-10)
    assert core.top([0.7, 0.0, 0.0]) == pytest.approx(dense_top(terms[:1]), rel=1e-10)


def test_floor_is_a_lower_bound_and_the_exact_value_is_the_svd():
    g = torch.Generator().manual_seed(2)
    for weight in (torch.randn(ROWS, COLS, generator=g), torch.randn(32, 16, 3, 3, generator=g),
                   torch.randn(ROWS, 1, generator=g) @ torch.randn(1, COLS, generator=g) + 0.01 * torch.randn(
                       ROWS, COLS, generator=g)):
        exact = float(torch.linalg.svdvals(weight.reshape(weight.shape[0], -1).double())[0])
        assert top_singular_value(weight) == pytest.approx(exact, rel=1e-5)
        assert top_singular_value_floor(weight) <= exact * (1 + 1e-6)
        assert top_singular_value_floor(weight) > 0.5 * exact
    reads = []
    weight = torch.randn(ROWS, COLS, generator=g)
    spectra = WeightSpectra(lambda t: reads.append(t) or weight)
    t = Target("diffusion_model.x.weight")
    assert spectra.floor(t) <= spectra.exact(t) and spectra.floor(t) == spectra.exact(t)  # the exact one, once known
    assert len(reads) == 2 and spectra.exact(t) and len(reads) == 2  # memoised


def test_a_planted_rank1_spike_is_brought_exactly_to_the_cap_and_other_layers_are_untouched():
    g = torch.Generator().manual_seed(3)
    spike, calm = Target("diffusion_model.spike.weight"), Target("diffusion_model.calm.weight")
    weights = {spike: torch.randn(ROWS, COLS, generator=g), calm: torch.randn(ROWS, COLS, generator=g)}
    spiky = [Term(a, 1.0) for a in spiky_stack()]
    quiet = [Term(low_rank(torch.randn(ROWS, 2, generator=g) * 0.05, torch.randn(2, COLS, generator=g) * 0.05), 1.0)]
    layers = {spike: spiky, calm: quiet}
    sigma_w = float(torch.linalg.svdvals(weights[spike].double())[0])
    cap = 0.15
    assert dense_top(spiky) / sigma_w > 0.15  # the spike: about 3 x 0.81 against sigma_1(W) ~ 13
    # ... that a Frobenius cap at the same share lets through: the whole change is small against ||W||_F
    assert layer_change_ratio(weights[spike], spiky) < cap
    assert cap_layers(layers, weights, cap)[1] == []

    new, capped = spectral_cap_layers(layers, weights, cap)
    assert [c.target for c in capped] == [spike]
    assert dense_top(new[spike]) / sigma_w == pytest.approx(cap, rel=1e-6)  # dense SVD of the capped change
    assert capped[0].ratio_after == cap and capped[0].ratio_before == pytest.approx(dense_top(spiky) / sigma_w,
                                                                                     rel=1e-6)
    assert new[calm][0] is quiet[0]  # untouched: the very same term
    # every term of the spiky layer scaled by one factor
    assert [t.strength for t in new[spike]] == pytest.approx([capped[0].factor] * 3)


def test_loha_and_dora_layers_reach_the_cap():
    g = torch.Generator().manual_seed(4)
    t = Target("diffusion_model.x.weight")
    weight = torch.randn(ROWS, COLS, generator=g) * 0.1
    loha = LoHaAdapter.claim({"hada_w1_a": torch.randn(ROWS, 2, generator=g),
                              "hada_w1_b": torch.randn(2, COLS, generator=g),
                              "hada_w2_a": torch.randn(ROWS, 2, generator=g),
                              "hada_w2_b": torch.randn(2, COLS, generator=g), "alpha": torch.tensor(2.0)})
    spiky = spiky_stack(5)
    new, capped = spectral_cap_layers({t: [Term(loha, 0.5), Term(spiky[0], 1.0)]}, {t: weight}, 0.2)
    sigma_w = float(torch.linalg.svdvals(weight.double())[0])
    assert capped and dense_top(new[t]) / sigma_w == pytest.approx(0.2, rel=1e-5)

    dora = LowRankAdapter.claim({"up": torch.randn(ROWS, 2, generator=g) * 0.3,
                                 "down": torch.randn(2, COLS, generator=g) * 0.3,
                                 "dora_scale": torch.rand(ROWS, 1, generator=g) + 0.5, "alpha": torch.tensor(2.0)})
    new, capped = spectral_cap_layers({t: [Term(dora, 1.0)]}, {t: weight}, 0.3)
    assert capped and dense_top(new[t], weight) / sigma_w == pytest.approx(0.3, rel=1e-4)


def _matches():
    keys = {"lora_unet_q": "diffusion_model.input_blocks.1.1.q.weight",
            "lora_unet_k": "diffusion_model.output_blocks.3.1.k.weight",
            "lora_te_q": "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    host = {key: torch.Size((ROWS, COLS)) for key in keys.values()}
    out = []
    for seed, modules in enumerate((["lora_unet_q", "lora_unet_k", "lora_te_q"], ["lora_unet_q", "lora_unet_k"],
                                    ["lora_unet_q", "lora_te_q"])):
        factors = low_rank_factors({m: (ROWS, COLS) for m in modules}, 3, seed=70 + seed, scale=0.6)
        lora = parse_lora(lora_state_dict(factors, alpha=3.0), f"l{seed}")
        out.append((f"row {seed + 1}: l{seed}", match_lora(lora, keys, host, {"model", "clip"})))
    return keys, out


@pytest.mark.parametrize("with_blocks", [False, True])
def test_fast_stack_path_equals_the_general_functions(with_blocks):
    from lora_core.stacking.stack_analysis import analyse, stack_shape
    keys, entries = _matches()
    g = torch.Generator().manual_seed(6)
    weights = {Target(k): torch.randn(ROWS, COLS, generator=g) * 0.2 for k in keys.values()}
    norms = {t: float(w.norm()) for t, w in weights.items()}
    strengths = [(0.9, 0.7), (-0.6, 0.0), (0.8, 0.5)]
    if with_blocks:  # row 1 with OUT03 doubled and BASE (text encoder) halved
        w = resolve_block_weights("0.5,1,2", [p.target.key for p in entries[0][1].patches])
        strengths[0] = (0.9, 0.7 * 0.5, model_block_strengths(w, 0.9))
    applied = [(name, match, *s) for (name, match), s in zip(entries, strengths)]
    layers, names = plan_named(applied)
    layers, capped = cap_layers(layers, weights, 0.6, norms.get)
    layers, spectral = spectral_cap_layers(layers, weights, 0.5)

    fast = analyse(stack_shape(entries), strengths, cap=0.6, weight_norms=norms.get, spectral_cap=0.5,
                   spectra=WeightSpectra(lambda t: weights[t]))
    assert spectral and [c.target for c in fast.spectral] == [c.target for c in spectral]
    assert [c.ratio_before for c in fast.spectral] == pytest.approx([c.ratio_before for c in spectral], rel=1e-9)
    assert list(fast.layers) == list(layers)
    for target, terms in layers.items():
        assert [t.strength for t in fast.layers[target]] == pytest.approx([t.strength for t in terms], rel=1e-9)
        assert dense_top(fast.layers[target]) <= 0.5 * float(torch.linalg.svdvals(weights[target].double())[0]) * (
            1 + 1e-6)
    if with_blocks:
        out3 = Target(keys["lora_unet_k"])
        # row 1's OUT03 layer planned at 0.9 x 2 before any cap
        plain, _ = plan_named(applied)
        assert plain[out3][0].strength == pytest.approx(1.8)
    assert not math.isnan(sum(c.factor for c in fast.spectral))
