"""Tiny real-architecture models for LoRA Workbench tests and demos (never shipped).

Each file has the exact key layout of the real model family, built with ComfyUI's own module
classes and filled with seeded random weights (no downloads), stored as fp16 safetensors:

  checkpoints/lw_tiny_sd15.safetensors  (~10 MB) full SD1.5-layout checkpoint for
      CheckpointLoaderSimple -> MODEL, CLIP, VAE:
      * model.diffusion_model.*   UNet: model_channels 32, channel_mult [1,2], num_res_blocks
        [1,1], one transformer per level (+ middle), context_dim 32, 2 heads, conv proj_in/out.
      * cond_stage_model.transformer.text_model.*   CLIP-L layout text encoder: hidden 32,
        2 layers, 2 heads, MLP 128, full 49408-token vocabulary (ComfyUI's bundled SD1 tokenizer).
      * first_stage_model.*   TAESD-layout VAE (taesd_encoder/taesd_decoder, 4 latent channels).
  diffusion_models/lw_tiny_sdxl.safetensors  (~2.5 MB, 1.2 M params) SDXL-layout UNet for UNETLoader: adm input
      (label_emb, 32-dim pooled + 6x256 size embeddings = 1568), context_dim 64 (= tiny clip_l 32 +
      clip_g 32), linear proj_in/out, no attention at level 0 (like SDXL), 2 heads of 32.
  diffusion_models/lw_tiny_flux.safetensors  (~0.6 MB, 0.28 M params) Flux(dev)-layout DiT for UNETLoader:
      hidden 64, 2 heads (rope axes 8+12+12), 1 double block (fused img_attn.qkv / txt_attn.qkv),
      1 single block (linear1 = fused qkv + mlp), context 32, pooled vector 32, guidance embed.

There is no tiny SDXL or Flux text encoder: feed those models hand-made conditioning
(SDXL: context [B, 77, 64] + y [B, 1568]; Flux: context [B, T, 32] + y [B, 32] + guidance).

ComfyUI's model detection only knows the real sizes, so `register()` puts LWTinySD15,
LWTinySDXL and LWTinyFlux (subclasses of the stock supported_models entries) at the front of
comfy.supported_models.models; the test fixture pack lw_test_fixture calls it at import.
Their unet_config fields only match these tiny sizes, so real models are unaffected.

Generate with: python tiny_models.py --comfyui <ComfyUI dir>   (scripts/comfy_host.py does it)
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

SEED = 1234
STORE_DTYPE = "float16"

TINY_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

# UNetModel kwargs; the same fields model_detection.detect_unet_config derives from the weights.
SD15_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 32,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}
SD15_HEADS = {"num_heads": 2, "num_head_channels": -1}

SDXL_POOLED_DIM = 32
SDXL_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 64,
    "use_linear_in_transformer": True,
    "adm_in_channels": SDXL_POOLED_DIM + 6 * 256,
}
SDXL_HEADS = {"num_heads": -1, "num_head_channels": 32}

FLUX_DIT = {
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "depth": 1,
    "depth_single_blocks": 1,
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}
FLUX_HEADS = {"num_heads": 2, "axes_dim": [8, 12, 12]}


@functools.cache
def config_classes() -> tuple:
    """The tiny model configs (built lazily: importing comfy needs ComfyUI's argument setup)."""
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as sm
    from comfy.supported_models_base import ClipTarget

    class LWTinySD1ClipModel(sd1_clip.SD1ClipModel):
        """SD1 checkpoint text encoder with the tiny CLIP-L config."""
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            config = {**TINY_CLIP_L, **model_options.get("clip_l_model_config", {})}
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "clip_l_model_config": config}, **kwargs)

    class LWTinySD15(sm.SD15):
        unet_config = {
            "context_dim": SD15_UNET["context_dim"],
            "model_channels": SD15_UNET["model_channels"],
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
        }
        unet_extra_config = SD15_HEADS

        def clip_target(self, state_dict={}):
            return ClipTarget(sd1_clip.SD1Tokenizer, LWTinySD1ClipModel)

    class LWTinySDXL(sm.SDXL):
        unet_config = {
            "model_channels": SDXL_UNET["model_channels"],
            "use_linear_in_transformer": True,
            "transformer_depth": SDXL_UNET["transformer_depth"],
            "context_dim": SDXL_UNET["context_dim"],
            "adm_in_channels": SDXL_UNET["adm_in_channels"],
            "use_temporal_attention": False,
        }
        unet_extra_config = SDXL_HEADS

    class LWTinyFlux(sm.Flux):
        unet_config = {
            "image_model": "flux",
            "guidance_embed": True,
            "hidden_size": FLUX_DIT["hidden_size"],
            "context_in_dim": FLUX_DIT["context_in_dim"],
        }
        # Detection assumes 24 heads of 128 channels; the tiny DiT has 2 heads of 32.
        unet_extra_config = FLUX_HEADS

    return LWTinySD15, LWTinySDXL, LWTinyFlux


def register() -> None:
    """Put the tiny configs first in comfy.supported_models.models (idempotent)."""
    import comfy.supported_models as sm
    tiny = config_classes()
    names = {cls.__name__ for cls in tiny}
    sm.models[:] = [*tiny, *(m for m in sm.models if m.__name__ not in names)]


# ---------------------------------------------------------------- weights

def random_state_dict(module, seed: int, gain: float = 1.0) -> dict:
    """Seeded weights for every tensor of `module`, in sorted key order (deterministic)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in sorted(module.state_dict().items()):
        noise = torch.randn(ref.shape, generator=gen, dtype=torch.float32)
        if ref.ndim >= 2:    # linear / conv / embedding: unit-variance outputs
            out[name] = noise * (gain / math.sqrt(ref[0].numel()))
        elif name.endswith("bias"):
            out[name] = noise * 0.02
        else:                # 1-D weights here are all norm scales
            out[name] = 1.0 + 0.05 * noise
    return out


def with_prefix(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def build_unet(config: dict, heads: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(image_size=32, use_spatial_transformer=True, legacy=False,
                     num_classes="sequential" if config["adm_in_channels"] else None,
                     operations=comfy.ops.disable_weight_init, **config, **heads)


def build_clip_l():
    """CLIP-L text model from ComfyUI's own SD1 config with the tiny overrides (as at load time)."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import torch
    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = {**json.loads(config_path.read_text()), **TINY_CLIP_L}
    return comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)


def build_sd15_checkpoint() -> dict:
    unet = random_state_dict(build_unet(SD15_UNET, SD15_HEADS), SEED)
    clip = random_state_dict(build_clip_l(), SEED + 1)
    clip.pop("text_projection.weight")  # SD1.5 checkpoints do not carry it
    vae = build_taesd()
    return {
        **with_prefix("model.diffusion_model.", unet),
        **with_prefix("cond_stage_model.transformer.", clip),
        **with_prefix("first_stage_model.", vae),
    }


def build_taesd() -> dict:
    import comfy.taesd.taesd
    import torch
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = random_state_dict(taesd, SEED + 2)
    # Pixels = the last conv's output, clamped to [0, 1]: centre it so images are grey-ish noise,
    # not saturated black/white.
    last = f"taesd_decoder.{len(taesd.taesd_decoder) - 1}"
    sd[f"{last}.weight"] *= 0.25
    sd[f"{last}.bias"] += 0.5
    # As ComfyUI's VAELoader sets them for taesd: SD1.5 latent scale factor, no shift.
    sd["vae_scale"] = torch.tensor(0.18215)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build_sdxl_unet() -> dict:
    return random_state_dict(build_unet(SDXL_UNET, SDXL_HEADS), SEED + 3)


def build_flux_dit() -> dict:
    import comfy.ldm.flux.model
    import comfy.ops
    dit = comfy.ldm.flux.model.Flux(image_model="flux", operations=comfy.ops.disable_weight_init,
                                    **FLUX_DIT, **FLUX_HEADS)
    return random_state_dict(dit, SEED + 4)


MODEL_FILES = {
    "checkpoints/lw_tiny_sd15.safetensors": (build_sd15_checkpoint, "model.diffusion_model.", "LWTinySD15"),
    "diffusion_models/lw_tiny_sdxl.safetensors": (build_sdxl_unet, "", "LWTinySDXL"),
    "diffusion_models/lw_tiny_flux.safetensors": (build_flux_dit, "", "LWTinyFlux"),
}


def check_detection(sd: dict, prefix: str, expected: str) -> None:
    """ComfyUI's own detection must pick the tiny config for these weights."""
    import comfy.model_detection
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    found = type(config).__name__ if config is not None else None
    if found != expected:
        raise RuntimeError(f"model detection picked {found}, expected {expected}")


def save(sd: dict, path: Path, kind: str) -> None:
    import safetensors.torch
    import torch
    dtype = getattr(torch, STORE_DTYPE)
    for name, tensor in sd.items():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"non-finite weights in {name}")
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(sd, str(tmp), metadata={"lw_tiny_model": kind})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def generate(models_dir: Path) -> list[str]:
    register()
    written = []
    for rel, (builder, prefix, config_name) in MODEL_FILES.items():
        sd = builder()
        check_detection(sd, prefix, config_name)
        save(sd, models_dir / rel, config_name)
        written.append(rel)
    return written


def bootstrap_comfy(comfyui: Path) -> None:
    """Make `import comfy` work in this standalone process, on the CPU."""
    sys.path.insert(0, str(comfyui))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny models into a ComfyUI install.")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI root")
    parser.add_argument("--models-dir", type=Path, help="default: <comfyui>/models")
    args = parser.parse_args()
    bootstrap_comfy(args.comfyui.resolve())
    written = generate((args.models_dir or args.comfyui / "models").resolve())
    print(json.dumps(written))  # last stdout line: read by scripts/comfy_host.py


if __name__ == "__main__":
    main()
