"""lora_core.formats.families alone: which family a file was made for, what training targets on each family,
and what a file of an unknown family says about itself."""
import re

import pytest

from lora_core import LoRASettingsError
from lora_core.formats import families
from lora_core.formats.export import build_metadata
from lora_core.training import select_targets

KOHYA_SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("names, expected, candidates", [
    ([KOHYA_SD1, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"], "SD1.x", ["SD1.x", "SD2.x"]),
    (["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"], "SDXL", ["SDXL", "SD1.x", "SD2.x"]),
    (["lora_unet_double_blocks_0_img_attn_qkv"], "Flux", ["Flux", "Chroma", "Flux.2", "HunyuanImage 2.1",
                                                          "HunyuanVideo"]),
    (["transformer.transformer_blocks.0.img_mlp.net.0.proj"], "Qwen-Image", ["Qwen-Image"]),
    (["lora_unet_blocks_0_self_attn_q"], "Wan 2.1", ["Wan 2.1", "Wan 2.2"]),
    (["lora_unet__blocks_0_cross_attn_k"], "Wan 2.1", ["Wan 2.1"]),  # Wan "Fun" LoRAs
    (["transformer.transformer_blocks.0.attn1.to_q"], "LTX-Video", ["LTX-Video"]),
    (["diffusion_model.layers.0.attention.qkv"], "Lumina2", ["Lumina2", "Z-Image"]),
    (["transformer.double_stream_blocks.0.block.attn1.to_q"], "HiDream", ["HiDream"]),
    (["double_layers.0.attn.w1q"], "AuraFlow", ["AuraFlow"]),
    (["transformer.joint_blocks.0.x_block.attn.qkv"], "SD3", ["SD3"]),
    (["some.other.layer"], "unknown", []),
])
def test_module_names_give_the_family(names, expected, candidates):
    assert families.families_of_keys(names) == candidates
    assert families.guess_family(names, {}) == expected


def test_the_host_family_is_preferred_among_look_alikes_and_strict_never_guesses():
    flux_names = ["lora_unet_double_blocks_0_img_attn_qkv"]
    assert families.guess_family(flux_names, {}, prefer="HunyuanVideo") == "HunyuanVideo"
    assert families.guess_family(flux_names, {}, prefer="SDXL") == "Flux"
    assert families.guess_family(flux_names, {}, strict=True) == "unknown"
    assert families.guess_family(["transformer.double_stream_blocks.0.block.attn1.to_q"], {}, strict=True) == "HiDream"


@pytest.mark.parametrize("metadata, expected", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "SD1.x"),
    ({"modelspec.architecture": "Flux.2-dev/lora"}, "Flux.2"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "Flux"),
    ({"modelspec.architecture": "Flux.1-dev/lora"}, "Flux"),  # musubi-tuner's spelling
    ({"modelspec.architecture": "chroma/lora"}, "Chroma"),
    ({"modelspec.architecture": "wan2.1/lora"}, "Wan 2.1"),
    ({"modelspec.architecture": "hunyuan-video/lora"}, "HunyuanVideo"),
    ({"modelspec.architecture": "Qwen-Image/lora"}, "Qwen-Image"),
    ({"modelspec.architecture": "Z-Image/lora"}, "Z-Image"),
    ({"modelspec.architecture": "lumina-2/lora"}, "Lumina2"),
])
def test_metadata_names_the_family_before_the_keys_do(metadata, expected):
    assert families.guess_family([KOHYA_SD1], metadata) == expected


def test_every_family_round_trips_through_its_own_metadata():
    for family in families.FAMILIES:
        meta = build_metadata(title="t", base_family=family.name, rank=4, alpha=4, scope="", provenance={})
        assert meta["modelspec.architecture"] == f"{family.architecture}/lora"
        assert families.guess_family([], meta) == family.name, family.name


def test_an_unknown_family_is_written_as_unknown():
    meta = build_metadata(title="t", base_family="unknown (NewDiT)", rank=4, alpha=4, scope="", provenance={})
    assert meta["modelspec.architecture"] == "unknown/lora"
    assert "ss_base_model_version" not in meta and "modelspec.resolution" not in meta


@pytest.mark.parametrize("family, paths", [
    ("Wan 2.1", ["blocks.0.self_attn.q", "blocks.0.cross_attn.o"]),
    ("Qwen-Image", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                    "transformer_blocks.0.attn.to_add_out"]),
    ("SD3", ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj"]),
    ("AuraFlow", ["double_layers.0.attn.w2q", "single_layers.0.attn.w1o"]),
    ("HiDream", ["double_stream_blocks.0.block.attn1.to_q_t", "single_stream_blocks.0.block.attn1.to_out"]),
    ("Lumina2", ["layers.0.attention.qkv", "noise_refiner.0.attention.out"]),
    ("LTX-Video", ["transformer_blocks.0.attn2.to_k"]),
    ("Flux", ["double_blocks.0.txt_attn.proj", "single_blocks.0.linear1"]),
])
def test_each_family_trains_its_attention_linears_and_nothing_else(family, paths):
    others = ["blocks.0.ffn.0", "transformer_blocks.0.img_mlp.net.2", "double_blocks.0.img_mod.lin",
              "layers.0.feed_forward.w1", "final_layer.linear", "x_embedder.proj"]
    shapes = {f"diffusion_model.{p}.weight": (8, 8) for p in paths + others}
    shapes["diffusion_model.blocks.0.self_attn.norm_q.weight"] = (8,)
    assert select_targets(shapes, "attention", family) == sorted(f"diffusion_model.{p}.weight" for p in paths)


@pytest.mark.parametrize("family, cross, self_attention", [
    ("SD1.x", ["input_blocks.1.1.transformer_blocks.0.attn2.to_q", "middle_block.1.transformer_blocks.0.attn2.to_k",
               "output_blocks.3.1.transformer_blocks.0.attn2.to_v", "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0"],
     ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"]),
    ("SDXL", ["input_blocks.4.1.transformer_blocks.1.attn2.to_v"], ["input_blocks.4.1.transformer_blocks.1.attn1.to_k"]),
    ("Wan 2.1", ["blocks.0.cross_attn.q", "blocks.3.cross_attn.o", "blocks.3.cross_attn.k_img"],
     ["blocks.0.self_attn.q", "blocks.0.self_attn.o"]),
    ("LTX-Video", ["transformer_blocks.0.attn2.to_k"], ["transformer_blocks.0.attn1.to_k"]),
])
def test_the_cross_attention_preset_trains_only_the_layers_that_read_the_text(family, cross, self_attention):
    others = ["input_blocks.1.1.transformer_blocks.0.ff.net.2", "blocks.0.ffn.0", "input_blocks.1.1.proj_in"]
    shapes = {f"diffusion_model.{p}.weight": (8, 8) for p in cross + self_attention + others}
    assert select_targets(shapes, "cross-attention", family) == sorted(f"diffusion_model.{p}.weight" for p in cross)
    assert set(select_targets(shapes, "attention", family)) == {f"diffusion_model.{p}.weight"
                                                                for p in cross + self_attention}


@pytest.mark.parametrize("family", ["Flux", "SD3", "Qwen-Image", "Lumina2", "HiDream", "AuraFlow", "unknown"])
def test_the_cross_attention_preset_refuses_a_joint_attention_family_by_name(family):
    shapes = {"diffusion_model.double_blocks.0.img_attn.qkv.weight": (24, 8),
              "diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (24, 8)}
    with pytest.raises(LoRASettingsError, match=rf"'cross-attention': a {re.escape(family)} model has no separate "
                                                r"cross-attention layers.*choose 'attention'"):
        select_targets(shapes, "cross-attention", family)
