"""Which base model family a LoRA was made for, from its metadata and its key names."""
from __future__ import annotations

SD1, SD2, SDXL, SD3, FLUX, UNKNOWN = "SD1.x", "SD2.x", "SDXL", "SD3", "Flux", "unknown"

_METADATA_HINTS = [  # (substring of ss_base_model_version / modelspec.architecture, family)
    ("sdxl", SDXL), ("stable-diffusion-xl", SDXL), ("flux", FLUX), ("sd3", SD3),
    ("stable-diffusion-3", SD3), ("sd_v2", SD2), ("stable-diffusion-v2", SD2),
    ("sd_v1", SD1), ("stable-diffusion-v1", SD1),
]


def guess_family(prefixes: list[str], metadata: dict[str, str]) -> str:
    hint = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    for needle, family in _METADATA_HINTS:
        if needle in hint:
            return family
    joined = "\n".join(prefixes)
    if any(s in joined for s in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return FLUX
    if "joint_blocks" in joined:
        return SD3
    if any(s in joined for s in ("lora_te2_", "text_encoder_2", "input_blocks_7_1", "input_blocks.7.1",
                                  "transformer_blocks_9", "transformer_blocks.9", "add_embedding")):
        return SDXL
    if any(s in joined for s in ("lora_unet_", "down_blocks", "input_blocks", "lora_te_")):
        return SD1
    return UNKNOWN
