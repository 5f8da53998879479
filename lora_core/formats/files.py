"""Load a LoRA file once: parsed results are kept while the file is unchanged on disk."""
from __future__ import annotations

import os
from collections import OrderedDict

from .. import caches
from .layouts import LoRA, parse_lora
from .safetensors_io import read_lora_file

_CACHE: "OrderedDict[tuple, LoRA]" = OrderedDict()
CACHE_SIZE = 8  # a typical stack; parsed LoRAs are small next to the model
caches.register("lora_files", _CACHE.clear)


# PEFT's save_pretrained writes the LoraConfig (lora_alpha, alpha_pattern, ...) beside the weights.
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft_config_beside(path: str) -> tuple[str, str] | None:
    """('adapter_config.json', its text) for PEFT's adapter_model.safetensors with its config beside it."""
    if os.path.basename(path) != PEFT_WEIGHTS:
        return None
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    try:
        with open(config, encoding="utf-8") as f:
            return PEFT_CONFIG, f.read()
    except OSError:
        return None


def load_lora(path: str, name: str | None = None, convert=None) -> LoRA:
    """Parse a LoRA file; `convert(tensors) -> tensors`, when given, rewrites the raw key layout first
    (the host's own conversions, e.g. ComfyUI's for BFL control and Wan Fun LoRAs). PEFT's
    `adapter_model.safetensors` takes its alphas from the `adapter_config.json` beside it."""
    stat = os.stat(path)
    config = _peft_config_beside(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, getattr(convert, "__qualname__", None), config)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    tensors, metadata = read_lora_file(path)
    if convert is not None:
        tensors = convert(tensors)
    lora = parse_lora(tensors, name or os.path.basename(path), metadata, adapter_config=config)
    lora.source_path = os.path.abspath(path)
    _CACHE[key] = lora
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return lora
