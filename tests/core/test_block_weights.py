"""Per-block weights (lora_core.patching.block_weights): the LoRA Block Weight convention's reading of a vector,
its presets and % spec, and what the plan and the clamps make of per-block strengths."""
import pytest
import torch

from lora_core import Target, match_lora, parse_lora, plan_layers
from lora_core.patching.block_weights import (
    BASE,
    PRESETS,
    BlockWeightError,
    block_label,
    blocks_of,
    model_block_strengths,
    parse_block_weights,
    resolve_block_weights,
)
from lora_core.stacking.clamping import ClampSettings, StackEntry, clamp_strengths
from lora_factory import lora_state_dict, low_rank_factors

# An SD1.x attention LoRA's blocks: input 1, 2, 4, 5, 7, 8, middle 1, output 3-11 (16 blocks + BASE = 17).
SD1_BLOCKS = [("input_blocks", n) for n in (1, 2, 4, 5, 7, 8)] + [("middle_block", 1)] + \
    [("output_blocks", n) for n in range(3, 12)]
SD1_KEYS = [f"diffusion_model.{kind}.{n}.1.transformer_blocks.0.attn1.to_q.weight" for kind, n in SD1_BLOCKS] + \
    ["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "diffusion_model.time_embed.0.weight"]
SD1_LABELS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{n:02d}" for n in range(3, 12)]
# An SDXL attention LoRA's: input 4, 5, 7, 8, middle 1, output 0-5 (12 values).
SDXL_KEYS = [f"diffusion_model.input_blocks.{n}.1.proj_in.weight" for n in (4, 5, 7, 8)] + \
    ["diffusion_model.middle_block.1.proj_in.weight"] + \
    [f"diffusion_model.output_blocks.{n}.1.proj_in.weight" for n in range(6)] + \
    ["clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("key, label", [
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "IN01"),
    ("diffusion_model.input_blocks.10.0.in_layers.2.weight", "IN10"),
    ("diffusion_model.middle_block.1.proj_in.weight", "MID"),
    ("diffusion_model.middle_block.0.in_layers.2.weight", "MID0"),
    ("diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
    ("diffusion_model.double_blocks.7.img_attn.qkv.weight", "DBL07"),
    ("diffusion_model.single_blocks.37.linear2.weight", "SGL37"),
    ("diffusion_model.time_embed.0.weight", BASE),
    ("diffusion_model.img_in.weight", BASE),
    ("diffusion_model.joint_blocks.3.x_block.attn.qkv.weight", BASE),  # SD3: no numbered blocks in the convention
    ("clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight", BASE),
    ("t5xxl.transformer.encoder.block.2.layer.0.SelfAttention.q.weight", BASE),
])
def test_block_label_of_host_keys(key, label):
    assert block_label(key) == label


def test_a_17_value_vector_maps_onto_an_sd1_attention_loras_blocks():
    vector = "0.1,1,2,3,4,5,6,7,8,9,10,-1,-2,-3,-4,-5,-6"
    weights = resolve_block_weights(vector, SD1_KEYS)
    assert list(weights.ratios) == [BASE] + SD1_LABELS
    assert list(weights.ratios.values()) == [0.1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -1, -2, -3, -4, -5, -6]
    assert weights.notes == []
    assert weights.ratio(SD1_KEYS[-2]) == 0.1 and weights.ratio(SD1_KEYS[-1]) == 0.1  # text encoder, time_embed
    assert weights.ratio(SD1_KEYS[6]) == 7  # middle_block.1 is value 8


def test_the_position_follows_the_blocks_the_lora_has():
    # A LoRA on OUT blocks only: value 2 is its first output block, not IN01.
    keys = [f"diffusion_model.output_blocks.{n}.1.proj_in.weight" for n in (3, 4, 5)]
    weights = resolve_block_weights("1,0.2,0.4,0.6", keys)
    assert weights.ratios == {BASE: 1.0, "OUT03": 0.2, "OUT04": 0.4, "OUT05": 0.6}


def test_sdxl_12_values_and_presets():
    weights = resolve_block_weights("SDXL-OUTALL", SDXL_KEYS)
    assert weights.vector.preset == "SDXL-OUTALL"
    assert weights.ratios == {BASE: 1.0, "IN04": 0.0, "IN05": 0.0, "IN07": 0.0, "IN08": 0.0, "MID": 0.0,
                              "OUT00": 1.0, "OUT01": 1.0, "OUT02": 1.0, "OUT03": 1.0, "OUT04": 1.0, "OUT05": 1.0}
    mid = resolve_block_weights("SDXL-MIDALL", SDXL_KEYS)
    assert [label for label, v in mid.ratios.items() if v] == [BASE, "MID"]


@pytest.mark.parametrize("text, on", [
    ("SD-OUTD", [BASE, "OUT03", "OUT04", "OUT05", "OUT06"]),
    ("OUTD", [BASE, "OUT03", "OUT04", "OUT05", "OUT06"]),  # sd-webui-lora-block-weight's name
    ("outd", [BASE, "OUT03", "OUT04", "OUT05", "OUT06"]),
    ("SD-INS", [BASE, "IN01", "IN02", "IN04"]),
    ("SD-IND", [BASE, "IN05", "IN07", "IN08"]),
    ("SD-MIDD", [BASE, "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06"]),
    ("SD-OUTS", [BASE, "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]),
    ("SD-NONE", []),
    ("ALL", [BASE] + SD1_LABELS),
    ("my favourite:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", [BASE, "OUT03", "OUT04", "OUT05", "OUT06"]),
])
def test_named_presets_on_sd1(text, on):
    weights = resolve_block_weights(text, SD1_KEYS)
    assert [label for label, v in weights.ratios.items() if v] == on


def test_presets_have_the_lengths_of_their_layouts():
    lengths = {name: len(v.split(",")) for name, v in PRESETS.items()}
    assert {n for n, k in lengths.items() if k == 17} == {n for n in PRESETS if n.startswith("SD-") and "LyC" not in n}
    assert all(lengths[n] == 27 for n in PRESETS if n.startswith("SD-LyC"))
    assert all(lengths[n] == 12 for n in PRESETS if n.startswith("SDXL-") and "LyC" not in n)
    assert all(lengths[n] == 21 for n in PRESETS if n.startswith("SDXL-LyC"))
    assert all(lengths[n] == 18 for n in PRESETS if n.startswith("FLUX-"))


def test_flux_values_go_to_double_then_single_blocks():
    keys = [f"diffusion_model.double_blocks.{n}.img_attn.qkv.weight" for n in range(3)] + \
        [f"diffusion_model.single_blocks.{n}.linear1.weight" for n in range(2)] + ["diffusion_model.img_in.weight"]
    assert blocks_of(keys) == ["DBL00", "DBL01", "DBL02", "SGL00", "SGL01"]
    weights = resolve_block_weights("0.5,1,0,1,0.25,0.75", keys)
    assert weights.ratios == {BASE: 0.5, "DBL00": 1, "DBL01": 0, "DBL02": 1, "SGL00": 0.25, "SGL01": 0.75}
    front = resolve_block_weights("FLUX-DBL-FRONT", keys)  # 18 values: the unused ones are said
    assert front.ratios == {BASE: 1, "DBL00": 1, "DBL01": 1, "DBL02": 1, "SGL00": 1, "SGL01": 1}
    assert "values 7-18 unused" in front.notes[0]


def test_short_vectors_repeat_their_last_value_and_say_so():
    weights = resolve_block_weights("1,0,0.5", SD1_KEYS)
    assert list(weights.ratios.values()) == [1, 0] + [0.5] * 15
    assert weights.notes and "3 block values for 17 blocks" in weights.notes[0]
    assert "last value repeats" in weights.notes[0]


def test_percent_spec_as_the_inspire_pack_reads_it():
    weights = resolve_block_weights("%default=0,base=1,out=1,in3-4=0.5,out2=0.25", SD1_KEYS)
    expected = {BASE: 1.0, "IN01": 0, "IN02": 0, "IN04": 0.5, "IN05": 0.5, "IN07": 0, "IN08": 0, "MID": 0,
                "OUT03": 1, "OUT04": 0.25} | {f"OUT{n:02d}": 1 for n in range(5, 12)}
    assert weights.ratios == expected
    # base defaults to default
    assert resolve_block_weights("%default=0.5", SD1_KEYS).ratios[BASE] == 0.5


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_means_every_block_at_one(text):
    assert parse_block_weights(text) is None and resolve_block_weights(text, SD1_KEYS) is None


@pytest.mark.parametrize("text, needle", [
    ("1,R,1", "random (R, U) and placeholder (A, B)"),
    ("SD-AB", "not a number or a preset"),
    ("1,0 1,1", "space-separated sub-values"),
    ("1,,1", "empty value"),
    ("1,nan,1", "not a number"),
    ("1,inf", "not a number"),
    ("1,11", "from -10 to 10"),
    ("%in=x", "'x'"),
    ("%foo=1", "not a spec item"),
])
def test_unreadable_text_is_an_error_naming_it(text, needle):
    with pytest.raises(BlockWeightError, match=None) as err:
        resolve_block_weights(text, SD1_KEYS)
    assert needle in str(err.value) and text in str(err.value)


def test_plan_scales_each_layer_by_its_block_and_leaves_zero_blocks_out():
    keys = {"lora_unet_a": "diffusion_model.input_blocks.1.1.a.weight",
            "lora_unet_b": "diffusion_model.output_blocks.3.1.b.weight",
            "lora_unet_c": "diffusion_model.time_embed.0.weight",
            "lora_te_d": "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    lora = parse_lora(lora_state_dict(low_rank_factors({k: (8, 8) for k in keys}, 2, seed=3), alpha=2.0), "x")
    match = match_lora(lora, keys, {v: torch.Size((8, 8)) for v in keys.values()}, {"model", "clip"})
    weights = resolve_block_weights("0.5,0,2", [p.target.key for p in match.patches])
    assert weights.ratios == {BASE: 0.5, "IN01": 0.0, "OUT03": 2.0}
    blocks = model_block_strengths(weights, 0.8)
    layers = plan_layers([(match, 0.8, 0.6 * weights.ratios[BASE], blocks)])
    got = {t.key: [term.strength for term in terms] for t, terms in layers.items()}
    assert got == {"diffusion_model.output_blocks.3.1.b.weight": [pytest.approx(1.6)],
                   "diffusion_model.time_embed.0.weight": [pytest.approx(0.4)],
                   keys["lora_te_d"]: [pytest.approx(0.3)]}
    assert Target(keys["lora_unet_a"]) not in layers  # block value 0: left out, as the convention mutes it


def test_the_clamps_see_per_block_strengths():
    ratios = {BASE: 0.5, "IN01": 2.0, "OUT03": 0.25}
    rows = clamp_strengths([StackEntry("a", 0.8, 1.0, block_ratios=ratios), StackEntry("b", 0.6, 0.6)],
                           ClampSettings(budget=1.5))
    a, b = rows
    # rule 1 per block: IN01 0.8 x 2 = 1.6 -> 1.0; clip takes BASE: 1.0 x 0.5 = 0.5
    # rule 2: a counts with its strongest block (1.0), b with 0.6: 1.6 > 1.5 -> x 1.5/1.6 on MODEL
    f = 1.5 / 1.6
    assert a.effective_blocks == pytest.approx({BASE: 0.4 * f, "IN01": 1.0 * f, "OUT03": 0.2 * f})
    assert a.effective_model == pytest.approx(0.8 * f) and b.effective_model == pytest.approx(0.6 * f)
    assert a.effective_clip == pytest.approx(0.5) and b.effective_clip == pytest.approx(0.6)  # 1.1 <= 1.5
    assert any("IN01 1.6 -> 1" in n for n in a.notes)
    assert a.plan_strengths()[2] is a.effective_blocks and len(b.plan_strengths()) == 2
    # without block weights nothing changes from before
    plain = clamp_strengths([StackEntry("a", 0.8, 1.0), StackEntry("b", 0.6, 0.6)], ClampSettings(budget=1.5))
    assert plain[0].effective_blocks is None and plain[0].effective_model == 0.8  # 0.8 + 0.6 <= 1.5
    assert plain[0].effective_clip == pytest.approx(1.0 * 1.5 / 1.6)
