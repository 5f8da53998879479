"""lora_core stacking math: the StackLoRA clamp rules, per-layer overlap, decorrelation, the heatmap."""
import math

import pytest
import torch
import torch.nn.functional as F

from lora_core import LoHaAdapter, Target, Term, apply_terms, dense_delta, match_lora, parse_lora, plan_layers
from lora_core.stacking.clamping import (
    DEFAULT_BUDGET,
    DEFAULT_LAYER_CAP,
    DEFAULT_USE_BUDGET,
    DEFAULT_USE_LAYER_CAP,
    DEFAULT_WEIGHT_MAX,
    DEFAULT_WEIGHT_MIN,
    ClampSettings,
    StackEntry,
    cap_layers,
    clamp_strengths,
    layer_change_ratio,
)
from lora_core.stacking.heatmap import colour_of, heatmap_layout, render_heatmap
from lora_core.stacking.interference import (
    block_of,
    block_table,
    by_lora,
    decorrelate,
    pair_cosines,
    plan_named,
    top_overlaps,
)
from lora_factory import lora_state_dict, low_rank_factors

SHAPES = {"q": (24, 16), "k": (24, 16)}
Q, K = Target("diffusion_model.q.weight"), Target("diffusion_model.k.weight")


def make_lora(seed, rank=4, alpha=None, shapes=SHAPES, name=None):
    return parse_lora(lora_state_dict(low_rank_factors(shapes, rank, seed=seed), alpha=alpha), name or f"l{seed}")


def make_loha(seed, shape=(24, 16), rank=2):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    return LoHaAdapter.claim({"hada_w1_a": torch.randn(rows, rank, generator=g) * 0.1,
                              "hada_w1_b": torch.randn(rank, cols, generator=g) * 0.1,
                              "hada_w2_a": torch.randn(rows, rank, generator=g) * 0.1,
                              "hada_w2_b": torch.randn(rank, cols, generator=g) * 0.1,
                              "alpha": torch.tensor(1.0)})


def dense(terms, shape=(24, 16)):
    return dense_delta(terms, torch.Size(shape), "cpu", torch.float64)


def strengths(rows):
    return [(r.effective_model, r.effective_clip) for r in rows]


# ---------------------------------------------------------------- rules 1 and 2

def test_defaults_are_the_documented_ones():
    s = ClampSettings()
    assert (s.weight_min, s.weight_max, s.budget, s.layer_cap) == (-1.0, 1.0, 1.5, 0.10)
    assert (DEFAULT_WEIGHT_MIN, DEFAULT_WEIGHT_MAX, DEFAULT_BUDGET, DEFAULT_LAYER_CAP) == (-1.0, 1.0, 1.5, 0.10)
    assert s.clamp_weights and s.use_budget and s.use_layer_cap  # a ClampSettings built in code: every rule on
    assert not DEFAULT_USE_BUDGET and not DEFAULT_USE_LAYER_CAP    # Stack LoRA's widgets: measured on the toy world


def test_weight_range_alone_clips_each_strength_including_negative_ones():
    rows = clamp_strengths([StackEntry("a", 1.4, -1.7, True), StackEntry("b", -0.3, 0.9, True)],
                           ClampSettings(use_budget=False))
    assert strengths(rows) == [(1.0, -1.0), (-0.3, 0.9)]
    assert (rows[0].requested_model, rows[0].requested_clip) == (1.4, -1.7)
    assert any("1.4 clamped to 1" in n for n in rows[0].notes)
    assert any("-1.7 clamped to -1" in n for n in rows[0].notes)
    assert rows[1].notes == []


def test_budget_alone_scales_all_weights_in_proportion():
    # model: |2| + |-1| = 3 > 1.5 -> x0.5; clip: 0.5 + 0.5 = 1 <= 1.5 -> untouched.
    rows = clamp_strengths([StackEntry("a", 2.0, 0.5, True), StackEntry("b", -1.0, 0.5, True)],
                           ClampSettings(clamp_weights=False))
    assert strengths(rows) == [(1.0, 0.5), (-0.5, 0.5)]
    assert rows[0].effective_model / rows[1].effective_model == -2.0  # ratios kept
    assert any("scaled by 0.5" in n and "sum |w| = 3" in n for n in rows[0].notes)


def test_all_rules_together_with_a_disabled_row():
    rows = clamp_strengths([StackEntry("a", 1.4, 0.9, True), StackEntry("b", -0.8, -0.9, True),
                            StackEntry("c", 0.6, 0.6, False)])
    # Rule 1: a's model 1.4 -> 1.0. Rule 2, model: |1.0| + |-0.8| = 1.8 > 1.5 -> x 1.5/1.8 = 5/6;
    # clip: 0.9 + 0.9 = 1.8 -> x 5/6 as well. c is disabled: 0, and it does not count.
    expected = [(5 / 6, 0.75), (-0.8 * 5 / 6, -0.75), (0.0, 0.0)]
    for got, want in zip(strengths(rows), expected):
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert sum(abs(r.effective_model) for r in rows) == pytest.approx(1.5, rel=1e-12)
    assert rows[2].notes == ["disabled: contributes nothing"] and [r.enabled for r in rows] == [True, True, False]
    assert (rows[2].requested_model, rows[2].requested_clip) == (0.6, 0.6)


def test_no_rule_changes_a_stack_within_limits():
    entries = [StackEntry("a", 0.7, 0.6, True), StackEntry("b", -0.7, 0.2, True)]
    rows = clamp_strengths(entries)
    assert strengths(rows) == [(0.7, 0.6), (-0.7, 0.2)] and all(r.notes == [] for r in rows)


@pytest.mark.parametrize("model,clip,field", [(math.nan, 0.5, "strength_model"), (0.5, math.inf, "strength_clip"),
                                              (-math.inf, 0.5, "strength_model")])
def test_non_finite_strengths_name_the_row(model, clip, field):
    entries = [StackEntry("ok", 0.5, 0.5, True), StackEntry("broken.safetensors", model, clip, True)]
    with pytest.raises(ValueError, match=rf"row 2 \('broken.safetensors'\): {field}"):
        clamp_strengths(entries)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(weight_min=0.5, weight_max=-0.5), "weight_min \\(0.5\\) is above weight_max \\(-0.5\\)"),
    (dict(weight_max=math.nan), "weight_max must be a finite number, got nan"),
    (dict(budget=0.0), "budget must be a finite number above 0, got 0.0"),
    (dict(budget=math.inf), "budget .* got inf"),
    (dict(layer_cap=-0.1), "layer_cap .* got -0.1"),
])
def test_bad_settings_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ClampSettings(**kwargs).validate()


def test_settings_of_a_rule_that_is_off_are_not_checked():
    ClampSettings(budget=0.0, use_budget=False, layer_cap=math.nan, use_layer_cap=False).validate()


# ---------------------------------------------------------------- rule 3: per-layer change

def three_terms(layer="q"):
    loras = [make_lora(10 + i, rank=4 + i, alpha=3.0 + i) for i in range(3)]
    return [Term(lora.adapters[layer], s) for lora, s in zip(loras, (0.8, -0.5, 1.3))]


def test_layer_change_ratio_equals_dense_math():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    terms = three_terms()
    expected = dense(terms).norm() / w.double().norm()
    assert layer_change_ratio(w, terms) == pytest.approx(float(expected), rel=1e-5)
    # A half-precision weight is measured the same way (its norm taken in fp32).
    assert layer_change_ratio(w.half(), terms) == pytest.approx(float(dense(terms).norm() / w.half().double().norm()),
                                                                rel=1e-5)


def test_layer_change_ratio_with_a_dense_fallback_term_and_cancelling_terms():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    terms = three_terms() + [Term(make_loha(3), -0.7)]
    expected = dense(terms).norm() / w.double().norm()
    assert layer_change_ratio(w, terms) == pytest.approx(float(expected), rel=1e-5)
    lora = make_lora(4)
    cancelling = [Term(lora.adapters["q"], 0.9), Term(lora.adapters["q"], -0.9)]
    assert layer_change_ratio(w, cancelling) == pytest.approx(0.0, abs=1e-12)


def test_layer_change_ratio_rejects_a_weight_of_another_size():
    with pytest.raises(ValueError, match=r"\(24, 16\) but the weight is \(16, 16\)"):
        layer_change_ratio(torch.ones(16, 16), three_terms())


def test_cap_layers_brings_an_over_cap_layer_exactly_to_the_cap_and_leaves_others_alone():
    g = torch.Generator().manual_seed(2)
    big_terms, small_terms = three_terms("q"), [Term(make_lora(20).adapters["k"], 0.3)]
    w_q = torch.randn(24, 16, generator=g) * 0.1   # ||dW|| / ||W|| well above 10% here
    w_k = torch.randn(24, 16, generator=g) * 50.0  # and far below it here
    before_q = float(dense(big_terms).norm() / w_q.double().norm())
    assert before_q > 0.1 and float(dense(small_terms).norm() / w_k.double().norm()) < 0.1

    layers = {Q: big_terms, K: small_terms}
    new, capped = cap_layers(layers, {Q.key: w_q, K: w_k}, 0.1)  # weights by key or by Target
    ratio_after = float(dense(new[Q]).norm() / w_q.double().norm())
    assert ratio_after == pytest.approx(0.1, rel=1e-5)
    factor = 0.1 / before_q
    for old, term in zip(big_terms, new[Q]):
        assert term.adapter is old.adapter and term.strength == pytest.approx(old.strength * factor, rel=1e-5)
    assert len(capped) == 1 and capped[0].target == Q
    assert capped[0].ratio_before == pytest.approx(before_q, rel=1e-5) and capped[0].ratio_after == pytest.approx(0.1)
    # The layer under the cap keeps its very terms, strengths bit for bit.
    assert all(a is b for a, b in zip(new[K], small_terms)) and [t.strength for t in new[K]] == [0.3]
    assert layers[Q] is big_terms and [t.strength for t in big_terms] == [0.8, -0.5, 1.3]  # input untouched


def test_cap_layers_on_a_fused_slice_and_with_a_weight_function():
    fused = torch.randn(72, 16, generator=torch.Generator().manual_seed(3)) * 0.3
    target = Target("diffusion_model.qkv.weight", (0, 24, 24))
    terms = three_terms("q")
    new, capped = cap_layers({target: terms}, lambda t: fused, 0.05)
    assert len(capped) == 1
    assert float(dense(new[target]).norm() / fused[24:48].double().norm()) == pytest.approx(0.05, rel=1e-5)
    with pytest.raises(ValueError, match="no host weight given for layer 'diffusion_model.k.weight'"):
        cap_layers({K: terms}, {}, 0.1)
    with pytest.raises(ValueError, match="layer cap .* got 0"):
        cap_layers({K: terms}, {}, 0)


def test_cap_layers_on_a_dora_layer_reaches_the_cap():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 16, generator=g)
    up, down = low_rank_factors({"m": (24, 16)}, 4, seed=5, scale=0.6)["m"]
    dora = parse_lora({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.alpha": torch.tensor(4.0),
                       "m.dora_scale": w.norm(dim=1, keepdim=True) * 1.3}, "dora").adapters["m"]
    terms = [Term(make_lora(6).adapters["q"], 0.9), Term(dora, 1.0)]
    assert layer_change_ratio(w, terms) > 0.1
    new, capped = cap_layers({Q: terms}, {Q: w}, 0.1)
    true_change = (apply_terms(w.clone(), new[Q]) - w).double().norm() / w.double().norm()
    assert float(true_change) == pytest.approx(0.1, rel=1e-4) and capped[0].ratio_after == pytest.approx(0.1, rel=1e-4)


# ---------------------------------------------------------------- overlap between LoRAs

def dense_cosine(a, b):
    return float(F.cosine_similarity(dense(a).flatten(), dense(b).flatten(), dim=0))


def test_pair_cosines_equal_dense_cosines():
    a, b, c = make_lora(30, rank=4, alpha=2.0), make_lora(31, rank=6, alpha=8.0), make_lora(32, rank=2)
    d = make_lora(33, rank=3)
    loha = make_loha(34)
    per_lora = {
        "a": {Q: Term(a.adapters["q"], 0.8), K: Term(a.adapters["k"], 1.0)},
        "b": {Q: [Term(b.adapters["q"], -0.6), Term(a.adapters["q"], 0.5)], K: Term(b.adapters["k"], 0.7)},
        "c": {Q: [Term(c.adapters["q"], 1.1), Term(loha, -0.9)]},  # dense fallback mixed in
        "d": {Q: Term(d.adapters["q"], 0.4)},
    }
    overlaps = pair_cosines(per_lora)
    got = {(o.target, o.lora_a, o.lora_b): o.cosine for o in overlaps}
    assert len(got) == 6 + 1  # four LoRAs on q (6 pairs), two on k

    def terms(name, t):
        v = per_lora[name][t]
        return [v] if isinstance(v, Term) else v

    for (target, x, y), cos in got.items():
        assert cos == pytest.approx(dense_cosine(terms(x, target), terms(y, target)), rel=1e-5, abs=1e-7)
    assert got[(Q, "a", "b")] > 0.15  # b carries some of a: they do overlap
    assert [o.cosine for o in top_overlaps(overlaps, 3)] == sorted(got.values(), key=abs, reverse=True)[:3]


def test_plan_named_and_block_table_group_layers_by_block():
    keys = {"lora_unet_in_q": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "lora_unet_in_k": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
            "lora_unet_mid_q": "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"}
    shapes = {k: (24, 16) for k in keys}
    host_shapes = {v: torch.Size((24, 16)) for v in keys.values()}
    a = make_lora(40, shapes=shapes, name="a")
    b = make_lora(41, shapes={"lora_unet_in_q": (24, 16), "lora_unet_in_k": (24, 16)}, name="b")
    c = make_lora(42, shapes={"lora_unet_mid_q": (24, 16)}, name="c")
    matches = [match_lora(lora, keys, host_shapes, {"model"}) for lora in (a, b, c)]
    layers, names = plan_named([("a", matches[0], 0.8, 1.0), ("b", matches[1], -0.5, 1.0),
                                ("c", matches[2], 0.6, 1.0)])
    assert sum(len(v) for v in layers.values()) == 6 and all(len(names[t]) == len(layers[t]) for t in layers)
    overlaps = pair_cosines(by_lora(layers, names))
    assert len(overlaps) == 3  # a x b on the two input_blocks.1 layers, a x c on the middle block
    rows, cols, values = block_table(overlaps)
    assert rows == ["a x b", "a x c"] and cols == ["input_blocks.1", "middle_block"]
    assert math.isnan(values[0][1]) and math.isnan(values[1][0])  # no shared layer there
    # The block's value is the cosine of the pair's whole change to that block.
    in_keys = [t for t in layers if "input_blocks" in t.key]
    da = torch.cat([dense(layers[t][:1]).flatten() for t in in_keys])
    db = torch.cat([dense(layers[t][1:2]).flatten() for t in in_keys])
    assert values[0][0] == pytest.approx(float(F.cosine_similarity(da, db, dim=0)), rel=1e-5)
    with pytest.raises(ValueError, match="has 2 terms but 1 LoRA names"):
        by_lora(layers, {t: v[:1] for t, v in names.items()})


def test_decorrelate_halves_two_identical_loras_and_their_sum_is_one_at_full_strength():
    a, b = make_lora(50, alpha=2.0, name="a"), make_lora(50, alpha=2.0, name="b")  # same file, loaded twice
    layers = {Q: [Term(a.adapters["q"], 0.8), Term(b.adapters["q"], 0.8)]}
    new, scaled = decorrelate(layers, {Q: ["a", "b"]})
    assert [t.strength for t in new[Q]] == pytest.approx([0.4, 0.4], rel=1e-12)
    assert {(s.lora, round(s.factor, 12), round(s.overlap, 12)) for s in scaled} == {("a", 0.5, 1.0), ("b", 0.5, 1.0)}
    assert float((dense(new[Q]) - dense([Term(a.adapters["q"], 0.8)])).abs().max()) < 1e-12


def test_decorrelate_leaves_orthogonal_and_opposed_loras_alone():
    fa, fb = low_rank_factors({"q": (24, 16)}, 4, seed=60), low_rank_factors({"q": (24, 16)}, 4, seed=61)
    fa["q"][0][12:] = 0  # a writes only rows 0..11, b only rows 12..23: orthogonal deltas
    fb["q"][0][:12] = 0
    a, b = parse_lora(lora_state_dict(fa, None), "a"), parse_lora(lora_state_dict(fb, None), "b")
    layers = {Q: [Term(a.adapters["q"], 0.9), Term(b.adapters["q"], 0.7)]}
    new, scaled = decorrelate(layers, {Q: ["a", "b"]})
    assert scaled == [] and all(x is y for x, y in zip(new[Q], layers[Q]))
    assert pair_cosines({"a": {Q: layers[Q][0]}, "b": {Q: layers[Q][1]}})[0].cosine == pytest.approx(0.0, abs=1e-12)
    # The same LoRA at +s and -s points the opposite way (cosine -1): not piling up, left alone too.
    opposed = {K: [Term(a.adapters["q"], 0.9), Term(a.adapters["q"], -0.4)]}
    new, scaled = decorrelate(opposed, {K: ["x", "y"]})
    assert scaled == [] and [t.strength for t in new[K]] == [0.9, -0.4]


def test_decorrelate_three_loras_uses_only_positive_cosines():
    a, b = make_lora(70, name="a"), make_lora(71, name="b")
    terms = [Term(a.adapters["q"], 1.0), Term(a.adapters["q"], 1.0), Term(b.adapters["q"], 1.0)]
    names = ["x", "y", "z"]
    cos_xz = dense_cosine(terms[:1], terms[2:])
    new, _ = decorrelate({Q: terms}, {Q: names})
    pos = max(cos_xz, 0.0)
    want = [1 / (1 + 1 + pos), 1 / (1 + 1 + pos), 1 / (1 + 2 * pos)]
    assert [t.strength for t in new[Q]] == pytest.approx(want, rel=1e-5)


def test_decorrelate_takes_per_lora_plans_and_reuses_given_overlaps():
    keys = {p: f"diffusion_model.input_blocks.1.1.{p}.weight" for p in SHAPES}
    host_shapes = {v: torch.Size(SHAPES[p]) for p, v in keys.items()}
    a, b = make_lora(80, alpha=2.0, name="a"), make_lora(80, alpha=2.0, name="b")  # the same file twice
    applied = [(match_lora(lora, keys, host_shapes, {"model"}), s, 1.0) for lora, s in ((a, 0.9), (b, 0.6))]
    layers = plan_layers(applied)
    per_lora = {"a": plan_layers(applied[:1]), "b": plan_layers(applied[1:])}
    overlaps = pair_cosines(per_lora)
    by_names = decorrelate(layers, plan_named([("a", *applied[0]), ("b", *applied[1])])[1])
    by_plans = decorrelate(layers, per_lora, overlaps)
    for target in layers:
        assert [t.strength for t in by_plans[0][target]] == pytest.approx([t.strength for t in by_names[0][target]],
                                                                            rel=1e-12)
    assert len(by_plans[1]) == len(by_names[1]) == 4  # both LoRAs on both layers
    assert [t.strength for t in by_plans[0][next(iter(layers))]] == pytest.approx([0.45, 0.3], rel=1e-12)
    with pytest.raises(ValueError, match="do not line up with the per-LoRA plans"):
        decorrelate(layers, {"b": per_lora["b"], "a": per_lora["a"]})


@pytest.mark.parametrize("key,block", [
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1"),
    ("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block"),
    ("diffusion_model.output_blocks.3.1.proj_in.weight", "output_blocks.3"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "double_blocks.0"),
    ("diffusion_model.single_blocks.37.linear1.weight", "single_blocks.37"),
    ("diffusion_model.joint_blocks.4.x_block.attn.qkv.weight", "joint_blocks.4"),
    ("diffusion_model.time_embed.0.weight", "time_embed"),
    ("clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight", "clip_l.layers.1"),
    ("clip_g.transformer.text_model.encoder.layers.30.mlp.fc1.weight", "clip_g.layers.30"),
    ("t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight", "t5xxl.block.3"),
    ("clip_l.transformer.text_projection.weight", "clip_l.text_projection"),
])
def test_block_of(key, block):
    assert block_of(key) == block


# ---------------------------------------------------------------- heatmap

def test_pair_products_are_memoised_and_strengths_still_count(monkeypatch):
    """A re-run with other strengths takes every <dW_a, dW_b> from the memo (no factor pass), and the
    cosines and layer ratios still equal the dense math at the new strengths, signs included."""
    from lora_core.stacking import frobenius
    a, b = make_lora(60, rank=4, alpha=2.0), make_lora(61, rank=3)
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(62)) * 0.2

    def run(sa, sb):
        per_lora = {"a": {Q: Term(a.adapters["q"], sa)}, "b": {Q: Term(b.adapters["q"], sb)}}
        (overlap,) = pair_cosines(per_lora)
        terms = [Term(a.adapters["q"], sa), Term(b.adapters["q"], sb)]
        return overlap, terms, layer_change_ratio(w, terms)

    run(1.0, 1.0)
    calls = []
    real_inner = frobenius.inner
    monkeypatch.setattr(frobenius, "inner", lambda x, y: calls.append(1) or real_inner(x, y))
    for sa, sb in ((0.7, 0.3), (0.7, -0.3), (-1.2, 0.5)):
        overlap, terms, ratio = run(sa, sb)
        assert overlap.cosine == pytest.approx(dense_cosine([terms[0]], [terms[1]]), rel=1e-6)
        assert ratio == pytest.approx(float(dense(terms).norm() / w.double().norm()), rel=1e-6)
    assert calls == []
    assert run(0.7, 0.3)[0].cosine == pytest.approx(-run(0.7, -0.3)[0].cosine, rel=1e-12)


def test_cap_layers_with_known_norms_reads_no_weight():
    terms = three_terms("q")
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(63)) * 0.1
    expected, _ = cap_layers({Q: terms}, {Q: w}, 0.1)
    norm = float(torch.linalg.vector_norm(w))
    new, capped = cap_layers({Q: terms}, {}, 0.1, weight_norms=lambda t: norm)  # {}: a weight read would raise
    assert len(capped) == 1
    assert [t.strength for t in new[Q]] == pytest.approx([t.strength for t in expected[Q]], rel=1e-6)


def test_heatmap_redraws_nothing_for_the_same_table_and_hands_out_copies():
    rows, cols, values = ["a x b"], ["input_blocks.1", "middle_block"], [[0.4, math.nan]]
    first = render_heatmap(rows, cols, values)
    first.zero_()  # a downstream node writing into its input must not spoil the next run's image
    second = render_heatmap(rows, cols, values)
    assert float(second.max()) > 0.5 and not torch.equal(first, second)
    assert torch.equal(second, render_heatmap(rows, cols, [[0.4, math.nan]]))
    assert not torch.equal(second, render_heatmap(rows, cols, [[-0.4, math.nan]]))


def test_heatmap_is_an_image_tensor_with_a_diverging_map():
    rows, cols = ["a x b", "a x c"], ["input_blocks.1", "middle_block", "output_blocks.3"]
    values = [[0.9, -0.9, math.nan], [0.0, 0.5, -0.2]]
    image = render_heatmap(rows, cols, values)
    layout = heatmap_layout(rows, cols)
    assert image.shape == (1, layout.height, layout.width, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0

    def centre(img, r, c):
        x0, y0, x1, y1 = layout.cell_box(r, c)
        return img[0, (y0 + y1) // 2, (x0 + x1) // 2]

    plain = render_heatmap(rows, cols, values, show_values=False)
    red, blue, grey = centre(plain, 0, 0), centre(plain, 0, 1), centre(plain, 0, 2)
    assert red[0] - red[2] > 0.4 and blue[2] - blue[0] > 0.4 and red[0] > blue[0]
    assert torch.allclose(grey, torch.tensor(colour_of(math.nan), dtype=torch.float32) / 255, atol=1e-6)
    # With values printed the cells keep their colour around the text.
    x0, y0, x1, y1 = layout.cell_box(0, 0)
    cell = image[0, y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3).mean(0)
    assert cell[0] > cell[2] + 0.3 and not torch.equal(image, plain)


def test_heatmap_wraps_many_blocks_and_checks_its_table():
    cols = [f"single_blocks.{i}" for i in range(60)]
    image = render_heatmap(["a x b"], cols, [[0.1] * 60])
    assert image.shape[2] <= 1600 and len(heatmap_layout(["a x b"], cols).panel_tops) >= 2
    with pytest.raises(ValueError, match=r"values are \(1, 59\) but there are 1 rows and 60 columns"):
        render_heatmap(["a x b"], cols, [[0.1] * 59])
    empty = render_heatmap([], [], [])
    assert empty.shape[0] == 1 and empty.shape[3] == 3


# ---------------------------------------------------------------- the fast stack analysis

STACK_KEYS = {"lora_unet_q": "diffusion_model.input_blocks.1.1.q.weight",
              "lora_unet_k": "diffusion_model.input_blocks.1.1.k.weight",
              "lora_unet_v": "diffusion_model.middle_block.1.v.weight",
              "lora_te_q": "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}


def _stack_matches():
    from lora_core import match_lora
    host = {key: torch.Size((24, 16)) for key in STACK_KEYS.values()}
    covers = {"a": ["lora_unet_q", "lora_unet_k", "lora_unet_v", "lora_te_q"], "b": ["lora_unet_k", "lora_unet_q"],
              "c": ["lora_unet_v", "lora_unet_q", "lora_te_q"], "d": ["lora_unet_k", "lora_te_q"]}
    out = []
    for seed, (name, modules) in enumerate(covers.items()):
        lora = make_lora(90 + seed, rank=2 + seed, alpha=2.0, shapes={m: (24, 16) for m in modules}, name=name)
        out.append((f"row {seed + 1}: {name}", match_lora(lora, STACK_KEYS, host, {"model", "clip"})))
    return out


@pytest.mark.parametrize("decor", [False, True])
@pytest.mark.parametrize("strengths", [
    [(1.0, 1.0), (0.8, -0.5), (-0.6, 0.7), (0.4, 0.0)],
    [(0.0, 0.9), (0.7, 0.7), (0.7, -0.7), (-1.0, 0.3)],  # row 1 off on MODEL: other layers come first
])
def test_stack_analysis_equals_the_general_functions(decor, strengths):
    """Stack LoRA's fast path gives what plan_named + pair_cosines + decorrelate + cap_layers give:
    the same terms, names, overlaps, decorrelation and capped layers, in the same orders. Its values
    agree to 1e-6: its Gram products are fp32, the general functions' fp64 (frobenius.gram)."""
    from lora_core.stacking.stack_analysis import analyse, stack_shape
    REL = 1e-6
    entries = _stack_matches()
    norms = {t: 0.02 + 0.5 * i for i, t in enumerate(Target(k) for k in STACK_KEYS.values())}
    applied = [(name, match, sm, sc) for (name, match), (sm, sc) in zip(entries, strengths)]
    layers, names = plan_named(applied)
    overlaps = pair_cosines(by_lora(layers, names))
    decorrelated = []
    if decor:
        layers, decorrelated = decorrelate(layers, names, overlaps)
    layers, capped = cap_layers(layers, {}, 0.3, weight_norms=norms.get)

    shape = stack_shape(entries)
    assert shape is not None and stack_shape(entries) is shape  # memoised per composition
    fast = analyse(shape, strengths, decorrelate=decor, cap=0.3, weight_norms=norms.get)
    assert list(fast.layers) == list(layers) and fast.names == names
    for target, terms in layers.items():
        assert [t.adapter for t in fast.layers[target]] == [t.adapter for t in terms]
        assert [t.strength for t in fast.layers[target]] == pytest.approx([t.strength for t in terms], rel=REL)
    assert [o[:3] for o in fast.overlaps] == [o[:3] for o in overlaps]
    assert [v for o in fast.overlaps for v in o[3:]] == pytest.approx([v for o in overlaps for v in o[3:]],
                                                                     rel=REL)
    assert [(d.target, d.lora) for d in fast.decorrelated] == [(d.target, d.lora) for d in decorrelated]
    assert [v for d in fast.decorrelated for v in (d.factor, d.overlap)] == pytest.approx(
        [v for d in decorrelated for v in (d.factor, d.overlap)], rel=REL)
    assert [(c.target, c.ratio_after) for c in fast.capped] == [(c.target, c.ratio_after) for c in capped]
    assert [c.ratio_before for c in fast.capped] == pytest.approx([c.ratio_before for c in capped], rel=REL)
    assert capped and (decorrelated or not decor)  # the cases exercise both rules


def test_stack_analysis_declines_stacks_outside_its_form():
    from lora_core.stacking.stack_analysis import stack_shape
    entries = _stack_matches()
    loha_match = entries[0][1]
    patch = loha_match.patches[0]
    import dataclasses
    odd = dataclasses.replace(loha_match, patches=[dataclasses.replace(patch, adapter=make_loha(5))])
    assert stack_shape([entries[1], ("row 9: loha", odd)]) is None
    twice = dataclasses.replace(loha_match, patches=[patch, patch])
    assert stack_shape([("row 9: twice", twice)]) is None


# ---------------------------------------------------------------- the fast analysis on a strength change

STACK_NORMS = {Target(k): 0.02 + 0.5 * i for i, k in enumerate(STACK_KEYS.values())}
# A slider dragged: the sizes change, the signs stay (the last row ends 0 on CLIP throughout).
SAME_SIGNS = [
    [(1.0, 1.0), (0.8, -0.5), (-0.6, 0.7), (0.4, 0.0)],
    [(0.9, 0.3), (0.25, -0.9), (-0.2, 0.1), (1.3, 0.0)],
    [(0.5, 0.6), (0.7, -0.2), (-0.9, 0.4), (0.05, 0.0)],
]
FLIPPED = [(-1.0, 1.0), (0.8, 0.5), (-0.6, 0.7), (0.0, 0.3)]


def _no_nan(table):
    rows, cols, values = table
    return rows, cols, [[None if math.isnan(v) else v for v in line] for line in values]


def _everything(analysis):
    """All a Stack LoRA run reads of an analysis, floats as they are."""
    return ({t: [(term.adapter, term.strength) for term in terms] for t, terms in analysis.layers.items()},
            list(analysis.layers), analysis.names, analysis.top_overlaps(5), _no_nan(analysis.block_table()),
            analysis.overlaps, analysis.decorrelated, analysis.capped, analysis.plain)


def test_a_strength_change_reuses_what_the_signs_of_the_strengths_determine(monkeypatch):
    """Strengths that keep their signs build no new pattern (plan order, pairs, cosines, ranking, block
    table) and no LayerOverlap list; a sign change builds one, and going back reuses the first."""
    from lora_core import caches
    from lora_core.stacking import stack_analysis as sa
    caches.clear("stack_shapes")
    built, tables, lists = [], [], []

    class Counted(sa._Pattern):
        def __init__(self, shape, signs):
            built.append(signs)
            super().__init__(shape, signs)
    monkeypatch.setattr(sa, "_Pattern", Counted)
    real_table, real_all = sa.block_table, sa._PatternOverlaps.all
    monkeypatch.setattr(sa, "block_table", lambda overlaps: tables.append(1) or real_table(overlaps))
    monkeypatch.setattr(sa._PatternOverlaps, "all", lambda self: lists.append(1) or real_all(self))

    shape = sa.stack_shape(_stack_matches())
    for strengths in SAME_SIGNS:
        analysis = sa.analyse(shape, strengths, cap=0.3, weight_norms=STACK_NORMS.get)
        assert analysis.plain and analysis.top_overlaps(5) and analysis.block_table()[0]
    assert (len(built), len(tables), len(lists)) == (1, 1, 0)
    sa.analyse(shape, FLIPPED, cap=0.3, weight_norms=STACK_NORMS.get).block_table()
    assert (len(built), len(tables), len(lists)) == (2, 2, 0)
    sa.analyse(shape, SAME_SIGNS[1], cap=0.3, weight_norms=STACK_NORMS.get).block_table()
    assert (len(built), len(tables), len(lists)) == (2, 2, 0) and list(shape.patterns) == [built[1], built[0]]
    sa.analyse(shape, SAME_SIGNS[0], decorrelate=True)  # decorrelate reads the cosines at its strengths
    assert len(built) == 2 and lists


@pytest.mark.parametrize("decor", [False, True])
def test_a_strength_change_gives_exactly_what_a_cold_analysis_gives(decor):
    """Every strength set, analysed after the others (memos filled), equals its analysis by a fresh shape,
    float for float; the ranking and block table kept per pattern equal those of the overlap list."""
    from lora_core import caches
    from lora_core.stacking import stack_analysis as sa
    entries = _stack_matches()
    runs = SAME_SIGNS + [FLIPPED] + SAME_SIGNS[::-1]
    caches.clear("stack_shapes")
    shape = sa.stack_shape(entries)
    warm = [_everything(sa.analyse(shape, s, decor, 0.3, STACK_NORMS.get)) for s in runs]
    for strengths, got in zip(runs, warm):
        caches.clear("stack_shapes", "pair_dots")  # cold: the Gram products too
        fresh = sa.stack_shape(entries)
        assert fresh is not shape and not fresh.patterns
        cold = sa.analyse(fresh, strengths, decor, 0.3, STACK_NORMS.get)
        assert got == _everything(cold)
        assert cold.top_overlaps(5) == top_overlaps(cold.overlaps, 5)
        rows, cols, values = cold.block_table()
        exact = block_table(cold.overlaps)
        assert (rows, cols) == exact[:2]
        assert [v for line in values for v in line] == pytest.approx([v for line in exact[2] for v in line],
                                                                     rel=1e-12, nan_ok=True)


def test_the_report_ranking_holds_for_ties():
    """Two copies of one LoRA: their cosines are 1 to rounding on every layer, so the strongest pairs tie;
    the ranking kept per pattern still picks exactly what top_overlaps picks from the overlap list."""
    from lora_core.stacking import stack_analysis as sa
    entries = _stack_matches()
    twin = make_lora(90, rank=2, alpha=2.0, shapes={m: (24, 16) for m in ["lora_unet_q", "lora_unet_k",
                                                                          "lora_unet_v", "lora_te_q"]}, name="a")
    host = {key: torch.Size((24, 16)) for key in STACK_KEYS.values()}
    entries.insert(1, ("row 9: a again", match_lora(twin, STACK_KEYS, host, {"model", "clip"})))
    shape = sa.stack_shape(entries)
    for scale in (1.0, 0.7, 0.3, 0.123456789):
        strengths = [(scale * m, scale * c) for m, c in [(1.0, 0.9), (0.4, 0.8), (0.8, -0.5), (-0.6, 0.7), (0.4, 0.2)]]
        analysis = sa.analyse(shape, strengths)
        for n in (1, 2, 5, 9, 50):
            assert analysis.top_overlaps(n) == top_overlaps(analysis.overlaps, n)
        assert abs(analysis.top_overlaps(1)[0].cosine) == pytest.approx(1.0)


MID_KEYS = {"lora_unet_m0": "diffusion_model.middle_block.0.x.weight",
            "lora_unet_m1": "diffusion_model.middle_block.1.v.weight"}


def test_the_block_table_takes_every_layer_where_strengths_differ_inside_a_block():
    """middle_block.0 (block weight MID0) and middle_block.1 (MID) are one heatmap block: with block
    weights that differ there, the block's cosine depends on the sizes, and the overlap list gives it."""
    from lora_core.stacking import stack_analysis as sa
    host = {key: torch.Size((24, 16)) for key in MID_KEYS.values()}
    entries = [(f"row {i + 1}", match_lora(make_lora(60 + i, rank=3, shapes={m: (24, 16) for m in MID_KEYS}),
                                           MID_KEYS, host, {"model"})) for i in range(2)]
    shape = sa.stack_shape(entries)
    assert len(shape.slots) == 2 and shape.shared_blocks == ((0, 1),)
    tables = []
    for strengths in ([(0.7, 0.0), (0.4, 0.0)], [(0.7, 0.0, {"MID0": 0.1}), (0.4, 0.0)],
                      [(0.7, 0.0, {"MID0": 0.7}), (-0.4, 0.0)]):
        analysis = sa.analyse(shape, strengths)
        rows, cols, values = analysis.block_table()
        exact = block_table(analysis.overlaps)
        assert (rows, cols) == exact[:2] == (["row 1 x row 2"], ["middle_block"])
        assert values[0][0] == pytest.approx(exact[2][0][0], rel=1e-12)
        tables.append(values[0][0])
    assert tables[1] != pytest.approx(tables[0], rel=1e-6) and tables[2] == pytest.approx(-tables[0], rel=1e-12)


def test_a_first_gram_build_equals_its_memoised_reread():
    """The batched Gram product is symmetric only up to rounding: a first build must give the same table
    (the upper triangle, mirrored) that a re-read from the pair memo gives, or a stack analysed cold and
    again after its pairs are memoised would differ in the last bits."""
    from lora_core import caches
    from lora_core.stacking.frobenius import gram
    caches.clear("pair_dots")
    entries = _stack_matches()
    q_layer = entries[0][1].patches[0].target  # lora_unet_q: a, b and c patch it
    adapters = [p.adapter for _, match in entries for p in match.patches if p.target == q_layer]
    assert len(adapters) >= 3
    first = gram(adapters)
    assert all(first[i][j] == first[j][i] for i in range(len(first)) for j in range(len(first)))
    assert gram(adapters) == first  # every pair now comes from the memo


def test_the_batched_gram_is_within_1e_6_of_exact_on_sd15_sized_half_precision_factors():
    """gram() takes U^T U and D D^T in fp32 (issue 13's cold path); checked against the dense fp64 deltas on a
    1280 x 768 cross-attention layer, three rank-32 fp16 LoRAs, and on a stack whose terms cancel."""
    from lora_core import caches
    from lora_core.formats.adapters import LowRankAdapter
    from lora_core.stacking.frobenius import gram
    caches.clear("pair_dots")
    g = torch.Generator().manual_seed(13)

    def adapter(up=None, down=None):
        up = torch.randn(1280, 32, generator=g).half() * 0.02 if up is None else up
        down = torch.randn(32, 768, generator=g).half() * 0.02 if down is None else down
        return LowRankAdapter.claim({"up": up, "down": down, "alpha": torch.tensor(16.0)})

    adapters = [adapter() for _ in range(3)]
    adapters.append(adapter(-adapters[0].roles["up"], adapters[0].roles["down"]))  # the first, negated
    deltas = [0.5 * a.roles["up"].double() @ a.roles["down"].double() for a in adapters]
    table = gram(adapters)
    for i, a in enumerate(deltas):
        for j, b in enumerate(deltas):
            exact = float((a * b).sum())
            assert table[i][j] == pytest.approx(exact, rel=1e-6, abs=1e-6 * float(a.norm() * b.norm()))
    s = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    cancelled = float(s @ torch.tensor(table, dtype=torch.float64) @ s)
    assert abs(cancelled) <= 1e-6 * table[0][0]  # ||dW - dW||^2: zero to fp32 rounding, not a norm-sized error
