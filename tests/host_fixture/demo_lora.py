"""A small LoRA for the tiny SD1.5 model, so the demo and example workflows run with no download.

Rank 4 on the UNet attention linears and the text encoder's attention, seeded, kohya keys,
with the metadata real trainers write (trigger phrase, base model, scope).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# (file, seed, trigger word): the style the demo trains beside, and three for the stack/merge examples.
DEMO_LORAS = [("lw_demo_style.safetensors", 77, "lwstyle"), ("lw_demo_a.safetensors", 101, "lwdemoa"),
              ("lw_demo_b.safetensors", 102, "lwdemob"), ("lw_demo_c.safetensors", 103, "lwdemoc")]
ATTENTION = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", "_proj.weight")


def _kohya_name(key: str) -> str | None:
    if key.startswith("model.diffusion_model.") and key.endswith(ATTENTION[:4]):
        return "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
    if key.startswith("cond_stage_model.transformer.text_model.") and ".self_attn." in key and key.endswith(
            ATTENTION[4]):
        return "lora_te_" + key[len("cond_stage_model.transformer."):-len(".weight")].replace(".", "_")
    return None


def make_demo_lora(checkpoint: Path, out_dir: Path, name: str, seed: int, trigger: str, rank: int = 4) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in sorted(f.keys()):
            module = _kohya_name(key)
            if module is None:
                continue
            rows, cols = f.get_slice(key).get_shape()
            tensors[f"{module}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.3
            tensors[f"{module}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.3
            tensors[f"{module}.alpha"] = torch.tensor(float(rank))
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank), "ss_base_model_version": "sd_v1",
                "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.title": f"LoRA Workbench demo ({trigger})",
                "modelspec.trigger_phrase": trigger,
                "ss_tag_frequency": json.dumps({f"10_{trigger}": {trigger: 10, "lighthouse": 4}}),
                "lw.scope": "one style: the demo style of the tiny test model"}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    save_file(tensors, str(path), metadata=metadata)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--comfyui", type=Path, required=True)
    args = parser.parse_args()
    checkpoint = args.comfyui / "models" / "checkpoints" / "lw_tiny_sd15.safetensors"
    paths = [str(make_demo_lora(checkpoint, args.comfyui / "models" / "loras", *spec)) for spec in DEMO_LORAS]
    print(json.dumps(paths))
