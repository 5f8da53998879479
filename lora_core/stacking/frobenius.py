"""Frobenius inner products and norms of summed LoRA deltas, from the factors.

For a layer's terms, the combined change is L + X with L = U D, U = [s_1 c_1 B_1, ...]
(rows x R) and D = [A_1; ...] (R x cols), and X the dense sum of the terms that have no
low-rank form (LoHa, LoKr, LoCon with a Tucker mid). Then, without ever forming U D:

    <U_a D_a, U_b D_b>_F = trace((U_a^T U_b)(D_b D_a^T)) = sum((U_a^T U_b) * (D_a D_b^T))
    <U D, X>_F           = sum((U^T X) * D)

Pairwise products (`inner`) take the R x R Gram matrices in fp64: a stack whose terms nearly
cancel still gets an accurate (and never negative) norm. Stack LoRA's batched per-layer Gram
(`gram`) takes them in fp32 and sums in fp64 (see there). DoRA terms count by their
low-rank direction here; their true, weight-dependent change needs the weight
(see clamping.layer_change_ratio).

For term lists of plain low-rank adapters, `terms_inner` sums s_i s_j <dW_i, dW_j> over
pairs of adapters whose strength-1 products are memoised per adapter pair: a Stack LoRA
re-run after a strength change then costs a few multiplications per layer, not a pass over
the factors.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import caches
from ..errors import LoRAShapeError
from ..formats.adapters import Adapter
from ..patching.factors import stack_factors
from ..values import Term


@dataclass
class FactoredDelta:
    """sum_i s_i delta_i of one term list, kept as (up @ down) + dense; see the module doc."""

    shape: tuple[int, int]
    up: torch.Tensor | None = None  # [rows, R] fp64, strengths and alpha/rank scales folded in
    down: torch.Tensor | None = None  # [R, cols] fp64
    dense: torch.Tensor | None = None  # [rows, cols] fp32, terms without a low-rank form


def factor_terms(terms: Sequence[Term]) -> FactoredDelta:
    """Gather a term list's factors (small copies; no dense matrix unless an adapter needs one)."""
    if not terms:
        raise LoRAShapeError("factor_terms: the term list is empty; a layer needs at least one term")
    shape = terms[0].adapter.target_shape_2d()
    device = _first_device(terms)
    parts = []
    dense = None
    for term in terms:
        this_shape = term.adapter.target_shape_2d()
        if this_shape != shape:
            raise LoRAShapeError(f"terms of one layer disagree in size: {shape} vs {this_shape} "
                             f"({term.adapter.name} adapter)")
        s = float(term.strength)
        matrices = term.adapter.matrices32
        if matrices is not None:
            up, down = matrices
            parts.append((up, down, s * float(term.adapter.low_rank()[2])))
            continue
        # Dense fallback: LoHa/LoKr/Tucker LoCon have no (up, down) pair to contract.
        delta = term.adapter.delta(torch.Size(shape), device, torch.float32)
        dense = delta.mul_(s) if dense is None else dense.add_(delta, alpha=s)
    out = FactoredDelta(shape=shape, dense=dense)
    if parts:
        factors = stack_factors(parts, device, torch.float64)
        out.up, out.down = factors.up, factors.down
    return out


def _first_device(terms: Sequence[Term]) -> torch.device:
    for term in terms:
        for t in term.adapter.roles.values():
            if isinstance(t, torch.Tensor):
                return t.device
    return torch.device("cpu")


def inner(a: FactoredDelta, b: FactoredDelta) -> float:
    """<delta_a, delta_b>_F of two factored deltas of the same layer."""
    if a.shape != b.shape:
        raise LoRAShapeError(f"cannot compare deltas of different sizes: {a.shape} vs {b.shape}")
    device = next((t.device for t in (a.up, a.dense, b.up, b.dense) if t is not None), torch.device("cpu"))
    au, ad, ax = (None if t is None else t.to(device) for t in (a.up, a.down, a.dense))
    bu, bd, bx = (None if t is None else t.to(device) for t in (b.up, b.down, b.dense))
    total = 0.0
    if au is not None and bu is not None:
        total += float(((au.T @ bu) * (ad @ bd.T)).sum())
    if au is not None and bx is not None:
        total += _low_rank_dot_dense(au, ad, bx)
    if ax is not None and bu is not None:
        total += _low_rank_dot_dense(bu, bd, ax)
    if ax is not None and bx is not None:
        total += float(torch.sum(ax * bx, dtype=torch.float64))
    return total


def _low_rank_dot_dense(up: torch.Tensor, down: torch.Tensor, dense: torch.Tensor) -> float:
    # U^T X is R x cols: the one product as large as the dense matrix itself, taken in fp32.
    return float(((up.to(dense.dtype).T @ dense).to(torch.float64) * down).sum())


def norm(a: FactoredDelta) -> float:
    """||delta||_F; rounding can make the fp64 square a hair negative when terms cancel."""
    return math.sqrt(max(inner(a, a), 0.0))


def gram(adapters: Sequence[Adapter]) -> list[list[float]] | None:
    """G_ab = <dW_a, dW_b>_F at strength 1 for all adapters of one layer, in ONE batched product:
    with U = [c_1 B_1, ...] and D = [A_1; ...], G = E^T ((U^T U) * (D D^T)) E, E summing each
    adapter's rank block. None when one has no (up, down) form. Pairs already known are reused and
    new ones remembered (see adapter_inner), so a re-composed stack computes only what is new.

    U^T U and D D^T are taken in fp32 (fp16 and bf16 factors are exact there; a sum over a layer's
    rows rounds each entry by about 1e-7 of its size) and the rest in fp64. In fp64 they cost a cold
    Stack LoRA node of three rank-32 SD1.5 LoRAs ~105 ms of its ~175 (conversion and GEMMs at half
    the rate); fp32 moves a cosine or a layer's change ratio by ~1e-7, which no clamp or report shows."""
    n = len(adapters)
    known = [[_memo_get(a, b) for b in adapters] for a in adapters]
    if all(v is not None for row in known for v in row):
        return known
    matrices = [a.matrices32 for a in adapters]
    if any(m is None for m in matrices):
        return None
    up, down, ranks = stack_factors([(m[0], m[1], float(a.low_rank()[2])) for a, m in zip(adapters, matrices)],
                                    None, torch.float32)
    blocks = torch.repeat_interleave(torch.arange(n), torch.tensor(ranks))
    indicator = torch.nn.functional.one_hot(blocks, n).double()
    products = (up.T @ up).double() * (down @ down.T).double()
    table = (indicator.T @ products @ indicator).tolist()
    for i, a in enumerate(adapters):
        for j in range(i, n):
            table[j][i] = table[i][j]  # the batched product is symmetric only up to rounding; a memoised
            _memo_put(a, adapters[j], table[i][j])  # re-read gives the upper triangle, so a first build must too
    return table


# <dW_a, dW_b>_F at strength 1 per adapter pair: {a: {id(b): (weak ref to b, dot)}}, a the pair's adapter
# with the lower id. Weak on both: an entry goes with a, and one whose b is gone is never read.
_PAIR_DOTS: "weakref.WeakKeyDictionary[Adapter, dict[int, tuple[weakref.ref, float]]]" = weakref.WeakKeyDictionary()
caches.register("pair_dots", _PAIR_DOTS.clear)


def _ordered(a: Adapter, b: Adapter) -> tuple[Adapter, Adapter]:
    return (b, a) if id(a) > id(b) else (a, b)  # symmetric: one entry per unordered pair


def _memo_get(a: Adapter, b: Adapter) -> float | None:
    a, b = _ordered(a, b)
    row = _PAIR_DOTS.get(a)
    hit = None if row is None else row.get(id(b))
    return hit[1] if hit is not None and hit[0]() is b else None


def _memo_put(a: Adapter, b: Adapter, dot: float) -> None:
    a, b = _ordered(a, b)
    _PAIR_DOTS.setdefault(a, {})[id(b)] = (weakref.ref(b), dot)


def adapter_inner(a: Adapter, b: Adapter) -> float | None:
    """<dW_a, dW_b>_F at strength 1 of two low-rank adapters of one layer; None when either has no
    (up, down) form, so the caller takes the dense route. Memoised per pair while both adapters live
    (the pair_dots cache of lora_core.caches)."""
    hit = _memo_get(a, b)
    if hit is not None:
        return hit
    if a.low_rank() is None or b.low_rank() is None:
        return None
    dot = inner(factor_terms([Term(a, 1.0)]), factor_terms([Term(b, 1.0)]))
    _memo_put(a, b, dot)
    return dot


def terms_inner(a: Sequence[Term], b: Sequence[Term]) -> float:
    """<sum_a s_i dW_i, sum_b s_j dW_j>_F; from memoised pair products when every term is low-rank."""
    if len(a) == 1 and len(b) == 1:  # the usual case: one term per LoRA and layer
        dot = adapter_inner(a[0].adapter, b[0].adapter)
        if dot is not None:
            return float(a[0].strength) * float(b[0].strength) * dot
    total = 0.0
    for ta in a:
        for tb in b:
            dot = adapter_inner(ta.adapter, tb.adapter)
            if dot is None:
                return inner(factor_terms(a), factor_terms(b))
            total += float(ta.strength) * float(tb.strength) * dot
    return total


def terms_norm(terms: Sequence[Term]) -> float:
    """||sum_i s_i dW_i||_F (see norm)."""
    return math.sqrt(max(terms_inner(terms, terms), 0.0))
