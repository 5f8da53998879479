"""LW_MergeLoRA in a real ComfyUI: a 3-LoRA concat merge equals the stack; bad input writes nothing."""
import json

import pytest
import torch
from safetensors import safe_open

from lora_factory import lora_state_dict
from lora_fixtures import SD15, kohya_factors, sampler_prompt, save_lora

WEIGHTS = [0.7, -0.4, 0.5]


@pytest.fixture(scope="module")
def parents(comfy_host):
    model, clip = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:2]
    return [save_lora(comfy_host.loras_dir, f"merge_parent_{i}.safetensors",
                      lora_state_dict(kohya_factors(model, clip, rank=2 + i, seed=60 + i, scale=0.3), alpha=2.0 + i),
                      {"ss_base_model_version": "sd_v1"}) for i in range(3)]


def merge(comfy_host, rows, **kw):
    node = comfy_host.pack.nodes.merge_lora.MergeLoRA
    args = {"method": "concat", "target_rank": 8, "rank_mode": "fixed", "energy": 0.95, "density": 0.5, "seed": 0,
            "output_name": "", "scope": ""} | kw
    return node.execute(**args, **rows).args


def _rows(names, weights):
    out = {}
    for i, (n, w) in enumerate(zip(names, weights), start=1):
        out |= {f"lora_{i}": n, f"on_{i}": True, f"strength_model_{i}": w, f"strength_clip_{i}": w}
    return out


def _latent(comfy_host, loras):
    """Latent after core LoraLoaders chained in order (node "2" last, so the sampler uses it)."""
    chain, model, clip = {}, ["1", 0], ["1", 1]
    ids = [str(i) for i in range(10, 10 + len(loras) - 1)] + ["2"]
    for node_id, (name, strength) in zip(ids, loras):
        chain[node_id] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": name,
                                                                "strength_model": strength, "strength_clip": strength}}
        model, clip = [node_id, 0], [node_id, 1]
    return comfy_host.run(sampler_prompt(chain, seed=9), outputs=["6"])["6"].output(0)["samples"]


def test_concat_merge_file_in_core_loader_equals_the_weighted_stack(comfy_host, parents):
    lora, file_name, report = merge(comfy_host, _rows(parents, WEIGHTS), output_name="merged/three")
    assert file_name == "merged/three.safetensors"
    with safe_open(str(comfy_host.loras_dir / file_name), "pt") as f:
        meta = f.metadata()
        rank = f.get_tensor(next(k for k in f.keys() if k.endswith("lora_down.weight"))).shape[0]
    assert rank == 2 + 3 + 4  # concat: the sum of the parents' ranks
    provenance = json.loads(meta["lw.provenance"])
    assert [p["weight"] for p in provenance["parents"]] == WEIGHTS and provenance["method"] == "concat"
    assert all(len(p["sha256"]) == 64 for p in provenance["parents"])
    assert meta["ss_base_model_version"] == "sd_v1"
    merged = _latent(comfy_host, [(file_name, 1.0)])
    stacked = _latent(comfy_host, list(zip(parents, WEIGHTS)))
    base = _latent(comfy_host, [])
    assert (merged - base).abs().max() > 1e-3
    # The random tiny UNet's latents reach |x| ~ 350: compare to their scale.
    assert (merged - stacked).abs().max() / stacked.abs().max() < 1e-5


def test_svd_merge_reports_the_optimal_per_layer_error(comfy_host, parents):
    lora_core = comfy_host.pack.lora_core
    merged, _, report = merge(comfy_host, _rows(parents, WEIGHTS), method="svd", target_rank=3)
    assert report.startswith("svd merge of 3 LoRAs") and {a.rank for a in merged.adapters.values()} == {3}
    lines = report.splitlines()
    line = lines[lines.index("worst layers:") + 1]  # the worst layer
    layer = line.split()[-1]
    files = [lora_core.load_lora(str(comfy_host.loras_dir / p)) for p in parents]
    shape = files[0].adapters[layer].target_shape_2d()
    exact = sum(w * f.adapters[layer].delta(torch.Size(shape), "cpu").double() for f, w in zip(files, WEIGHTS))
    s = torch.linalg.svdvals(exact)
    optimum = float(s[3:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    got = merged.adapters[layer].delta(torch.Size(shape), "cpu").double()
    assert abs(float((got - exact).norm() / exact.norm()) - optimum) < 1e-5
    assert f"{100 * optimum:.3f}%" in line


@pytest.mark.parametrize("rows,kw,message", [
    ({}, {}, "no LoRAs to merge"),
    (None, {"target_rank": 0}, "rank"),
    (None, {"output_name": "../outside"}, "names may not contain '..'"),
])
def test_bad_input_is_refused_and_nothing_is_written(comfy_host, parents, rows, kw, message):
    before = sorted(p.name for p in comfy_host.loras_dir.rglob("*"))
    with pytest.raises(Exception, match=message):
        merge(comfy_host, _rows(parents, WEIGHTS) if rows is None else rows, method="svd", **kw)
    assert sorted(p.name for p in comfy_host.loras_dir.rglob("*")) == before


def test_mixed_base_models_are_refused(comfy_host, parents):
    xl = save_lora(comfy_host.loras_dir, "merge_xl.safetensors", lora_state_dict(
        {"lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q": (torch.ones(8, 2), torch.ones(2, 8))},
        alpha=2.0), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(Exception, match="SDXL|sdxl"):
        merge(comfy_host, _rows([parents[0], xl], [1.0, 1.0]), output_name="never_written")
    assert not (comfy_host.loras_dir / "never_written.safetensors").exists()
