"""Every touch of ComfyUI internals that are not its public API, in one place.

Written against ComfyUI v0.8.0 (commit fc0cb10b). Each function names the internal it relies
on; tests/host/test_comfy_compat.py checks every one of those assumptions against the host, so
when ComfyUI moves underneath the pack, that test fails and this module is the one place to fix.
Public API (ModelPatcher.clone/add_patches/add_object_patch, comfy.lora key maps, load_lora,
model_management.load_models_gpu) is used directly elsewhere.
"""
from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import comfy.ldm.common_dit
import comfy.lora
import comfy.lora_convert
import comfy.model_management as mm
import torch

WRITTEN_AGAINST = "0.8.0"


class WeightPatchEntry(NamedTuple):
    """One entry of ModelPatcher.patches[key] (v0.8.0: a 5-tuple in this order)."""

    strength_patch: float
    patch: object
    strength_model: float
    offset: object
    function: object


def weight_patches(patcher, key: str) -> list[WeightPatchEntry]:
    """ModelPatcher.patches[key] (v0.8.0: dict of key -> list of 5-tuples), read as named entries."""
    return [WeightPatchEntry(*entry) for entry in patcher.patches.get(key, ())]


def set_weight_patches(patcher, key: str, entries: list[WeightPatchEntry]) -> None:
    """Replace ModelPatcher.patches[key]; an empty list removes the key (as ComfyUI never stores one)."""
    if entries:
        patcher.patches[key] = [tuple(e) for e in entries]
    else:
        patcher.patches.pop(key, None)


def has_weight_patches(patcher) -> bool:
    return bool(patcher.patches)


def original_weight(patcher, key: str):
    """The unpatched weight while ComfyUI has a patched one in place (v0.8.0: patcher.backup[key].weight,
    a namedtuple with `weight` and `inplace_update`); None when the weight is not patched now."""
    backup = patcher.backup.get(key)
    return None if backup is None else backup.weight


def current_object_patch(patcher, name: str):
    """The object patch already set on this clone under `name` (v0.8.0: patcher.object_patches dict)."""
    return patcher.object_patches.get(name)


def weights_written_into_module(model) -> bool:
    """Does the module hold patched weights now? (v0.8.0: BaseModel.current_weight_patches_uuid)."""
    return getattr(model.model, "current_weight_patches_uuid", None) is not None


def copy_weights_before_patching(patcher) -> None:
    """Make ComfyUI patch copies of the weights instead of updating them in place (v0.8.0:
    ModelPatcher.weight_inplace_update), so autograd never sees a weight change under it."""
    patcher.weight_inplace_update = False


def config_class_names(model) -> list[str]:
    """Class names of the model's config (comfy.supported_models), most specific first
    (v0.8.0: ModelPatcher.model.model_config)."""
    config = getattr(model.model, "model_config", None)
    return [] if config is None else [cls.__name__ for cls in type(config).__mro__]


def unload_model(patcher) -> bool:
    """Unload one patcher now and drop it from ComfyUI's loaded list, restoring its weights
    (v0.8.0: model_management.current_loaded_models entries with .model and .model_unload())."""
    for index, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
            return True
    return False


def convert_lora(state_dict: dict) -> dict:
    """The conversions core's LoraLoader applies before key mapping (BFL control LoRAs with biases
    and norm scales, Wan "Fun" LoRAs, USO): comfy.lora_convert.convert_lora in v0.8.0."""
    return comfy.lora_convert.convert_lora(state_dict)


def core_load_lora(tensors: dict, to_load: dict):
    """comfy.lora.load_lora for the modules handed to core (public, but its log_missing flag is not)."""
    return comfy.lora.load_lora(tensors, to_load, log_missing=False)


# ---------------------------------------------------------------- training-only swaps

def _rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # ComfyUI's reference rope (comfy/ldm/flux/math.py), plain torch ops, so autograd flows through it.
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _rope(xq, xk, freqs_cis):
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


ROPE_REPLACEMENTS = (("apply_rope", _rope), ("apply_rope1", _rope1))


def kitchen_rope_bindings() -> list[tuple[object, str, object]]:
    """(module, name, function) for every comfy.ldm module whose apply_rope/apply_rope1 is comfy_kitchen's
    fused op (v0.8.0: comfy/ldm/flux/math.py binds them; wan, qwen_image, lumina, hidream import them)."""
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy.ldm.") or module is None:
            continue
        for attr, _ in ROPE_REPLACEMENTS:
            current = getattr(module, attr, None)
            origin = getattr(current, "__module__", "") or ""
            if current is not None and origin != __name__ and "kitchen" in (repr(current) + origin).lower():
                found.append((module, attr, current))
    return found


@contextlib.contextmanager
def differentiable_rope():
    """comfy_kitchen's fused rope op has no backward; training swaps in the reference math meanwhile."""
    replacements = dict(ROPE_REPLACEMENTS)
    swapped = kitchen_rope_bindings()
    for module, attr, _ in swapped:
        setattr(module, attr, replacements[attr])
    try:
        yield
    finally:
        for module, attr, original in swapped:
            setattr(module, attr, original)


@contextlib.contextmanager
def private_input_rms_norm():
    """DiT blocks (LTX-Video) call the functional comfy.ldm.common_dit.rms_norm on the residual stream
    and then update that stream in place; a norm that keeps its input for backward must keep a copy.
    v0.8.0: blocks look the function up on the module at call time, so rebinding it reaches them."""
    original = comfy.ldm.common_dit.rms_norm

    def rms_norm(x, *args, **kwargs):
        return original(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

    comfy.ldm.common_dit.rms_norm = rms_norm
    try:
        yield
    finally:
        comfy.ldm.common_dit.rms_norm = original


@contextlib.contextmanager
def training_swaps():
    """Everything training swaps in ComfyUI for its duration (forward and backward alike)."""
    with differentiable_rope(), private_input_rms_norm():
        yield
