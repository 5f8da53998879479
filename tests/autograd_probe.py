"""Measuring what autograd keeps for the backward pass (the memory gradient checkpointing saves)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def saved_tensor_bytes():
    """Counts the bytes of every tensor autograd saves inside the block: `with ... as total: ...; total["bytes"]`."""
    total = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        total["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
