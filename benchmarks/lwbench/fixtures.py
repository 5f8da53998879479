"""Benchmark models and LoRAs: a full-size SD1.5 UNet and a reduced-depth one, synthetic kohya LoRAs.

Models are built with ComfyUI's own UNetModel from the SD1.5 config (comfy.supported_models.SD15's
unet_config/unet_extra_config plus the SD1.5 block layout that comfy/model_detection.py lists for
it), filled with seeded random weights (1/sqrt(fan_in) scaling, as tests/host_fixture/tiny_models.py),
written once to a safetensors file in the cache (outside the checkout) and loaded through ComfyUI's
own UNETLoader node, so ComfyUI's detection picks SD15 and the MODEL is a real ModelPatcher.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

FULL_MODEL_FILE = "lw_bench_sd15_full_s1234.safetensors"
TRAIN_MODEL_FILE = "lw_bench_sd15_reduced_s1235.safetensors"
STORE_DTYPE = torch.float16  # on disk; ComfyUI loads SD1.5 as fp32 on the CPU

# The SD1.5 block layout (comfy/model_detection.py, unet_config_from_diffusers_unet's SD15 entry).
SD15_LAYOUT = {
    "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
# Reduced depth for CPU training: SD1.5's first level only (320 channels, its attention/ff sizes),
# one res block + transformer down, the middle block, two up; 25.8 M parameters.
REDUCED_LAYOUT = {
    "in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
    "transformer_depth": [1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1],
}

ATTN = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
FF = (".ff.net.0.proj.weight", ".ff.net.2.weight")
PROJ = (".proj_in.weight", ".proj_out.weight")
TARGET_SETS = {"attention": ATTN, "typical": ATTN + FF + PROJ}


def unet_kwargs(layout: dict) -> dict:
    import comfy.supported_models as sm
    config = {k: v for k, v in sm.SD15.unet_config.items() if k != "use_temporal_attention"}
    return {"image_size": 32, "use_spatial_transformer": True, "legacy": False, "num_classes": None,
            **config, **sm.SD15.unet_extra_config, **layout}


def build_unet(layout: dict, device="meta"):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device(device):
        return UNetModel(operations=comfy.ops.disable_weight_init, **unet_kwargs(layout))


def random_state_dict(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) >= 2:
            noise *= 1.0 / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("bias"):
            noise *= 0.02
        else:  # norm scales
            noise = 1.0 + 0.05 * noise
        out[name] = noise.to(STORE_DTYPE)
    return out


def ensure_model_file(folder: Path, name: str, layout: dict, seed: int, log) -> Path:
    path = folder / name
    if path.is_file():
        return path
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: v.shape for k, v in build_unet(layout).state_dict().items()}
    log(f"writing {path} ({sum(math.prod(s) for s in shapes.values()) / 1e6:.1f} M parameters, once)")
    sd = random_state_dict(shapes, seed)
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(sd, str(tmp), metadata={"lw_bench": "random SD1.5-layout UNet"})
    os.replace(tmp, path)
    return path


def load_unet(comfy, name: str):
    """ComfyUI's own UNETLoader node, run under inference mode as its executor runs nodes."""
    import comfy.supported_models as sm
    with torch.inference_mode():
        model = comfy.node("UNETLoader")().load_unet(name, "default")[0]
    config = model.model.model_config
    if type(config) is not sm.SD15:
        raise RuntimeError(f"ComfyUI detected {type(config).__name__} for {name}, expected SD15")
    return model


# ---------------------------------------------------------------- LoRAs

def lora_targets(model, target_set: str) -> dict[str, torch.Size]:
    """{host weight key: shape} of the layers a LoRA of this kind covers."""
    suffixes = TARGET_SETS[target_set]
    return {k: v.shape for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(suffixes)}


def kohya_names(model) -> dict[str, str]:
    """host weight key -> kohya prefix as kohya-ss names SD1.5 layers (diffusers module names)."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {}
    for lora_key, host_key in key_map.items():
        if lora_key.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")):
            names[host_key] = lora_key
    return names


def write_kohya_lora(path: Path, model, target_set: str, rank: int, alpha: float, seed: int,
                     rel_change: float = 0.02) -> dict:
    """A trained-looking kohya LoRA (fp16, both factors non-zero); returns a summary."""
    import safetensors.torch
    targets = lora_targets(model, target_set)
    names = kohya_names(model)
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    sd = {}
    for key in sorted(targets):
        shape = targets[key]
        out_f, in_f = shape[0], math.prod(shape[1:])
        down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
        # delta entries ~ rel_change / sqrt(in): a 2% change of a 1/sqrt(in)-scaled weight
        up = torch.randn(out_f, rank, generator=gen) * (rel_change / (math.sqrt(rank) * scale))
        if len(shape) == 4:  # 1x1 conv (SD1.5 proj_in/proj_out)
            down, up = down.reshape(rank, in_f, 1, 1), up.reshape(out_f, rank, 1, 1)
        prefix = names[key]
        sd[f"{prefix}.lora_down.weight"] = down.to(torch.float16).contiguous()
        sd[f"{prefix}.lora_up.weight"] = up.to(torch.float16).contiguous()
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1",
            "ss_network_module": "networks.lora"}
    safetensors.torch.save_file(sd, str(path), metadata=meta)
    return {"file": path.name, "layers": len(targets), "rank": rank, "alpha": alpha,
            "bytes": path.stat().st_size}
