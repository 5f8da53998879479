"""The one place lora_core meets ComfyUI's model management.

Merge mode goes through ModelPatcher.add_patches with a WeightAdapterBase subclass, so
ComfyUI itself backs weights up, patches them on the load device (also in lowvram mode)
and restores them on unpatch. Bypass mode installs lora_core.BypassForward through
ModelPatcher.add_object_patch, which ComfyUI sets on load and removes on unpatch.
Everything works on clones; the shared base model is never touched.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import comfy.lora
import comfy.utils
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..lora_core import (
    CLIP,
    MODEL,
    BypassForward,
    LoRA,
    MatchResult,
    Target,
    Term,
    apply_terms,
    caches,
    match_lora,
    supports_bypass,
)
from ..lora_core.formats import families
from ..lora_core.formats.variants import all_additive
from ..lora_core.patching.block_weights import strength_at
from ..lora_core.stacking.spectral import WeightSpectra
from . import comfy_compat
from .lw_types import BYPASS


@dataclass(frozen=True)
class ForeignPatch:
    """A layer of a LoRA that ComfyUI core applies (an algorithm lora_core does not read, or a layer the host
    transforms): the name core knows the module by, its tensors under that name, and the strength."""
    target: Target
    core_name: str
    tensors: dict[str, torch.Tensor]
    strength: float


@dataclass(frozen=True)
class PatchCounts:
    """What apply_layers did to one of MODEL / CLIP, for the reports."""
    merged: int            # layers patched into the weights by our fused patch
    bypassed: int          # layers run beside the frozen weights
    merged_in_bypass: int  # layers merged although bypass was asked (DoRA, sliced layers)
    core: int              # ForeignPatches handed to ComfyUI core


class WorkbenchWeightPatch(WeightAdapterBase):
    """A layer's fused LoRA terms, applied by ComfyUI's own weight-patching loop."""

    name = "lora_workbench"

    def __init__(self, terms: list[Term]):
        self.terms = terms
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # Fused per patch, not kept: fp32 copies of every layer's factors held with the MODEL cost more
        # memory than core's loader (see LowRankAdapter.matrices32) for ~6% of the patch time.
        return apply_terms(weight, self.terms, strength)


def model_family(model=None, clip=None) -> str:
    """The registry family of the connected MODEL (from its ComfyUI config class), else of the CLIP."""
    if model is not None:
        classes = comfy_compat.config_class_names(model)
        found = families.family_of_host_config(classes)
        return found if found != families.UNKNOWN else f"{families.UNKNOWN} ({classes[0]})"
    if clip is not None:
        names = {k.split(".", 1)[0] for k in clip.cond_stage_model.state_dict()}
        if "clip_g" in names:
            return families.SDXL
        if "t5xxl" in names:
            return families.FLUX
        return families.SD1
    return families.UNKNOWN


# Key maps and weight shapes per live model: building them walks the whole state dict.
_HOST_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[dict, dict]]" = weakref.WeakKeyDictionary()
caches.register("host_key_maps", _HOST_CACHE.clear)


def _host_keys(module: torch.nn.Module, builder) -> tuple[dict, dict]:
    if module not in _HOST_CACHE:
        key_map = builder(module, {})
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        _HOST_CACHE[module] = (key_map, shapes)
    return _HOST_CACHE[module]


# Match results per LoRA and live MODEL/CLIP: a re-run after a strength change matches nothing again. A result
# holds its LoRA, so the memo is the LoRA's own (LoRA.memos["matches"]) and goes with it; the modules are
# held weakly. _MATCHED finds those memos for caches.clear.
_MATCHED: "weakref.WeakValueDictionary[int, LoRA]" = weakref.WeakValueDictionary()


def _clear_matches() -> None:
    for lora in list(_MATCHED.values()):
        lora.memos.pop("matches", None)
    _MATCHED.clear()


caches.register("matches", _clear_matches)


def match_on_host(lora: LoRA, model=None, clip=None, allow_partial: bool = False) -> MatchResult:
    """match_lora against the connected MODEL/CLIP; memoised while the LoRA and the modules live."""
    model_module = None if model is None else model.model
    clip_module = None if clip is None else clip.cond_stage_model
    if model_module is None and clip_module is None:
        return _match(lora, model, clip, allow_partial)
    memo = lora.memos.setdefault("matches", {})
    key = (id(model_module), id(clip_module), allow_partial)
    hit = memo.get(key)
    if hit is not None and _deref(hit[0]) is model_module and _deref(hit[1]) is clip_module:
        return hit[2]
    result = _match(lora, model, clip, allow_partial)
    for stale in [k for k, entry in memo.items() if not _alive(entry)]:
        del memo[stale]
    memo[key] = (_weak(model_module), _weak(clip_module), result)
    _MATCHED[id(lora)] = lora
    return result


def _weak(module):
    return None if module is None else weakref.ref(module)


def _deref(ref):
    return None if ref is None else ref()


def _alive(entry) -> bool:
    """A memo entry whose MODEL and CLIP (those that were connected) still exist."""
    model_ref, clip_ref, _ = entry
    return (model_ref is None or model_ref() is not None) and (clip_ref is None or clip_ref() is not None)


def _match(lora: LoRA, model, clip, allow_partial: bool) -> MatchResult:
    key_map, shapes, connected = {}, {}, set()
    for component, host, module, builder in ((MODEL, model, "model", comfy.lora.model_lora_keys_unet),
                                             (CLIP, clip, "cond_stage_model", comfy.lora.model_lora_keys_clip)):
        if host is not None:
            host_map, host_shapes = _host_keys(getattr(host, module), builder)
            key_map.update(host_map)
            shapes.update(host_shapes)
            connected.add(component)
    return match_lora(lora, key_map, shapes, connected, model_family(model, clip), allow_partial)


def base_weight(model, clip, target: Target) -> torch.Tensor:
    """The unpatched weight of a target (ComfyUI keeps originals in .backup while patched)."""
    patcher = model if target.component == MODEL else clip.patcher
    weight = comfy_compat.original_weight(patcher, target.key)
    if weight is None:
        weight = comfy.utils.get_attr(patcher.model, target.key)
    return target.narrow(weight)


# ||W||_F of base weights per live model: ComfyUI never changes a base weight for good (patches
# are undone from backups), so a Stack LoRA re-run reads none of them again.
_NORM_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Target, float]]" = weakref.WeakKeyDictionary()
caches.register("weight_norms", _NORM_CACHE.clear)


def base_weight_norms(model, clip):
    """target -> ||W||_F of its base weight, for the connected MODEL/CLIP (memoised per model)."""
    tables = {MODEL: None if model is None else _NORM_CACHE.setdefault(model.model, {}),
              CLIP: None if clip is None else _NORM_CACHE.setdefault(clip.patcher.model, {})}

    def norm(target: Target) -> float:
        table = tables[target.component]
        value = table.get(target)
        if value is None:
            value = table[target] = float(torch.linalg.vector_norm(base_weight(model, clip, target),
                                                                   dtype=torch.float32))
        return value
    return norm


# sigma_1 of base weights per live model (lower bounds and exact values), for the spectral cap; like
# the norms, never stale: ComfyUI restores every base weight from its backup.
_SPECTRA_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
caches.register("weight_spectra", _SPECTRA_CACHE.clear)


def base_weight_spectra(model, clip) -> WeightSpectra:
    """sigma_1 of base weights by target, for the connected MODEL/CLIP (memoised per model)."""
    memos = {MODEL: None if model is None else _SPECTRA_CACHE.setdefault(model.model, {}),
             CLIP: None if clip is None else _SPECTRA_CACHE.setdefault(clip.patcher.model, {})}
    return WeightSpectra(lambda target: base_weight(model, clip, target),
                         lambda target: memos[target.component])


_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()
caches.register("modules", _MODULES.clear)


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """root's submodule at a dotted path, from a per-model table (walking 128 paths per node adds up). The
    table leaves root itself out: a value holding its weak key would keep the model alive."""
    table = _MODULES.get(root)
    if table is None:
        table = _MODULES[root] = {name: module for name, module in root.named_modules() if module is not root}
    module = table.get(path)
    return module if module is not None else comfy.utils.get_attr(root, path)


# Where a target's bypass goes, per live model: its object patch name and module, or None where a bypass
# cannot run (not a .weight, not a linear or plain conv). A strength change re-patches every layer; this
# spares it the path split, the module lookup and the checks. Like _MODULES, a value never holds the model.
_BYPASS_SITES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Target, tuple | None]]" = weakref.WeakKeyDictionary()
caches.register("bypass_sites", _BYPASS_SITES.clear)


_UNSEEN = object()


def _bypass_site(root: torch.nn.Module, target: Target) -> tuple[str, torch.nn.Module] | None:
    """(object patch name, module) of the layer a target's bypass wraps; None where it cannot run in bypass."""
    table = _BYPASS_SITES.get(root)
    if table is None:
        table = _BYPASS_SITES[root] = {}
    site = table.get(target, _UNSEEN)
    if site is not _UNSEEN:
        return site
    module_path = target.key.rsplit(".", 1)[0]
    module = _submodule(root, module_path)
    site = None
    if target.key.endswith(".weight") and supports_bypass(module, target.offset):
        site = (f"{module_path}.forward", module)
    if module is not root:
        table[target] = site
    return site


def _patch_key(target: Target):
    if target.function is not None:
        return (target.key, target.offset, target.function)
    return target.key if target.offset is None else (target.key, target.offset)


def _take_chained_terms(patcher, target: Target) -> list[Term]:
    """Terms of an earlier Workbench patch on the same weight (a chain of our nodes), removed from
    this clone so both land in ONE fused product: one pass over the weight instead of one per
    node. Only the last patch is taken (order with core's patches is kept); clone() gave this
    patcher its own lists, so the upstream MODEL keeps its patches."""
    entries = comfy_compat.weight_patches(patcher, target.key)
    if not entries:
        return []
    last = entries[-1]
    same_slice = (None if last.offset is None else tuple(last.offset)) == target.offset
    if not (isinstance(last.patch, WorkbenchWeightPatch) and last.strength_patch == 1.0
            and last.strength_model == 1.0 and same_slice and last.function is None):
        return []
    comfy_compat.set_weight_patches(patcher, target.key, entries[:-1])
    return list(last.patch.terms)


def foreign_patches(match: MatchResult, strengths: tuple) -> list[ForeignPatch]:
    """match.foreign at (strength_model, strength_clip[, model strength per block]); layers at strength 0
    are left out."""
    patches = [ForeignPatch(target, module.core_name, module.tensors, strength_at(strengths, target))
               for target, module in match.foreign.items()]
    return [p for p in patches if p.strength != 0.0]


def _patch_patcher(patcher, layers: dict[Target, list[Term]], foreign: list[ForeignPatch], mode: str,
                   plain: bool = False) -> PatchCounts:
    """Add our patches to an already-cloned ModelPatcher; returns counts for the report. `plain`: every
    term is an additive low-rank adapter (StackAnalysis.plain), so no adapter is asked again."""
    weight_patches, bypassed, merged_instead = {}, 0, 0
    for target, terms in layers.items():
        site = _bypass_site(patcher.model, target) if mode == BYPASS else None
        if site is not None and (plain or all_additive(terms)):
            name, module = site
            patcher.add_object_patch(name, BypassForward(module, terms, target.offset,
                                                         inner=comfy_compat.current_object_patch(patcher, name),
                                                         all_low_rank=plain))
            bypassed += 1
        else:
            merged_instead += mode == BYPASS
            weight_patches[_patch_key(target)] = WorkbenchWeightPatch(_take_chained_terms(patcher, target) + terms)
    if weight_patches:
        patcher.add_patches(weight_patches, 1.0)
    for patch in foreign:
        loaded = comfy_compat.core_load_lora(patch.tensors, {patch.core_name: _patch_key(patch.target)})
        patcher.add_patches(loaded, patch.strength)
    return PatchCounts(len(weight_patches), bypassed, merged_instead, len(foreign))


def apply_layers(model, clip, layers: dict[Target, list[Term]], foreign: list[ForeignPatch], mode: str,
                 plain: bool = False) -> tuple[object, object, dict[str, PatchCounts]]:
    """Clone MODEL/CLIP and patch the clones; returns them with the counts per component patched.
    `plain`: every term is an additive low-rank adapter, as StackAnalysis.plain says."""
    counts: dict[str, PatchCounts] = {}
    new_model, new_clip = model, clip
    for component, host in ((MODEL, model), (CLIP, clip)):
        part = {t: terms for t, terms in layers.items() if t.component == component}
        part_foreign = [f for f in foreign if f.target.component == component]
        if host is None or not (part or part_foreign):
            continue
        clone = host.clone()
        patcher = clone if component == MODEL else clone.patcher
        counts[component] = _patch_patcher(patcher, part, part_foreign, mode, plain)
        if component == MODEL:
            new_model = clone
        else:
            new_clip = clone
    return new_model, new_clip, counts
