"""The one builder of a layer's low-rank factors.

A layer's plain low-rank terms sum to sum_k c_k up_k @ down_k (c_k: strength times alpha/rank,
or any other coefficient). Patching, bypass, the stack norms, the spectral cap and merging all
work on that sum in the factored form U @ D, U = [c_1 up_1, ...] (rows x R) and
D = [down_1; ...] (R x cols), and build it here, as peft builds every delta in one
`get_delta_weight`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Factors(NamedTuple):
    """sum_k c_k up_k @ down_k == up @ down, with the coefficients folded into `up`."""

    up: torch.Tensor  # [rows, R]
    down: torch.Tensor  # [R, cols]
    ranks: list[int]  # R_k of each part, in order (sum(ranks) == R)


def stack_factors(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], device=None,
                  dtype: torch.dtype = torch.float32) -> Factors:
    """U and D of `parts`, each (up, down, coefficient): up flattened to a matrix ([out, r, ...] ->
    [out, r * ...], as ComfyUI reads a conv LoRA's up), both cast to `device` (None: where they are)
    and `dtype`, up multiplied by its coefficient, then concatenated (no parts: torch.cat's error).
    A coefficient of exactly 1.0 is not multiplied (it would change no bit), and a single part is not
    concatenated, so the result may share memory with the inputs: read it, never write to it."""
    ups, downs = [], []
    for up, down, coefficient in parts:
        up = up.flatten(start_dim=1).to(device=device, dtype=dtype)
        ups.append(up if coefficient == 1.0 else up * coefficient)
        downs.append(down.flatten(start_dim=1).to(device=device, dtype=dtype))
    ranks = [int(d.shape[0]) for d in downs]
    if len(ups) == 1:  # contiguous, as torch.cat's result would be (a no-op for the usual file tensor)
        return Factors(ups[0].contiguous(), downs[0].contiguous(), ranks)
    return Factors(torch.cat(ups, dim=1), torch.cat(downs, dim=0), ranks)
