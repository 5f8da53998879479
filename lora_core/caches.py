"""The pack's process-wide caches, listed in one place with what each keys, how long it lives,
and why it exists; `clear()` empties them (the benchmark's cold runs, tests of release).

| cache (owner)                                   | key                                  | lifetime / bound              | why |
|-------------------------------------------------|--------------------------------------|-------------------------------|-----|
| lora_files (lora_core.formats.files)            | file path, mtime, size, converter    | 8 parsed LoRAs, LRU           | a re-run does not re-read or re-parse a file |
| stack_shapes (lora_core.stacking.stack_analysis)| stack composition (names, matches)   | 8, LRU; dropped with matches  | strength changes re-read no factor |
| heatmaps (lora_core.stacking.heatmap)           | the overlap table                    | a few, LRU                    | an unchanged stack draws nothing again |
| host_key_maps (nodes.comfy_bridge)              | live model module                    | while the module lives (weak) | ComfyUI's key maps walk the whole state dict |
| matches (nodes.comfy_bridge)                    | live module, LoRA, CLIP              | while all of them live (weak) | a re-run matches nothing again |
| weight_norms (nodes.comfy_bridge)               | live module, target                  | while the module lives (weak) | layer caps need ||W||, which never changes |
| weight_spectra (nodes.comfy_bridge)             | live module, target                  | while the module lives (weak) | the spectral cap needs sigma_1(W): an SVD each |
| modules (nodes.comfy_bridge)                    | live module, path                    | while the module lives (weak) | 128 path walks per node add up |
| weights_sha256 (nodes.train_bridge)             | live module                          | while the module lives (weak) | hashing a base model reads every weight |

Per-object memos that live and die with their object (an adapter's fp32 factors, its pair
products; a weight patch's fused factors) are not listed: they go when the LoRA or MODEL goes.
"""
from __future__ import annotations

from collections.abc import Callable

_CLEARERS: dict[str, Callable[[], None]] = {}


def register(name: str, clear: Callable[[], None]) -> None:
    """Make a cache known by name (its module calls this once at import)."""
    _CLEARERS[name] = clear


def names() -> list[str]:
    return sorted(_CLEARERS)


def clear(*which: str) -> None:
    """Empty the named caches, or all of them."""
    unknown = set(which) - set(_CLEARERS)
    if unknown:
        raise KeyError(f"unknown caches {sorted(unknown)}; known: {names()}")
    for name in which or list(_CLEARERS):
        _CLEARERS[name]()
