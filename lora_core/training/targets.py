"""Which layers of a host model a new LoRA trains: named presets over weight keys, per family."""
from __future__ import annotations

from ..errors import LoRASettingsError
from ..formats.families import UNKNOWN, family

ATTENTION, ATTENTION_FF = "attention", "attention + feed-forward"
PRESETS = [ATTENTION, ATTENTION_FF]
MODEL_ROOT = "diffusion_model."


def select_targets(weight_shapes: dict[str, tuple], preset: str = ATTENTION, family_name: str = UNKNOWN) -> list[str]:
    """Weight keys of 2-D (linear) layers the preset trains on this family, sorted for determinism.

    Keys are the host's (`diffusion_model.<path>.weight`); the family's registry entry names its
    attention (and feed-forward) linears by that family's own module names.
    """
    if preset not in PRESETS:
        raise LoRASettingsError(f"targets '{preset}' unknown; choose one of {PRESETS}.")
    entry = family(family_name)
    keys = []
    for key, shape in weight_shapes.items():
        if len(shape) != 2 or not key.startswith(MODEL_ROOT) or not key.endswith(".weight"):
            continue
        if entry.is_target(key[len(MODEL_ROOT):-len(".weight")], feed_forward=preset == ATTENTION_FF):
            keys.append(key)
    return sorted(keys)
