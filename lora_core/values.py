"""The value types every layer passes around: where a change goes (`Target`), one adapter's share of
a layer (`Term`), and a matched adapter (`LayerPatch`). Plain records with no behaviour of their own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

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
