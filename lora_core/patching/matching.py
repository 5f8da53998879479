"""Match a parsed LoRA against a host model's weights and account for every module.

The result says exactly what matched, what did not and why, per component, and refuses a
LoRA made for another base model instead of silently doing nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import LoRAShapeError, WrongBaseModelError
from ..formats.adapters import Adapter
from ..formats.families import UNKNOWN, guess_family
from ..formats.keymap import is_text_encoder_name, resolve
from ..formats.layouts import LoRA
from ..formats.metadata import LoRAInfo, read_info
from ..values import CLIP, MODEL, LayerPatch, Target

# Below this share of a component's modules matching, the file is taken as made for another base.
MIN_MATCH_FRACTION = 0.5


class ForeignModule(NamedTuple):
    """A module ComfyUI core applies itself (an algorithm lora_core does not read, or a layer the host
    transforms): the name core knows it by, and its tensors under that name."""
    core_name: str
    tensors: dict[str, torch.Tensor]


@dataclass
class ComponentCoverage:
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # host part not connected

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched) + len(self.shape_mismatch) + len(self.skipped)


@dataclass
class MatchResult:
    lora: LoRA
    patches: list[LayerPatch]
    foreign: dict[Target, ForeignModule]
    coverage: dict[str, ComponentCoverage]
    family: str
    model_family: str
    info: LoRAInfo

    def patches_for(self, component: str) -> list[LayerPatch]:
        return [p for p in self.patches if p.target.component == component]

    def to_dict(self) -> dict:
        return {
            "file": self.lora.name,
            "made_for": self.family,
            "model": self.model_family,
            "formats": self.lora.kinds(),
            "ranks": self.lora.ranks,
            "alphas": self.lora.alphas,
            "alpha_sources": self.lora.alpha_summary(),
            "coverage": {c: {k: list(getattr(v, k)) for k in ("matched", "unmatched", "shape_mismatch", "skipped")}
                         for c, v in self.coverage.items()},
            "handed_to_comfyui": sorted(t.key for t in self.foreign),
            "unrecognised_keys": list(self.lora.unrecognised),
            "info": self.info.to_dict(),
        }


def _target_of(entry) -> Target:
    """A host key map entry: a weight key, or (key, offset[, function])."""
    if isinstance(entry, tuple):
        key, offset = entry[0], entry[1]
        function = entry[2] if len(entry) > 2 else None
        return Target(key, tuple(offset) if offset is not None else None, function)
    return Target(entry)


def _target_shape(target: Target, host_shapes: dict[str, torch.Size]) -> torch.Size | None:
    shape = host_shapes.get(target.key)
    if shape is None or target.offset is None:
        return shape
    dim, start, length = target.offset
    if start + length > shape[dim]:  # a slice the host's map places outside the weight (grouped-query qkv)
        return torch.Size([])
    return target.slice_shape(shape)


def match_lora(lora: LoRA, key_map: dict, host_shapes: dict[str, torch.Size], connected: set[str],
               model_family: str = UNKNOWN, allow_partial: bool = False) -> MatchResult:
    """Resolve every module of `lora` to host weights of the `connected` components."""
    coverage = {MODEL: ComponentCoverage(), CLIP: ComponentCoverage()}
    patches: list[LayerPatch] = []
    host_handled: dict[Target, ForeignModule] = {}
    for prefix, adapter in lora.adapters.items():
        hit = resolve(prefix, key_map)
        component = _target_of(hit[1]).component if hit else (CLIP if is_text_encoder_name(prefix) else MODEL)
        cov = coverage[component]
        if component not in connected:
            cov.skipped.append(prefix)
            continue
        if hit is None or _target_shape(_target_of(hit[1]), host_shapes) is None:
            cov.unmatched.append(prefix)
            continue
        target = _target_of(hit[1])
        try:
            adapter.check_fits(_target_shape(target, host_shapes), f"{lora.name}: {prefix}")
        except LoRAShapeError:
            cov.shape_mismatch.append(prefix)
            continue
        cov.matched.append(prefix)
        if target.function is not None:  # the host transforms this layer's change: let it apply the module
            host_handled[target] = ForeignModule(hit[0], _as_kohya_tensors(hit[0], adapter))
            continue
        patches.append(LayerPatch(target, adapter, prefix))

    foreign: dict[Target, ForeignModule] = dict(host_handled)
    for prefix, tensors in lora.foreign.items():
        hit = resolve(prefix, key_map)
        if hit and _target_of(hit[1]).component in connected:
            foreign[_target_of(hit[1])] = ForeignModule(hit[0], {k.replace(prefix, hit[0], 1): v
                                                                 for k, v in tensors.items()})
            coverage[_target_of(hit[1]).component].matched.append(prefix)
        else:
            coverage[CLIP if is_text_encoder_name(prefix) else MODEL].unmatched.append(prefix)

    family = guess_family(list(lora.adapters) + list(lora.foreign), lora.metadata, prefer=model_family)
    result = MatchResult(lora, patches, foreign, coverage, family, model_family, read_info(lora.metadata))
    if not allow_partial:
        refuse_wrong_base(result, connected)
    return result


_KOHYA_ROLE_SUFFIX = {"up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight"}


def _as_kohya_tensors(name: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors under the keys the host's own loader reads (kohya/LyCORIS suffixes)."""
    return {name + _KOHYA_ROLE_SUFFIX.get(role, "." + role): t for role, t in adapter.roles.items()}


def refuse_wrong_base(result: MatchResult, connected: set[str]) -> None:
    """Raise when a connected component got (almost) nothing of what the file holds for it."""
    name = result.lora.name
    considered = {c: v for c, v in result.coverage.items() if c in connected}
    if not any(v.total for v in considered.values()):
        parts = ", ".join(f"{c}: {len(v.skipped)}" for c, v in result.coverage.items() if v.skipped)
        raise WrongBaseModelError(
            f"{name}: nothing to apply to the connected inputs ({', '.join(sorted(connected)) or 'none'}); "
            f"the file's layers are for other parts ({parts or 'no layers at all'}). Connect the matching "
            "MODEL/CLIP input or pick another LoRA.")
    for component, cov in considered.items():
        considered_total = cov.total - len(cov.skipped)
        if considered_total == 0:
            continue
        if len(cov.matched) / considered_total < MIN_MATCH_FRACTION:
            counts = (f"{len(cov.matched)} of {considered_total} {component} layers matched "
                      f"({len(cov.unmatched)} unknown names, {len(cov.shape_mismatch)} with other sizes)")
            raise WrongBaseModelError(f"{name}: {_made_for(result, component)}: {counts}. Use a LoRA trained for "
                                      "this base model, or load the base model this LoRA was made for.")


def _made_for(result: MatchResult, component: str) -> str:
    """What the file looks made for, never naming one family on both sides."""
    given = f"the {component.upper()} given is {result.model_family}"
    if result.family == UNKNOWN:
        return f"cannot tell which base model it was made for, and {given}"
    if result.family == result.model_family:
        return (f"its layer names look like {result.family}, like the {component.upper()} given, but it was made "
                f"for another variant or size of {result.family}")
    return f"looks made for {result.family} but {given}"


def format_report(result: MatchResult, strengths: dict[str, float] | None = None, mode: str = "merge") -> str:
    """A readable multi-line summary for the node's report output."""
    lines = [f"LoRA: {result.lora.name}",
             f"  made for: {result.family}; applied to: {result.model_family}; mode: {mode}",
             f"  formats: {result.lora.kinds()}; ranks: {result.lora.ranks}; alphas: {result.lora.alphas}"]
    sources = result.lora.alpha_summary()
    if sources:  # which alpha each module got, and from where (.alpha tensors, lora_adapter_metadata, none)
        lines.append("  alphas used: " + "; ".join(sources))
    if strengths:
        lines.append("  strengths: " + ", ".join(f"{k} {v:g}" for k, v in strengths.items()))
    for component, cov in result.coverage.items():
        if cov.total == 0:
            continue
        lines.append(f"  {component}: {len(cov.matched)} matched, {len(cov.unmatched)} unmatched, "
                     f"{len(cov.shape_mismatch)} shape mismatch, {len(cov.skipped)} skipped (input not connected)")
        for label, keys in (("unmatched", cov.unmatched), ("shape mismatch", cov.shape_mismatch)):
            for k in keys[:10]:
                lines.append(f"    {label}: {k}")
            if len(keys) > 10:
                lines.append(f"    ... and {len(keys) - 10} more {label}")
    if result.foreign:
        lines.append(f"  handed to ComfyUI core (merge only): {len(result.foreign)} layers")
    if result.lora.unrecognised:
        lines.append(f"  unrecognised keys ignored: {len(result.lora.unrecognised)} "
                     f"(first: {result.lora.unrecognised[0]})")
    info = result.info
    if info.trigger_words:
        lines.append("  trigger words: " + ", ".join(info.trigger_words))
    if info.scope:
        lines.append(f"  scope: {info.scope}")
    return "\n".join(lines)
