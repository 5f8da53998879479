"""Merge mode: W' = W + sum_i s_i (alpha_i / r_i) B_i A_i, on the weight's own device.

All plain low-rank terms of a layer are fused into ONE product by concatenating their
factors (U = [s_1 c_1 B_1, ...], D = [A_1; ...]) and added with a single in-place addmm,
so no dense per-LoRA delta is ever held. Math runs in fp32 and is cast back.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..values import Term
from .factors import stack_factors


class Fused(NamedTuple):
    """Plain low-rank terms of a layer fused into one product: sum_i s_i c_i B_i A_i == scale * up @ down."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float


def fuse(terms: list[Term], device) -> list:
    """A layer's terms as the steps apply_terms takes, in order: Fused products of consecutive plain
    low-rank terms (fp32, concatenated, strengths folded in, on `device`) and the other terms as they
    are (DoRA, LoHa, LoKr need the weight)."""
    steps: list = []
    run: list[tuple[tuple[torch.Tensor, torch.Tensor], float]] = []

    def close() -> None:
        if run:
            steps.append(_fused(run, device))
            run.clear()

    for term in terms:
        matrices = term.adapter.matrices32 if term.adapter.variant.additive else None
        if matrices is not None:
            run.append((matrices, float(term.strength) * term.adapter.low_rank()[2]))
        else:
            close()  # order matters once a non-additive (DoRA) term appears
            steps.append(term)
    close()
    return steps


def _fused(run: list, device) -> Fused:
    scales = [c for _, c in run]
    if all(c == scales[0] for c in scales):  # one scale: addmm's alpha, the factors untouched
        factors = stack_factors([(up, down, 1.0) for (up, down), _ in run], device)
        return Fused(factors.up, factors.down, scales[0])
    factors = stack_factors([(up, down, c) for (up, down), c in run], device)
    return Fused(factors.up, factors.down, 1.0)


def apply_terms(weight: torch.Tensor, terms: list[Term], strength: float = 1.0) -> torch.Tensor:
    """Add every term's delta to `weight` IN PLACE (it may be a narrowed view) and return it."""
    work = weight if weight.dtype == torch.float32 else weight.float()
    for step in fuse(terms, work.device):
        if isinstance(step, Fused):
            work.view(work.shape[0], -1).addmm_(step.up, step.down, alpha=step.scale * float(strength))
            continue
        s = float(step.strength) * float(strength)
        work = step.adapter.variant.apply(work, step.adapter.delta(work.shape, work.device), s)
    if work is not weight:
        weight.copy_(work.to(weight.dtype))
    return weight


def dense_delta(terms: list[Term], shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
    """sum_i s_i delta_i as one dense tensor (for small layers, reports and tests)."""
    out = torch.zeros(shape, device=device, dtype=torch.float32)
    for term in terms:
        out.add_(term.adapter.delta(shape, device), alpha=float(term.strength))
    return out.to(dtype)
