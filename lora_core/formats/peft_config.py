"""The alpha of each module of a diffusers/PEFT file, read the way diffusers and PEFT read it.

diffusers' `save_lora_adapter` and `save_lora_weights(..., unet_lora_adapter_metadata=...)` write no
`.alpha` tensors: `lora_alpha`, `alpha_pattern`, `rank_pattern` and `use_rslora` of the PEFT
`LoraConfig` sit in the safetensors header entry `lora_adapter_metadata` (JSON). A model-level file
holds the config's keys as they are ({"r": 4, "lora_alpha": 8, ...}); a pipeline-level file prefixes
them with the component ({"unet.lora_alpha": 8, "text_encoder.r": 4, ...}). PEFT's own
`save_pretrained` writes the same config as `adapter_config.json` beside `adapter_model.safetensors`.

PEFT scales a module by alpha / r (alpha / sqrt(r) with use_rslora), alpha being the first
`alpha_pattern` key whose regex matches the end of the module's name at a dot boundary
(`re.match(rf"(.*\\.)?({key})$", name)`, peft.utils.other.get_pattern_key), else `lora_alpha`.
Here the same alpha is turned into a kohya-style alpha (alpha' / rank == PEFT's scale) so the rest
of the pack applies every module as diffusers does, and each module says where its alpha came from.
"""
from __future__ import annotations

import json
import math
import re

from .keymap import PEFT_ROOT

METADATA_KEY = "lora_adapter_metadata"
# PEFT LoraConfig defaults (peft 0.21): what a config without the key means.
DEFAULT_R, DEFAULT_ALPHA = 8, 8
# Where the alpha of a module came from (LoRA.alpha_sources values start with one of these).
FROM_FILE = "the file's .alpha"
NO_ALPHA = "none in the file: alpha = rank"


def read_configs(raw: str | dict | None) -> dict[str, dict]:
    """{component root ('' for a model-level config): LoraConfig dict} from a lora_adapter_metadata value."""
    if not raw:
        return {}
    try:
        config = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}
    if not isinstance(config, dict):
        return {}
    out: dict[str, dict] = {}
    for key, value in config.items():
        root, _, field = str(key).rpartition(".") if "." in str(key) else ("", "", str(key))
        out.setdefault(root, {})[field] = value
    return out


def _pattern_value(patterns, name: str):
    """PEFT's get_pattern_key: the first pattern matching the end of `name` at a dot boundary."""
    if not isinstance(patterns, dict):
        return None, None
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key, value
        except re.error:
            continue
    return None, None


def _config_for(prefix: str, configs: dict[str, dict]) -> tuple[str, dict] | None:
    """(module name as PEFT matched it, config) for a module prefix of the file."""
    for root in sorted(configs, key=len, reverse=True):
        if root and prefix.startswith(root + "."):
            return prefix[len(root) + 1:].removeprefix(PEFT_ROOT), configs[root]
    if "" in configs:
        return prefix.removeprefix(PEFT_ROOT), configs[""]
    return None


def module_alpha(prefix: str, rank: int, configs: dict[str, dict], source: str) -> tuple[float, str] | None:
    """(kohya alpha with alpha / rank == PEFT's scale, where it came from) or None when no config covers it."""
    found = _config_for(prefix, configs)
    if found is None:
        return None
    name, config = found
    key, alpha = _pattern_value(config.get("alpha_pattern"), name)
    if key is not None:
        label = f"{source} alpha_pattern '{key}'"
    else:
        alpha = config.get("lora_alpha", DEFAULT_ALPHA)
        label = f"{source} lora_alpha"
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(alpha):
        return None
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank), f"{label} (rsLoRA: scale alpha/sqrt(r))"
    return alpha, label
