"""Which layers of a host model a new LoRA trains: named presets over weight keys, per family."""
from __future__ import annotations

from ..errors import LoRASettingsError
from ..formats.families import UNKNOWN, family

ATTENTION, ATTENTION_FF, CROSS_ATTENTION = "attention", "attention + feed-forward", "cross-attention"
# Each preset's pattern kinds in the family registry (lora_core.formats.families.Family).
_KINDS = {ATTENTION: ("attention",), ATTENTION_FF: ("attention", "feed_forward"), CROSS_ATTENTION: ("cross_attention",)}
PRESETS = list(_KINDS)
MODEL_ROOT = "diffusion_model."


def select_targets(weight_shapes: dict[str, tuple], preset: str = ATTENTION, family_name: str = UNKNOWN) -> list[str]:
    """Weight keys of 2-D (linear) layers the preset trains on this family, sorted for determinism.

    Keys are the host's (`diffusion_model.<path>.weight`); the family's registry entry names its
    attention (feed-forward, cross-attention) linears by that family's own module names. The
    cross-attention preset trains only the layers that read the text (on the toy world it kept
    untriggered prompts a little better than all attention layers); families whose text and image
    tokens share one joint attention have none, and are refused before any training.
    """
    if preset not in PRESETS:
        raise LoRASettingsError(f"targets '{preset}' unknown; choose one of {PRESETS}.")
    entry = family(family_name)
    if preset == CROSS_ATTENTION and not entry.cross_attention:
        raise LoRASettingsError(
            f"targets '{CROSS_ATTENTION}': a {family_name} model has no separate cross-attention layers (its text "
            f"and image tokens share one joint attention, or its family is not known); choose '{ATTENTION}'.")
    keys = []
    for key, shape in weight_shapes.items():
        if len(shape) != 2 or not key.startswith(MODEL_ROOT) or not key.endswith(".weight"):
            continue
        if entry.is_target(key[len(MODEL_ROOT):-len(".weight")], _KINDS[preset]):
            keys.append(key)
    return sorted(keys)
