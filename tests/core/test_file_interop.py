"""Files every tool reads the same way (issue 12), lora_core alone: diffusers/PEFT alphas from the
`lora_adapter_metadata` header entry and adapter_config.json, bare diffusers module names, one alpha per
file, standard names on writing, reproducible bytes and tensor-data identities."""
import json
import math
import struct

import torch
from safetensors import safe_open

from lora_core import LoRA, LowRankAdapter, parse_lora, read_lora_file
from lora_core.formats import file_sha256
from lora_core.formats.export import build_metadata, file_alpha, kohya_prefix, lora_state_dict, save_lora
from lora_core.formats.files import load_lora
from lora_core.formats.keymap import candidate_names, resolve
from lora_core.formats.safetensors_io import data_sha256, tensors_data_sha256, write_lora_file
from lora_core.merging import merge_loras
from lora_factory import lora_state_dict as factory_state_dict
from lora_factory import low_rank_factors

UNET = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
SHAPES = {f"{UNET}.to_q": (24, 16), f"{UNET}.to_k": (24, 16), f"{UNET}.to_v": (24, 16)}


def peft_file(rank=4, metadata=None, root=""):
    factors = low_rank_factors(SHAPES, rank, seed=3)
    sd = factory_state_dict(factors, None, layout="peft", rename=lambda p: root + p)
    return sd, factors


def scale_of(lora, prefix):
    return lora.adapters[prefix].alpha / lora.adapters[prefix].rank


def test_model_level_metadata_gives_lora_alpha_and_alpha_pattern_per_module():
    """UNet2DConditionModel.save_lora_adapter: bare names, config keys unprefixed; the first
    alpha_pattern key matching the name's end at a dot boundary wins, as in PEFT."""
    sd, _ = peft_file()
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_k": 16, "o_k": 99}, "rank_pattern": {},
              "target_modules": ["to_q", "to_k", "to_v"]}
    lora = parse_lora(sd, "a.safetensors", {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    assert scale_of(lora, f"{UNET}.to_q") == 2.0 and scale_of(lora, f"{UNET}.to_v") == 2.0
    assert scale_of(lora, f"{UNET}.to_k") == 4.0  # 'o_k' would match only at a dot boundary: it does not
    summary = lora.alpha_summary()
    assert summary == ["8 from lora_adapter_metadata lora_alpha (2 modules)",
                       "16 from lora_adapter_metadata alpha_pattern 'attn1.to_k' (1 module)"]


def test_pipeline_level_metadata_is_prefixed_by_component():
    """save_lora_weights(unet_lora_adapter_metadata=...): 'unet.lora_alpha' for 'unet.<path>' modules."""
    sd, _ = peft_file(root="unet.")
    sd.update({f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj{s}": t for s, t in
               ((".lora_A.weight", torch.ones(2, 8)), (".lora_B.weight", torch.ones(8, 2)))})
    meta = {"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {"to_v": 12},
            "text_encoder.r": 2, "text_encoder.lora_alpha": 1}
    lora = parse_lora(sd, "p.safetensors", {"lora_adapter_metadata": json.dumps(meta)})
    assert scale_of(lora, f"unet.{UNET}.to_q") == 0.5 and scale_of(lora, f"unet.{UNET}.to_v") == 3.0
    assert scale_of(lora, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == 0.5


def test_rslora_scales_by_alpha_over_sqrt_rank():
    sd, _ = peft_file(rank=4)
    lora = parse_lora(sd, "r.safetensors", {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8,
                                                                                 "use_rslora": True})})
    assert math.isclose(scale_of(lora, f"{UNET}.to_q"), 8 / math.sqrt(4))
    assert "rsLoRA" in lora.alpha_summary()[0]


def test_a_modules_own_alpha_tensor_wins_and_no_alpha_means_scale_one():
    sd, _ = peft_file()
    sd[f"{UNET}.to_q.alpha"] = torch.tensor(1.0)
    lora = parse_lora(sd, "o.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    assert scale_of(lora, f"{UNET}.to_q") == 0.25 and scale_of(lora, f"{UNET}.to_k") == 2.0
    plain = parse_lora(peft_file()[0], "n.safetensors")
    assert plain.adapters[f"{UNET}.to_q"].alpha is None and plain.alpha_summary() == [
        "- from none in the file: alpha = rank (scale 1) (3 modules)"]


def test_peft_adapter_config_json_beside_adapter_model(tmp_path):
    """PEFT's save_pretrained: adapter_model.safetensors + adapter_config.json in one folder."""
    sd, _ = peft_file()
    sd = {"base_model.model." + k: v for k, v in sd.items()}
    write_lora_file(str(tmp_path / "adapter_model.safetensors"), sd, {"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 32, "peft_type": "LORA"}))
    lora = load_lora(str(tmp_path / "adapter_model.safetensors"))
    assert scale_of(lora, f"base_model.model.{UNET}.to_q") == 8.0
    assert lora.alpha_summary() == ["32 from adapter_config.json lora_alpha (3 modules)"]


def test_bare_diffusers_names_resolve_under_their_component():
    unet_map = {f"lora_unet_{UNET.replace('.', '_')}_to_k": "diffusion_model.input_blocks.1.1.x.weight"}
    assert resolve(f"{UNET}.to_k", unet_map)[1] == "diffusion_model.input_blocks.1.1.x.weight"
    assert "transformer.transformer_blocks.0.attn.to_q" in candidate_names("transformer_blocks.0.attn.to_q")
    assert "transformer.single_transformer_blocks.0.attn.to_q" in candidate_names(
        "single_transformer_blocks.0.attn.to_q")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in candidate_names(
        "text_model.encoder.layers.0.self_attn.q_proj")
    # kohya names: UNet and ComfyUI paths have one; an unknown dotted name is kept as written.
    assert kohya_prefix(f"{UNET}.to_k") == f"lora_unet_{UNET.replace('.', '_')}_to_k"
    assert kohya_prefix("diffusion_model.double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya_prefix("transformer_blocks.0.attn.to_q") == "transformer_blocks.0.attn.to_q"


def _two_ranks():
    """Two LoRAs of ranks 4 and 8 (alphas 2 and 8) over overlapping layers."""
    a = parse_lora(factory_state_dict(low_rank_factors({"lora_unet_x_to_q": (24, 16), "lora_unet_x_to_k": (24, 16)},
                                                       4, seed=1), alpha=2.0), "a")
    b = parse_lora(factory_state_dict(low_rank_factors({"lora_unet_x_to_q": (24, 16)}, 8, seed=2), alpha=8.0), "b")
    return a, b


def test_every_module_is_written_with_one_alpha_and_means_the_same(tmp_path):
    """A concat merge of rank-4 and rank-8 parents has ranks 12 and 4: one alpha for the file, the
    ratio folded into up, and the file's deltas equal the merge's."""
    a, b = _two_ranks()
    merged, _ = merge_loras([(a, 0.7), (b, -0.5)], method="concat")
    assert sorted(x.rank for x in merged.adapters.values()) == [4, 12]
    sd = lora_state_dict(merged)
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {file_alpha(merged)} and len(alphas) == 1
    path = tmp_path / "m.safetensors"
    save_lora(str(path), merged, {})
    back = load_lora(str(path))
    for prefix, adapter in merged.adapters.items():
        shape = torch.Size(adapter.target_shape_2d())
        want = adapter.delta(shape, "cpu", torch.float64)
        got = back.adapters[prefix].delta(shape, "cpu", torch.float64)
        assert float((got - want).norm() / want.norm()) < 1e-6


def test_names_map_writes_the_familys_standard_names_and_merges_both_namings():
    ldm, std = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", f"lora_unet_{UNET.replace('.', '_')}_to_q"
    a = parse_lora(factory_state_dict(low_rank_factors({ldm: (24, 16)}, 4, seed=5), alpha=4.0), "ldm")
    b = parse_lora(factory_state_dict(low_rank_factors({std: (24, 16)}, 4, seed=6), alpha=4.0), "std")
    names = {ldm: std}
    merged, report = merge_loras([a, b], method="concat", names=names)
    assert len(merged.adapters) == 1 and report.layers[0].inputs == 2  # one layer, named both ways
    assert sorted(lora_state_dict(merged, names=names)) == [f"{std}.alpha", f"{std}.lora_down.weight",
                                                            f"{std}.lora_up.weight"]


def test_same_inputs_same_bytes_sorted_header_and_no_clock(tmp_path):
    a, _ = _two_ranks()
    meta = build_metadata(title="t", base_family="SD1.x", rank=4, alpha=2, scope="s", provenance={"x": 1})
    assert "modelspec.date" not in meta
    assert build_metadata(title="t", base_family="SD1.x", rank=4, alpha=2, scope="s", provenance={},
                          date="2026-01-02T03:04:05Z")["modelspec.date"] == "2026-01-02T03:04:05Z"
    paths = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    for path in paths:
        save_lora(str(path), a, dict(reversed(list(meta.items()))) if path.name == "two.safetensors" else meta)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    raw = paths[0].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert list(header)[1:] == sorted(list(header)[1:])
    tensors, read_meta = read_lora_file(str(paths[0]))
    assert read_meta == meta and set(tensors) == set(lora_state_dict(a))
    with safe_open(str(paths[0]), "pt") as f:  # safetensors' own reader
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in f.keys())


def test_data_sha256_survives_renaming_and_retagging(tmp_path):
    a, _ = _two_ranks()
    first, second = tmp_path / "a.safetensors", tmp_path / "renamed.safetensors"
    save_lora(str(first), a, {"ss_output_name": "a"})
    save_lora(str(second), a, {"ss_output_name": "a, re-tagged", "modelspec.trigger_phrase": "new"})
    assert file_sha256(str(first)) != file_sha256(str(second))
    assert data_sha256(str(first)) == data_sha256(str(second)) == tensors_data_sha256(lora_state_dict(a))


def test_file_alpha_keeps_a_uniform_alpha_and_fills_missing_ones_with_rank():
    up, down = torch.ones(8, 2), torch.ones(2, 8)
    uniform = LoRA("u", {f"m{i}": LowRankAdapter({"up": up, "down": down, "alpha": torch.tensor(16.0)})
                         for i in range(3)})
    assert file_alpha(uniform) == 16.0
    assert all(float(v) == 16.0 for k, v in lora_state_dict(uniform).items() if k.endswith(".alpha"))
    bare = LoRA("b", {"m": LowRankAdapter({"up": up, "down": down})})
    assert file_alpha(bare) == 2.0
