"""Per-block weights and the trigger_words output of Load LoRA and Stack LoRA in a real ComfyUI, on the
tiny SD1.5 checkpoint: the weights a vector gives, computed by hand from the LoRA's factors."""
import pytest

from lora_factory import lora_state_dict
from lora_fixtures import (
    SD15,
    attention_targets,
    clip_kohya_name,
    clip_targets,
    kohya_factors,
    kohya_name,
    max_relative_error,
    patched_weights,
    sampler_prompt,
    save_lora,
)

RANK, ALPHA = 4, 2.0
# The tiny SD1.5 UNet has attention in input_blocks 1 and 3, the middle block and output_blocks 0-3: an
# attention LoRA's vector is BASE, IN01, IN03, MID, OUT00, OUT01, OUT02, OUT03 (17-value vectors made for
# full SD1.x have 9 values too many: the unused ones are reported).
VECTOR = "0.5,1,0,0.25,2,0,1,-1"
BY_HAND = {"input_blocks.1.": 1.0, "input_blocks.3.": 0.0, "middle_block.1.": 0.25, "output_blocks.0.": 2.0,
           "output_blocks.1.": 0.0, "output_blocks.2.": 1.0, "output_blocks.3.": -1.0}
STACK_DEFAULTS = {"mode": "merge", "clamp_weights": False, "weight_min": -1.0, "weight_max": 1.0, "use_budget": False,
                  "budget": 1.5, "use_layer_cap": False, "layer_cap": 0.1, "decorrelate": False}


@pytest.fixture(scope="module")
def sd15(comfy_host):
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:2]


@pytest.fixture(scope="module")
def lora(comfy_host, sd15):
    model, clip = sd15
    factors = kohya_factors(model, clip, rank=RANK, seed=61, scale=0.3)
    name = save_lora(comfy_host.loras_dir, "blocks.safetensors", lora_state_dict(factors, alpha=ALPHA),
                     {"modelspec.trigger_phrase": "blk style, Sks"})
    return name, factors


def block_ratio(key: str) -> float:
    found = [r for prefix, r in BY_HAND.items() if key.startswith("diffusion_model." + prefix)]
    assert len(found) == 1, key
    return found[0]


def expected(base, factors, keys, names, strength):
    """W + strength(key) * (alpha / rank) * up @ down, by hand."""
    out = {}
    for key in keys:
        up, down = factors[names(key)]
        out[key] = base[key] + strength(key) * (ALPHA / RANK) * (up @ down)
    return out


def load(comfy_host, name, model, clip, s_model, s_clip, mode="merge", block_weights=""):
    return comfy_host.pack.nodes.load_lora.LoadLoRA.execute(name, s_model, s_clip, mode, model=model, clip=clip,
                                                            block_weights=block_weights).args


def test_load_lora_vector_gives_the_weights_the_convention_defines(comfy_host, sd15, lora):
    model, clip = sd15
    name, factors = lora
    m, c, _, report, triggers = load(comfy_host, name, model, clip, 0.8, 0.6, block_weights=VECTOR)
    unet, te = list(attention_targets(model)), list(clip_targets(clip))
    want = expected(patched_weights(model), factors, unet, kohya_name, lambda k: 0.8 * block_ratio(k))
    assert max_relative_error(patched_weights(m), want, unet) < 1e-5
    # BASE (0.5) covers the text encoder
    want_te = expected(patched_weights(clip.patcher), factors, te, clip_kohya_name, lambda k: 0.6 * 0.5)
    assert max_relative_error(patched_weights(c.patcher), want_te, te) < 1e-3  # the tiny CLIP is fp16
    assert "block weights (vector): BASE 0.5, IN01 1, IN03 0, MID 0.25, OUT00 2, OUT01 0, OUT02 1, OUT03 -1" in report
    assert triggers == "blk style, Sks"


def test_a_17_value_sd1_vector_and_a_preset_on_the_tiny_model(comfy_host, sd15, lora):
    model, _ = sd15
    name, factors = lora
    # SD-OUTD is 1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0: the tiny model's 7 blocks take values 2-8 (all 0), so
    # only BASE is on (no UNet attention layer changes); values 9-17 are unused and the report says so.
    m, _, _, report, _ = load(comfy_host, name, model, None, 1.0, 0.0, block_weights="SD-OUTD")
    unet = list(attention_targets(model))
    assert max_relative_error(patched_weights(m), patched_weights(model), unet) == 0.0
    assert "values 9-17 unused" in report
    m, _, _, _, _ = load(comfy_host, name, model, None, 1.0, 0.0, block_weights="%default=0,out2-3=1")
    want = expected(patched_weights(model), factors, unet, kohya_name,
                    lambda k: 1.0 if k.startswith(("diffusion_model.output_blocks.1.",
                                                   "diffusion_model.output_blocks.2.")) else 0.0)
    assert max_relative_error(patched_weights(m), want, unet) < 1e-5


def test_bad_block_weights_are_an_error_on_load_lora(comfy_host, sd15, lora):
    model, clip = sd15
    with pytest.raises(Exception, match="block weights '1,R,1'"):
        load(comfy_host, lora[0], model, clip, 1.0, 1.0, block_weights="1,R,1")


def test_block_weights_in_bypass_equal_merge(comfy_host, lora):
    latents = {}
    for mode in ("merge", "bypass"):
        node = {"class_type": "LW_LoadLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora[0], "strength_model": 0.9, "strength_clip": 0.0,
            "mode": mode, "block_weights": VECTOR}}
        latents[mode] = comfy_host.run(sampler_prompt({"2": node}, cfg=3.0), outputs=["6"])["6"].output(0)["samples"]
    plain = {"class_type": "LW_LoadLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": lora[0], "strength_model": 0.9, "strength_clip": 0.0,
        "mode": "merge"}}  # an API prompt without the new input still runs
    unweighted = comfy_host.run(sampler_prompt({"2": plain}, cfg=3.0), outputs=["6"])["6"].output(0)["samples"]
    merge, bypass = latents["merge"], latents["bypass"]
    assert (bypass - merge).abs().max() / merge.abs().max() < 1e-5
    assert (unweighted - merge).abs().max() > 1e-3  # the vector changed the result


def _rows(rows):
    out = {}
    for i, (name, s_model, s_clip, on, blocks) in enumerate(rows, start=1):
        out |= {f"lora_{i}": name, f"on_{i}": on, f"strength_model_{i}": s_model, f"strength_clip_{i}": s_clip,
                f"blocks_{i}": blocks}
    return out


def stack(comfy_host, model, clip, rows, **settings):
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    return node.execute(model=model, clip=clip, **(STACK_DEFAULTS | settings), **_rows(rows))


def test_stack_row_block_weights_equal_load_lora_and_the_fast_and_general_paths_agree(comfy_host, sd15, lora,
                                                                                     monkeypatch):
    model, clip = sd15
    name = lora[0]
    out = stack(comfy_host, model, None, [(name, 0.8, 0.0, True, VECTOR)])
    by_load = load(comfy_host, name, model, None, 0.8, 0.0, block_weights=VECTOR)[0]
    unet = list(attention_targets(model))
    assert max_relative_error(patched_weights(out.args[0]), patched_weights(by_load), unet) < 1e-6
    report = out.args[3]
    assert "block weights (vector): BASE 0.5, IN01 1" in report and "OUT00 1.6" in report
    assert out.ui["lw_effective"][0][5]["OUT00"] == pytest.approx(1.6)
    monkeypatch.setattr(comfy_host.pack.lora_core.stacking.stack_analysis, "stack_shape", lambda entries: None)
    slow = stack(comfy_host, model, None, [(name, 0.8, 0.0, True, VECTOR)])
    assert max_relative_error(patched_weights(slow.args[0]), patched_weights(by_load), unet) < 1e-6


def test_stack_clamps_see_the_per_block_strengths(comfy_host, sd15, lora):
    model, _ = sd15
    name, factors = lora
    # weight_max 1: OUT00 at 0.8 x 2 = 1.6 is clamped to 1.0, the other blocks keep 0.8 x value
    out = stack(comfy_host, model, None, [(name, 0.8, 0.0, True, VECTOR)], clamp_weights=True)
    unet = list(attention_targets(model))

    def strength(key):
        return max(-1.0, min(1.0, 0.8 * block_ratio(key)))
    want = expected(patched_weights(model), factors, unet, kohya_name, strength)
    assert max_relative_error(patched_weights(out.args[0]), want, unet) < 1e-5
    assert "block strengths clamped: OUT00 1.6 -> 1" in out.args[3]


def test_a_bad_row_vector_skips_only_that_row(comfy_host, sd15, lora):
    model, _ = sd15
    out = stack(comfy_host, model, None, [(lora[0], 0.5, 0.0, True, "1,0,x"), (lora[0], 0.5, 0.0, True, "")])
    assert "SKIPPED row 1: block weights '1,0,x': 'x'" in out.args[3]
    assert [s[1] for s in out.args[2]] == [0.5]


def test_trigger_words_of_the_rows_that_are_on_in_row_order_each_once(comfy_host, sd15):
    model, clip = sd15
    factors = kohya_factors(model, rank=2, seed=62)
    names = []
    for i, phrase in enumerate(("alpha, shared", "beta", "SHARED, gamma", "delta")):
        names.append(save_lora(comfy_host.loras_dir, f"trig_{i}.safetensors", lora_state_dict(factors, alpha=2.0),
                               {"modelspec.trigger_phrase": phrase}))
    out = stack(comfy_host, model, clip, [(names[2], 0.3, 0.3, True, ""), (names[1], 0.3, 0.3, False, ""),
                                          (names[0], 0.3, 0.3, True, ""), (names[3], 0.3, 0.3, True, "")])
    assert out.args[5] == "SHARED, gamma, alpha, delta"
    assert stack(comfy_host, model, clip, [(names[1], 0.3, 0.3, False, "")]).args[5] == ""
    # an incoming LORA_STACK is applied first: its words come first
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    via = node.execute(model=model, clip=clip, lora_stack=[(names[3], 0.2, 0.2)], **STACK_DEFAULTS,
                       **_rows([(names[1], 0.3, 0.3, True, "")]))
    assert via.args[5] == "delta, beta"
