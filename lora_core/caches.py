"""The pack's process-wide caches, listed in one place with what each keys, how long it lives,
and why it exists; `clear()` empties them (the benchmark's cold runs, tests of release).

| cache (owner)                                   | key                                  | lifetime / bound              | why |
|-------------------------------------------------|--------------------------------------|-------------------------------|-----|
| lora_files (lora_core.formats.files)            | file path, mtime, size, converter    | 8 parsed LoRAs, LRU           | a re-run does not re-read or re-parse a file |
| pair_dots (lora_core.stacking.frobenius)        | adapter pair                         | while both adapters live (weak) | a re-composed stack computes only new pairs' <dW_a, dW_b> |
| stack_shapes (lora_core.stacking.stack_analysis)| stack composition (names, matches)   | 8, LRU; goes when a match goes | strength changes re-read no factor |
|   with each shape: its sign patterns            | signs of the strengths (per LoRA, slot) | 16 per shape, LRU; go with it | a strength change re-plans nothing: order, pairs, cosines, ranking, block table |
| heatmaps (lora_core.stacking.heatmap)           | the overlap table                    | 8, LRU                        | an unchanged stack draws nothing again |
| block_keys (lora_core.patching.block_weights)   | host key; block weight text          | 16384 keys, 256 texts, LRU    | block of a key, looked up per layer on every run |
| block_names (lora_core.stacking.interference)   | host key                             | 16384, LRU                    | the heatmap's block of a key, on every Stack LoRA run |
| host_key_maps (nodes.comfy_bridge)              | live model module                    | while the module lives (weak) | ComfyUI's key maps walk the whole state dict |
| matches (nodes.comfy_bridge)                    | LoRA, live MODEL and CLIP modules    | held by the LoRA (LoRA.memos): goes with it; modules weak | a re-run matches nothing again |
| weight_norms (nodes.comfy_bridge)               | live module, target                  | while the module lives (weak) | layer caps need ||W||, which never changes |
| weight_spectra (nodes.comfy_bridge)             | live module, target                  | while the module lives (weak) | the spectral cap needs sigma_1(W): an SVD each |
| modules (nodes.comfy_bridge)                    | live module, path                    | while the module lives (weak) | 128 path walks per node add up |
| bypass_sites (nodes.comfy_bridge)               | live module, target                  | while the module lives (weak) | a bypass re-run finds each layer's module and checks nothing again |
| weights_sha256 (nodes.train_bridge)             | live module                          | while the module lives (weak) | hashing a base model reads every weight |

No cache keeps a model or a LoRA alive: tests/host/test_caches.py drops both after a Stack LoRA run
that fills every cache above and checks they are freed. A value never holds its weak key (a module
table leaves the module itself out); a result that holds its LoRA is memoised on that LoRA.
Values an object computes once from itself (an adapter's alpha and scale, cached properties) are not
listed: they live and die with it.
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
