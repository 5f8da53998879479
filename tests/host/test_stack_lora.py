"""LW_StackLoRA in a real ComfyUI: clamping parity with core, bypass, LORA_STACK, bad rows, instant strengths."""
import pytest
import torch

from lora_factory import lora_state_dict
from lora_fixtures import (
    SD15,
    attention_targets,
    kohya_factors,
    lycoris_state_dict,
    max_relative_error,
    patched_weights,
    sampler_prompt,
    save_lora,
)

ROW_DEFAULTS = {"mode": "merge", "clamp_weights": True, "weight_min": -1.0, "weight_max": 1.0, "use_budget": True,
                "budget": 1.5, "use_layer_cap": False, "layer_cap": 0.1, "decorrelate": False}


@pytest.fixture(scope="module")
def sd15(comfy_host):
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:2]


@pytest.fixture(scope="module")
def three_loras(comfy_host, sd15):
    model, clip = sd15
    return [save_lora(comfy_host.loras_dir, f"stack_{i}.safetensors",
                      lora_state_dict(kohya_factors(model, clip, rank=4, seed=40 + i, scale=0.3), alpha=4.0))
            for i in range(3)]


def _rows(names_strengths):
    rows = {}
    for i, (name, s_model, s_clip, on) in enumerate(names_strengths, start=1):
        rows |= {f"lora_{i}": name, f"on_{i}": on, f"strength_model_{i}": s_model, f"strength_clip_{i}": s_clip}
    return rows


def stack(comfy_host, model, clip, rows, **settings):
    """(MODEL, CLIP, LORA_STACK, report, interference); trigger_words is tested in test_block_weights.py."""
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    return node.execute(model=model, clip=clip, **(ROW_DEFAULTS | settings), **rows).args[:5]


def test_at_its_widget_defaults_a_stack_of_two_loras_at_1_keeps_both_strengths(comfy_host, sd15, three_loras):
    """Issue 16: on the toy world the budget (1.5) and the layer cap (0.10) took both concepts of such a stack
    away, so both are off until asked for; the weight range [-1, 1] stays on."""
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    defaults = {i.id: i.default for i in node.define_schema().inputs if i.id in ROW_DEFAULTS}
    assert defaults == ROW_DEFAULTS | {"use_budget": False}
    model, clip = sd15
    rows = _rows([(three_loras[0], 1.0, 1.0, True), (three_loras[1], 1.0, 1.0, True)])
    _, _, stack_out, report, _ = node.execute(model=model, clip=clip, **defaults, **rows).args[:5]
    assert [(s[1], s[2]) for s in stack_out] == [(1.0, 1.0), (1.0, 1.0)], report
    rows = _rows([(three_loras[0], 1.6, 1.0, True), (three_loras[1], 1.0, 1.0, True)])
    _, _, stack_out, _, _ = node.execute(model=model, clip=clip, **defaults, **rows).args[:5]
    assert stack_out[0][1] == 1.0  # the range still clamps


def test_merge_stack_equals_core_loaders_at_the_clamped_strengths(comfy_host, sd15, three_loras):
    model, clip = sd15
    requested = [(three_loras[0], 0.9, 0.5, True), (three_loras[1], 1.4, 0.5, True), (three_loras[2], -0.6, 0.5, True)]
    m, c, stack_out, report, heatmap = stack(comfy_host, model, clip, _rows(requested))
    # rule 1: 1.4 -> 1.0; rule 2: |0.9| + |1.0| + |-0.6| = 2.5 > 1.5 -> all x 0.6; clip 1.5 = budget: unchanged
    expected = [0.9 * 0.6, 1.0 * 0.6, -0.6 * 0.6]
    assert [round(s[1], 6) for s in stack_out] == pytest.approx(expected)
    assert [s[2] for s in stack_out] == pytest.approx([0.5, 0.5, 0.5])
    cm, cc = model, clip
    for name, s_model in zip(three_loras, expected):
        cm, cc = comfy_host.nodes.LoraLoader().load_lora(cm, cc, name, s_model, 0.5)
    keys = list(attention_targets(model))
    assert max_relative_error(patched_weights(m), patched_weights(cm), keys) < 1e-5
    assert "row 2: stack_1.safetensors: model 1.4 -> 0.6" in report
    assert heatmap.shape[0] == 1 and heatmap.shape[-1] == 3 and heatmap.shape[1] > 40


def test_bypass_stack_latents_equal_merge_stack(comfy_host, three_loras):
    latents = {}
    for mode in ("merge", "bypass"):
        settings = {k: v for k, v in ROW_DEFAULTS.items()} | {"mode": mode}
        rows = _rows([(n, 0.5, 0.0, True) for n in three_loras])
        prompt = _sample_prompt(settings | rows)
        latents[mode] = comfy_host.run(prompt, outputs=["6"])["6"].output(0)["samples"]
    diff = (latents["bypass"] - latents["merge"]).abs().max() / latents["merge"].abs().max()
    assert diff < 1e-5


def test_lora_stack_from_other_packs_gives_the_same_model_as_rows(comfy_host, sd15, three_loras):
    model, clip = sd15
    efficiency_style = [(three_loras[0], 0.4, 0.3), (three_loras[1], 0.2, 0.1)]  # (name, model, clip) tuples
    via_stack = stack(comfy_host, model, clip, {}, lora_stack=efficiency_style)
    via_rows = stack(comfy_host, model, clip, _rows([(n, sm, sc, True) for n, sm, sc in efficiency_style]))
    keys = list(attention_targets(model))
    assert max_relative_error(patched_weights(via_stack[0]), patched_weights(via_rows[0]), keys) == 0.0
    assert via_stack[2] == [(three_loras[0], 0.4, 0.3), (three_loras[1], 0.2, 0.1)]


def test_bad_rows_are_skipped_and_reported(comfy_host, sd15, three_loras):
    model, clip = sd15
    sdxl_lora = save_lora(comfy_host.loras_dir, "stack_for_sdxl.safetensors", lora_state_dict(
        {f"lora_unet_input_blocks_7_1_transformer_blocks_{i}_attn1_to_q": (torch.ones(8, 2), torch.ones(2, 8))
         for i in range(4)}, alpha=2.0), {"ss_base_model_version": "sdxl_base_v1-0"})
    rows = _rows([("missing.safetensors", 0.5, 0.5, True), (sdxl_lora, 0.5, 0.5, True),
                  (three_loras[0], float("nan"), 0.5, True), (three_loras[1], 0.5, 0.5, True)])
    m, _, stack_out, report, _ = stack(comfy_host, model, clip, rows)
    assert "SKIPPED row 1: LoRA 'missing.safetensors' not found" in report
    assert "SKIPPED row 2: stack_for_sdxl.safetensors: looks made for SDXL" in report
    assert "SKIPPED row 3: strengths must be finite numbers, got nan" in report
    assert stack_out == [(three_loras[1], 0.5, 0.5)]
    assert max_relative_error(patched_weights(m), patched_weights(model), list(attention_targets(model))) > 1e-4


def test_all_rows_off_passes_the_model_through(comfy_host, sd15, three_loras):
    model, clip = sd15
    m, c, stack_out, report, _ = stack(comfy_host, model, clip, _rows([(n, 0.5, 0.5, False) for n in three_loras]))
    assert m is model and c is clip and stack_out == []
    assert "no LoRA is on: the model passes through unchanged" in report


def test_layer_cap_scales_only_the_layers_over_it(comfy_host, sd15, three_loras):
    model, clip = sd15
    m, _, _, report, _ = stack(comfy_host, model, clip, _rows([(three_loras[0], 1.0, 0.0, True)]),
                               use_layer_cap=True, layer_cap=0.05, use_budget=False)
    assert "layer cap touched" in report and "-> 0.0500" in report
    base, patched = patched_weights(model), patched_weights(m)
    for key in attention_targets(model):
        ratio = float((patched[key] - base[key]).norm() / base[key].norm())
        assert ratio <= 0.05 * (1 + 1e-4)


@pytest.mark.parametrize("decorrelate", [False, True])
def test_fast_analysis_and_general_functions_give_the_same_model(comfy_host, sd15, three_loras, monkeypatch,
                                                                 decorrelate):
    """Plain LoRAs take the memoised fast path; forcing the general functions changes nothing."""
    model, clip = sd15
    rows = _rows([(three_loras[0], 0.9, 0.5, True), (three_loras[1], -0.7, 0.4, True),
                  (three_loras[2], 0.8, 0.0, True)])
    settings = {"use_layer_cap": True, "layer_cap": 0.04, "decorrelate": decorrelate}
    fast_model, fast_clip, _, fast_report, _ = stack(comfy_host, model, clip, rows, **settings)
    monkeypatch.setattr(comfy_host.pack.lora_core.stacking.stack_analysis, "stack_shape", lambda entries: None)
    slow_model, slow_clip, _, slow_report, _ = stack(comfy_host, model, clip, rows, **settings)
    assert "layer cap touched" in fast_report and fast_report == slow_report
    keys = list(attention_targets(model))
    assert max_relative_error(patched_weights(fast_model), patched_weights(slow_model), keys) < 1e-12


def test_a_stack_with_a_loha_row_takes_the_general_path_and_is_capped(comfy_host, sd15, three_loras):
    model, clip = sd15
    loha = save_lora(comfy_host.loras_dir, "stack_loha.safetensors", lycoris_state_dict(model, "loha", 7))
    rows = _rows([(three_loras[0], 1.0, 0.0, True), (loha, 1.0, 0.0, True)])
    m, _, _, report, _ = stack(comfy_host, model, clip, rows, use_layer_cap=True, layer_cap=0.05, use_budget=False)
    assert "layer cap touched" in report
    base, patched = patched_weights(model), patched_weights(m)
    ratios = [float((patched[k] - base[k]).norm() / base[k].norm()) for k in attention_targets(model)]
    assert max(ratios) == pytest.approx(0.05, rel=1e-3)


def _sample_prompt(stack_inputs, seed=3):
    stack_node = {"class_type": "LW_StackLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], **stack_inputs}}
    return sampler_prompt({"2": stack_node}, seed=seed)


def test_bypass_strength_change_repatches_nothing(comfy_host, three_loras, monkeypatch):
    import comfy.model_patcher
    writes = {"n": 0}
    real = comfy.model_patcher.ModelPatcher.patch_weight_to_device

    def counting(self, key, *args, **kwargs):
        writes["n"] += 1
        return real(self, key, *args, **kwargs)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_weight_to_device", counting)
    settings = ROW_DEFAULTS | {"mode": "bypass"}
    first = comfy_host.run(_sample_prompt(settings | _rows([(three_loras[0], 0.3, 0.0, True)])), outputs=["6"])
    writes["n"] = 0
    second = comfy_host.run(_sample_prompt(settings | _rows([(three_loras[0], 0.8, 0.0, True)])), outputs=["6"],
                            keep_cache=True)
    assert writes["n"] == 0  # no weight was written for the strength change
    a, b = first["6"].output(0)["samples"], second["6"].output(0)["samples"]
    assert (a - b).abs().max() > 1e-3  # and the new strength took effect


BYPASS_SETTINGS = {"mode": "bypass", "use_layer_cap": True, "layer_cap": 0.1}


def _slider_rows(loras, s_model, s_clip=0.4):
    """Row 2's strengths as a slider moves them; rows 1 and 3 stay."""
    return _rows([(loras[0], 0.9, 0.5, True), (loras[1], s_model, s_clip, True), (loras[2], -0.6, 0.3, True)])


def test_a_bypass_strength_change_rebuilds_nothing_it_can_reuse(comfy_host, sd15, three_loras, monkeypatch):
    """Once a stack ran, a strength change that keeps the signs matches, plans, pairs, ranks, finds modules
    and draws nothing again, and asks no adapter for its variant or low-rank form: it builds its terms and
    bypass objects only."""
    import collections
    pack = comfy_host.pack
    model, clip = sd15
    stack(comfy_host, model, clip, _slider_rows(three_loras, 0.8), **BYPASS_SETTINGS)
    calls = collections.Counter()

    def count(owner, name):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.update([name]) or real(*a, **k))
    analysis, bridge = pack.lora_core.stacking.stack_analysis, pack.nodes.comfy_bridge
    for owner, names in ((analysis, ["_build", "_Pattern", "block_table"]), (analysis._PatternOverlaps, ["all"]),
                         (bridge, ["_match", "_submodule", "supports_bypass", "all_additive"]),
                         (pack.lora_core.stacking.heatmap, ["_draw"]),
                         (pack.lora_core.formats.adapters.LowRankAdapter, ["low_rank"])):
        for name in names:
            count(owner, name)
    real_variant = pack.lora_core.formats.adapters.Adapter.variant
    monkeypatch.setattr(pack.lora_core.formats.adapters.Adapter, "variant",
                        property(lambda self: calls.update(["variant"]) or real_variant.fget(self)))
    made = []
    bypass = pack.lora_core.patching.bypass.BypassForward
    real_init = bypass.__init__
    monkeypatch.setattr(bypass, "__init__", lambda self, *a, **k: made.append(1) or real_init(self, *a, **k))
    for s_model in (0.7, 0.55, 0.8):
        m, c, _, report, _ = stack(comfy_host, model, clip, _slider_rows(three_loras, s_model), **BYPASS_SETTINGS)
        assert "0 merged" in report and " 0 bypass" not in report
    assert calls == {}, f"a strength change rebuilt {dict(calls)}"
    ours = [p for patcher in (m, c.patcher) for p in patcher.object_patches.values() if isinstance(p, bypass)]
    assert ours and len(made) == 3 * len(ours)


def _bypass_patches(patcher) -> dict:
    """Each object patch of ours: its terms as (strength, the adapter's up factor), and what it runs."""
    def terms(ts):
        return [(t.strength, t.adapter.roles["up"].numpy().tobytes()) for t in ts]
    return {name: (p.offset, p.is_linear, p.inner is None, terms(p.low_rank), terms(p.dense))
            if hasattr(p, "low_rank") else p for name, p in patcher.object_patches.items()}


def _everything(out) -> dict:
    m, c, stack_out, report, heatmap, triggers = out.args
    return {"model": _bypass_patches(m), "clip": _bypass_patches(c.patcher),
            "weight patches": (m.patches, c.patcher.patches), "stack": stack_out, "report": report,
            "heatmap": heatmap.numpy().tobytes(), "shape": tuple(heatmap.shape), "triggers": triggers, "ui": out.ui}


@pytest.mark.parametrize("decorrelate", [False, True])
def test_a_bypass_strength_change_gives_what_a_cold_run_gives(comfy_host, sd15, three_loras, decorrelate):
    """Strengths reached by moving a slider (and a sign flip and back on the way) give the very outputs a cold
    run at those strengths gives: the bypass terms float for float, report, heatmap pixels, LORA_STACK, ui."""
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    model, clip = sd15
    settings = ROW_DEFAULTS | BYPASS_SETTINGS | {"decorrelate": decorrelate}

    def run(s_model, s_clip=0.4):
        return node.execute(model=model, clip=clip, **settings, **_slider_rows(three_loras, s_model, s_clip))
    comfy_host.pack.lora_core.caches.clear()  # the Gram products too: both sides start from the same cold ones
    run(0.8)
    warm = [_everything(run(0.7)), _everything(run(-0.5, 0.0)), _everything(run(0.7)), _everything(run(0.3))]
    comfy_host.pack.lora_core.caches.clear()
    cold_07 = _everything(run(0.7))
    comfy_host.pack.lora_core.caches.clear()
    cold_03 = _everything(run(0.3))
    assert warm[0] == cold_07 and warm[2] == cold_07 and warm[3] == cold_03
    assert warm[0]["report"] != warm[3]["report"] and warm[0]["heatmap"] == warm[3]["heatmap"]
    assert warm[1]["heatmap"] != warm[0]["heatmap"]  # the sign flip turned row 2's cosines around
