"""The module names each family's own trainers write, for the files this pack saves.

kohya sd-scripts names SD1.x/SD2/SDXL LoRA modules by their diffusers paths
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`); diffusers'
`load_lora_weights` and kohya's own scripts read only those. ComfyUI names the same layers by its
ldm paths (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`), which is what training and most
loaded files give us. ComfyUI's `comfy.utils.unet_to_diffusers(unet_config)` ({diffusers path:
ComfyUI path}, the map its own LoRA key map is built from) turns one into the other; lora_core
takes the result as a plain {kohya name: standard name} map. Other families keep `lora_unet_` +
the ComfyUI path, which is what kohya and musubi-tuner write for Flux, SD3, Wan, HunyuanVideo, ...
"""
from __future__ import annotations

import comfy.utils

from ..lora_core.formats import families


def _kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def unet_names(unet_config: dict) -> dict[str, str]:
    """{kohya name of a ComfyUI UNet path: kohya sd-scripts' name of it} for one UNet layout."""
    out = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
            out[_kohya(comfy_key[: -len(".weight")])] = _kohya(diffusers_key[: -len(".weight")])
    return out


def _model_unet_config(model) -> dict | None:
    # v0.8.0: ModelPatcher.model (BaseModel).model_config (supported_models class).unet_config
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    return config if isinstance(config, dict) and "num_res_blocks" in config else None


def standard_names(family: str, model=None) -> dict[str, str]:
    """The family's standard file names as {kohya name: name written}; {} where files use ComfyUI's paths.
    From the connected model's own layout when given (exact for every UNet size), else from the
    family's standard UNet (families.Family.kohya_unet_layout)."""
    entry = families.family(family)
    if not entry.kohya_unet_layout:
        return {}
    config = (_model_unet_config(model) if model is not None else None) or entry.unet_config()
    return unet_names(config)


def host_names(names: dict[str, str]) -> dict[str, str]:
    """The inverse map: standard name -> the kohya name of the ComfyUI path (what training layers use)."""
    return {standard: kohya for kohya, standard in names.items()}
