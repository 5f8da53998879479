"""LoRA files for the tiny host models, named the ways real tools name them."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from lora_factory import low_rank_factors

ATTN_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


def attention_targets(model) -> dict[str, torch.Size]:
    """UNet attention linear weights of a loaded MODEL: {host key: shape}."""
    sd = model.model.state_dict()
    return {k: v.shape for k, v in sd.items() if k.startswith("diffusion_model.") and k.endswith(ATTN_SUFFIXES)}


def kohya_name(host_key: str) -> str:
    return "lora_unet_" + host_key[len("diffusion_model."):-len(".weight")].replace(".", "_")


def clip_targets(clip) -> dict[str, torch.Size]:
    sd = clip.cond_stage_model.state_dict()
    return {k: v.shape for k, v in sd.items() if ".self_attn." in k and k.endswith("proj.weight")}


def clip_kohya_name(host_key: str) -> str:
    # clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight -> lora_te_text_model_..._q_proj
    tail = host_key.split("transformer.", 1)[1][:-len(".weight")]
    return "lora_te_" + tail.replace(".", "_")


def kohya_factors(model=None, clip=None, rank=4, seed=0, scale=0.3):
    shapes = {}
    if model is not None:
        shapes |= {kohya_name(k): (s[0], s[1]) for k, s in attention_targets(model).items()}
    if clip is not None:
        shapes |= {clip_kohya_name(k): (s[0], s[1]) for k, s in clip_targets(clip).items()}
    return low_rank_factors(shapes, rank, seed, scale)


def save_lora(folder, name: str, sd: dict, metadata: dict | None = None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(str(folder), name), metadata=metadata)
    return name


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    """Weights as ComfyUI loads them for sampling (through its model management), then unloaded."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        mm.unload_all_models()


def max_relative_error(ours: dict, theirs: dict, keys) -> float:
    worst = 0.0
    for k in keys:
        a, b = ours[k].double(), theirs[k].double()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-12)))
    return worst


SD15 = "lw_tiny_sd15.safetensors"


def sampler_prompt(lora_nodes: dict | None = None, seed: int = 3, steps: int = 3, cfg: float = 1.0) -> dict:
    """Tiny SD1.5 txt2img in API format; KSampler is node "6".

    lora_nodes: extra nodes between the checkpoint ("1") and the sampler; the last one's
    outputs 0 and 1 must be MODEL and CLIP (name it "2" to be picked up).
    """
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}
    prompt |= lora_nodes or {}
    source = "2" if "2" in prompt else "1"
    return prompt | {
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": [source, 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [source, 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": [source, 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
    }


def lycoris_state_dict(model, kind: str, seed: int) -> dict:
    """A LoHa, LoKr or DoRA file (kohya names) over the attention linears of a loaded MODEL."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (rows, cols) in attention_targets(model).items():
        n = kohya_name(key)
        if kind == "loha":
            for w in ("w1", "w2"):
                sd[f"{n}.hada_{w}_a"] = torch.randn(rows, 2, generator=g) * 0.2
                sd[f"{n}.hada_{w}_b"] = torch.randn(2, cols, generator=g) * 0.2
        elif kind == "lokr":
            sd[f"{n}.lokr_w1"] = torch.randn(2, 2, generator=g) * 0.2
            sd[f"{n}.lokr_w2_a"] = torch.randn(rows // 2, 2, generator=g) * 0.2
            sd[f"{n}.lokr_w2_b"] = torch.randn(2, cols // 2, generator=g) * 0.2
        else:  # dora
            sd[f"{n}.lora_up.weight"] = torch.randn(rows, 2, generator=g) * 0.2
            sd[f"{n}.lora_down.weight"] = torch.randn(2, cols, generator=g) * 0.2
            sd[f"{n}.dora_scale"] = torch.rand(rows, 1, generator=g) + 0.5
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    return sd
