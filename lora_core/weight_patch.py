"""Merge mode: W' = W + sum_i s_i (alpha_i / r_i) B_i A_i, on the weight's own device.

All plain low-rank terms of a layer are fused into ONE product by concatenating their
factors (U = [s_1 c_1 B_1, ...], D = [A_1; ...]) and added with a single in-place addmm,
so no dense per-LoRA delta is ever held. Math runs in fp32 and is cast back.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .adapters import Adapter


class Term(NamedTuple):
    """One adapter's share of a layer at a strength (a tuple: built per layer on every run)."""

    adapter: Adapter
    strength: float


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _fused_low_rank(pending: list[tuple[tuple, float]], device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U, D, c) with c * U @ D == sum_i s_i c_i B_i A_i; factors are concatenated in their file
    dtype and converted once (this runs per layer on every patch, so few, large ops)."""
    ups = [up.flatten(start_dim=1) for (up, _, _), _ in pending]
    scales = [s * scale for (_, _, scale), s in pending]
    up = _cat(ups, 1).to(device=device, dtype=torch.float32)
    down = _cat([down for (_, down, _), _ in pending], 0).to(device=device, dtype=torch.float32)
    if all(c == scales[0] for c in scales):
        return up, down, scales[0]
    columns = torch.cat([torch.full((u.shape[1],), c, dtype=torch.float32) for u, c in zip(ups, scales)])
    return up * columns.to(device), down, 1.0


def dora_decompose(weight: torch.Tensor, dora_scale: torch.Tensor, delta: torch.Tensor,
                   strength: float) -> torch.Tensor:
    """DoRA, exactly as ComfyUI v0.8.0's weight_decompose (including which norm it takes)."""
    dora_scale = dora_scale.to(device=weight.device, dtype=torch.float32)
    calc = weight + delta.type(weight.dtype)
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    calc *= (dora_scale / norm).type(weight.dtype)
    if strength != 1.0:
        calc -= weight
        weight += strength * calc
    else:
        weight[:] = calc
    return weight


def apply_terms(weight: torch.Tensor, terms: list[Term], strength: float = 1.0) -> torch.Tensor:
    """Add every term's delta to `weight` IN PLACE (it may be a narrowed view) and return it."""
    work = weight if weight.dtype == torch.float32 else weight.float()
    pending: list[tuple[tuple, float]] = []

    def flush() -> None:
        if pending:
            up, down, scale = _fused_low_rank(pending, work.device)
            work.view(work.shape[0], -1).addmm_(up, down, alpha=scale)
            pending.clear()

    for term in terms:
        s = float(term.strength) * float(strength)
        low_rank = term.adapter.low_rank()
        if low_rank is not None and term.adapter.dora_scale is None:
            pending.append((low_rank, s))
            continue
        flush()  # order matters once a non-additive (DoRA) term appears
        delta = term.adapter.delta(work.shape, work.device)
        if term.adapter.dora_scale is not None:
            work = dora_decompose(work, term.adapter.dora_scale, delta, s)
        else:
            work.add_(delta, alpha=s)
    flush()
    if work is not weight:
        weight.copy_(work.to(weight.dtype))
    return weight


def dense_delta(terms: list[Term], shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
    """sum_i s_i delta_i as one dense tensor (for small layers, reports and tests)."""
    out = torch.zeros(shape, device=device, dtype=torch.float32)
    for term in terms:
        out.add_(term.adapter.delta(shape, device), alpha=float(term.strength))
    return out.to(dtype)
