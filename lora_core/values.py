"""The value types every layer passes around: where a change goes (`Target`), one adapter's share of
a layer (`Term`), and a matched adapter (`LayerPatch`); and the one way a fused weight (qkv) is sliced
for a target (`slice_shape`, `narrow`, also as `Target` methods)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .formats.adapters import Adapter

MODEL, CLIP = "model", "clip"


@dataclass(frozen=True)
class Target:
    """A host weight, or a slice of one along `offset=(dim, start, length)` (fused qkv). `function`: a
    host-side transform of the change (SD3/AuraFlow's scale/shift swap); such layers go to the host."""

    key: str
    offset: tuple[int, int, int] | None = None
    function: object = None

    def __post_init__(self):
        # Targets key every per-layer table; hash and component once, not on each lookup.
        object.__setattr__(self, "_hash", hash((self.key, self.offset, self.function)))
        object.__setattr__(self, "component", MODEL if self.key.startswith("diffusion_model.") else CLIP)

    def __hash__(self) -> int:
        return self._hash

    def slice_shape(self, shape: torch.Size) -> torch.Size:
        return slice_shape(shape, self.offset)

    def narrow(self, weight: torch.Tensor) -> torch.Tensor:
        return narrow(weight, self.offset)


def slice_shape(shape: torch.Size, offset: tuple[int, int, int] | None) -> torch.Size:
    """The shape of the slice `offset=(dim, start, length)` of a weight of `shape` (fused qkv); `shape`
    itself without an offset."""
    if offset is None:
        return shape
    dim, _, length = offset
    return torch.Size([*shape[:dim], length, *shape[dim + 1:]])


def narrow(weight: torch.Tensor, offset: tuple[int, int, int] | None) -> torch.Tensor:
    """The slice `offset=(dim, start, length)` of a fused weight, as a view; `weight` itself without one."""
    if offset is None:
        return weight
    dim, start, length = offset
    return weight.narrow(dim, start, length)


class Term(NamedTuple):
    """One adapter's share of a layer at a strength (a tuple: built per layer on every run)."""

    adapter: Adapter
    strength: float


@dataclass
class LayerPatch:
    """An adapter of a LoRA file (`source_name`, its module name there) matched to a host target."""

    target: Target
    adapter: Adapter
    source_name: str
