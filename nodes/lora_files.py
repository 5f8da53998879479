"""Finding LoRA files in ComfyUI's `loras` folders, without ever leaving them."""
from __future__ import annotations

import os

import folder_paths

from ..lora_core import LoRA, load_lora, safe_join
from ..lora_core.errors import LoRAFileNotFoundError
from .comfy_compat import convert_lora

LORAS = "loras"


def lora_names() -> list[str]:
    return folder_paths.get_filename_list(LORAS)


def lora_path(name: str) -> str:
    """Full path of a LoRA named as the UI lists it; refuses names that leave the folder."""
    folders = folder_paths.get_folder_paths(LORAS)
    for folder in folders:
        full = safe_join(folder, name)
        if os.path.isfile(full):
            return full
    raise LoRAFileNotFoundError(f"LoRA '{name}' not found in the loras folders ({', '.join(folders)}). "
                        "Put the file there and press 'r' in ComfyUI to refresh the list.")


def output_path(name: str) -> str:
    """Where a LoRA we write goes: inside the first `loras` folder, '.safetensors' added."""
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return safe_join(folder_paths.get_folder_paths(LORAS)[0], name)


def load_named_lora(name: str) -> LoRA:
    return load_lora(lora_path(name), name, convert=convert_lora)


def file_fingerprint(name: str) -> str:
    try:
        stat = os.stat(lora_path(name))
        return f"{name}:{stat.st_mtime_ns}:{stat.st_size}"
    except Exception as e:  # a bad name is reported by execute(); here it only must not crash
        return f"{name}:{e}"
