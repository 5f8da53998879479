"""Spectral cap: limit the largest singular value of each layer's combined change.

A Frobenius cap (clamping.cap_layers) bounds a layer's whole change, but a rank-1 spike, where a
stack piles its strength into one direction, can stay under it and still break the image. The
spectral cap bounds that direction instead: on each layer

    sigma_1(sum_i s_i dW_i) <= spectral_cap * sigma_1(W),

and a layer over it has all its terms scaled down so that its change's top singular value is
exactly the cap (other layers keep their very terms).

sigma_1 of the change comes from the factors, never a dense product: with the layer's plain
low-rank terms as U D (U = [s_1 c_1 B_1, ...], D = [A_1; ...], fp64), U = Q_u R_u and
D^T = Q_d R_d give U D = Q_u (R_u R_d^T) Q_d^T, so sigma_1 is that of the small R x R core (the
same factor SVD merging/merge.py's svd method uses). The QRs do not depend on the strengths: with
unscaled factors, U = U_1 S (S the strengths per column), R_u S R_d^T is the core, and a Stack LoRA
re-run only forms that product (`LayerCore`). Terms without a low-rank form (LoHa, LoKr, Tucker
LoCon) join as a dense matrix; DoRA layers are measured on a copy of the weight.

sigma_1(W) of the base weight is exact (an SVD of the weight), but it is only taken for layers that
might be over the cap: a few power iterations give a lower bound first, and a change below the cap
times that bound is under the cap for sure (`WeightSpectra`, memoised per target).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import LoRASettingsError
from ..formats.variants import all_additive
from ..patching.factors import stack_factors
from ..patching.weight_patch import apply_terms
from ..values import Target, Term
from .clamping import NONLINEAR_CAP_STEPS, NONLINEAR_CAP_TOL, CappedLayer, WeightSource, host_weight, is_finite_number
from .frobenius import factor_terms

DEFAULT_SPECTRAL_CAP = 0.5
_FLOOR_ITERATIONS = 4


def core_top(up: torch.Tensor, down: torch.Tensor) -> float:
    """sigma_1(up @ down) from two thin QRs and the SVD of the small core."""
    _, ru = torch.linalg.qr(up.to(torch.float64))
    _, rd = torch.linalg.qr(down.to(torch.float64).T)
    return float(torch.linalg.svdvals(ru @ rd.T)[0])


def _matrix_top(matrix: torch.Tensor) -> float:
    if matrix.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1).to(torch.float32))[0])


def top_singular_value(weight: torch.Tensor) -> float:
    """sigma_1 of a weight (convolutions flattened to rows x (in * kh * kw)), exactly."""
    return _matrix_top(weight)


def top_singular_value_floor(weight: torch.Tensor, iterations: int = _FLOOR_ITERATIONS) -> float:
    """A lower bound of sigma_1(W): ||W v|| for a unit v after a few power iterations (cheap: 2 products
    per iteration). Any unit v gives one; iterating makes it close for weights with a clear top direction."""
    w = weight.reshape(weight.shape[0], -1).to(torch.float32)
    if w.numel() == 0:
        return 0.0
    v = w.T @ torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        v = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        v = v / v.norm()
        v = w.T @ (w @ v)
        if float(v.norm()) == 0.0:
            return 0.0
    v = v / v.norm()
    return float((w @ v).norm())


def terms_top(terms: Sequence[Term], weight: Callable[[], torch.Tensor] | None = None) -> float:
    """sigma_1(sum_i s_i dW_i) of one layer's terms. `weight()` gives the base weight; it is read only
    for DoRA terms, whose change depends on it."""
    if not terms:
        return 0.0
    if not all_additive(terms):
        if weight is None:
            raise LoRASettingsError("a DoRA layer's change depends on its weight: pass the weight")
        w32 = weight().to(torch.float32)
        return _matrix_top(apply_terms(w32.clone(), list(terms)) - w32)
    factored = factor_terms(terms)
    if factored.dense is None:
        return core_top(factored.up, factored.down)
    dense = factored.dense.to(torch.float64)
    if factored.up is not None:
        dense = dense + factored.up.to(dense.device) @ factored.down.to(dense.device)
    return _matrix_top(dense)


class LayerCore:
    """The strength-independent part of one layer's spectral measure: R_u and R_d of the unscaled
    factors [c_1 B_1, ...] and [A_1; ...] of its plain low-rank terms (one per member)."""

    def __init__(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]):
        up, down, self.ranks = stack_factors([(up, down, float(scale)) for up, down, scale in factors],
                                             None, torch.float64)
        _, self.ru = torch.linalg.qr(up)
        _, self.rd = torch.linalg.qr(down.T)

    def top(self, strengths: Sequence[float]) -> float:
        """sigma_1(sum_k s_k dW_k) at one strength per member (0 for members not applied)."""
        columns = torch.repeat_interleave(torch.tensor([float(s) for s in strengths], dtype=torch.float64),
                                          torch.tensor(self.ranks))
        return float(torch.linalg.svdvals((self.ru * columns) @ self.rd.T)[0])


class WeightSpectra:
    """sigma_1 of base weights by target, memoised: `floor` (a cheap lower bound) and `exact`.
    `weight_of(target)` gives the weight (the target's own slice for fused layers). `memo_of(target)`:
    the dict to keep a target's values in (e.g. one per live host model, so later runs read no weight
    again); one private dict by default."""

    def __init__(self, weight_of: Callable[[Target], torch.Tensor],
                 memo_of: Callable[[Target], dict] | None = None):
        self.weight_of = weight_of
        own: dict = {}
        self.memo_of = memo_of or (lambda target: own)

    def floor(self, target: Target) -> float:
        memo = self.memo_of(target)
        exact = memo.get(("exact", target))
        if exact is not None:
            return exact
        key = ("floor", target)
        if key not in memo:
            memo[key] = top_singular_value_floor(self.weight_of(target))
        return memo[key]

    def exact(self, target: Target) -> float:
        memo = self.memo_of(target)
        key = ("exact", target)
        if key not in memo:
            memo[key] = top_singular_value(self.weight_of(target))
        return memo[key]


def check_cap(cap: float) -> None:
    if not (is_finite_number(cap) and cap > 0):
        raise LoRASettingsError(f"spectral cap must be a finite number above 0, got {cap!r} "
                         "(a share of the weight's largest singular value: 0.5 = half)")


def over_cap(change: float, target: Target, cap: float, spectra: WeightSpectra) -> float | None:
    """change / sigma_1(W) when it is above the cap (the exact sigma_1 is taken only then), else None."""
    if change <= 0.0 or change <= cap * spectra.floor(target):
        return None
    sigma = spectra.exact(target)
    if sigma == 0.0:
        return None  # a share of nothing cannot be capped (as the Frobenius cap)
    ratio = change / sigma
    return ratio if ratio > cap else None


def spectral_cap_layers(layers: Mapping[Target, Sequence[Term]], weights: WeightSource,
                        cap: float = DEFAULT_SPECTRAL_CAP, spectra: WeightSpectra | None = None,
                        ) -> tuple[dict[Target, list[Term]], list[CappedLayer]]:
    """Scale every term of a layer whose change's top singular value exceeds cap * sigma_1(W) so that it
    is exactly the cap; other layers keep their very Term objects. Ratios in the result are
    sigma_1(change) / sigma_1(W)."""
    check_cap(cap)
    if spectra is None:
        spectra = WeightSpectra(lambda t: host_weight(weights, t))
    new_layers: dict[Target, list[Term]] = {}
    capped: list[CappedLayer] = []
    for target, terms in layers.items():
        new_layers[target] = list(terms)
        if not terms:
            continue
        def weight(t=target):
            return host_weight(weights, t)
        before = over_cap(terms_top(terms, weight), target, cap, spectra)
        if before is None or math.isinf(before):
            continue
        factor, after = cap / before, cap
        if not all_additive(terms):  # not linear in a common factor
            sigma = spectra.exact(target)
            after = terms_top(_scaled(terms, factor), weight) / sigma
            for _ in range(NONLINEAR_CAP_STEPS):
                if abs(after - cap) <= NONLINEAR_CAP_TOL * cap or after == 0.0:
                    break
                factor *= cap / after
                after = terms_top(_scaled(terms, factor), weight) / sigma
        new_layers[target] = _scaled(terms, factor)
        capped.append(CappedLayer(target, before, after, factor))
    return new_layers, capped


def _scaled(terms: Sequence[Term], factor: float) -> list[Term]:
    return [Term(t.adapter, float(t.strength) * factor) for t in terms]
