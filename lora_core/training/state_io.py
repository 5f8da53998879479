"""Optimizer state for resuming a run, stored as safetensors (never pickle) beside the LoRA."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ..errors import LoRAFileError
from ..formats.safetensors_io import read_header, write_lora_file

STATE_SUFFIX = ".lwstate"  # not a model extension, so ComfyUI's LoRA lists do not show it


def save_optimizer_state(path: str, optimizer: torch.optim.Optimizer, step: int) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    write_lora_file(path, tensors, {"param_groups": json.dumps(state["param_groups"]), "step": str(step)})


def load_optimizer_state(path: str) -> tuple[dict, int]:
    _, metadata = read_header(path)
    try:
        tensors = load_file(path)
        groups = json.loads(metadata["param_groups"])
        step = int(metadata["step"])
    except (KeyError, ValueError, OSError) as e:
        raise LoRAFileError(f"{path}: not a LoRA Workbench optimizer state ({e}).") from e
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}, step
