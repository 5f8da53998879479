"""Stack LoRA's per-layer analysis at any strengths, from parts that do not depend on them.

When every LoRA of a stack puts at most one plain low-rank term on a layer, all the analysis
needs follows from each layer's Gram matrix G_ab = <dW_a, dW_b>_F at strength 1:
dot_ab = s_a s_b G_ab, ||s_a dW_a||_F = |s_a| sqrt(G_aa), ||sum_a s_a dW_a||_F^2 = s^T G s.
`stack_shape` gathers those per layer once per stack composition (memoised while the match
results live); `analyse` turns strengths into what plan_named + pair_cosines + decorrelate +
cap_layers give for the same stack (same orders, same sums), with plain float arithmetic per
layer instead of a pass over factors. A strength change then re-reads no tensor at all.

Stacks outside that form (DoRA, LoHa/LoKr, Tucker LoCon, two terms of one LoRA on a layer) get
None from `stack_shape`; the caller takes the general functions.
"""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import caches
from ..errors import LoRASettingsError
from ..formats.adapters import Adapter
from ..patching.block_weights import strength_at
from ..patching.matching import MatchResult
from ..values import Target, Term
from . import interference
from .clamping import CappedLayer, cap_layers
from .frobenius import gram as layer_gram
from .interference import Decorrelated, LayerOverlap, by_lora, cosine_from, pair_cosines, plan_named
from .spectral import LayerCore, WeightSpectra, check_cap, over_cap, spectral_cap_layers


@dataclass(frozen=True)
class LayerShape:
    target: Target
    members: tuple[int, ...]  # stack indices of the LoRAs patching this layer, in stack order
    adapters: tuple[Adapter, ...]
    gram: tuple[tuple[float, ...], ...]  # <dW_a, dW_b>_F at strength 1, members x members


@dataclass(frozen=True)
class StackShape:
    names: tuple[str, ...]
    layers: tuple[LayerShape, ...]  # in first appearance over the stack
    per_lora: tuple[tuple[int, ...], ...]  # each LoRA's layers (indices into layers), in its patch order
    cores: dict = field(default_factory=dict, compare=False, repr=False)  # layer -> spectral.LayerCore, lazily


@dataclass
class StackAnalysis:
    layers: dict[Target, list[Term]]
    names: dict[Target, list[str]]
    overlaps: list[LayerOverlap]
    decorrelated: list[Decorrelated]
    capped: list[CappedLayer]
    spectral: list[CappedLayer] = field(default_factory=list)  # layers the spectral cap scaled


_SHAPES: "OrderedDict[tuple, tuple[list, StackShape | None]]" = OrderedDict()
_SHAPES_KEPT = 8
caches.register("stack_shapes", _SHAPES.clear)


def stack_shape(entries: Sequence[tuple[str, MatchResult]]) -> StackShape | None:
    """The strength-independent part of a stack of (name, match result); None outside the fast form."""
    key = tuple((name, id(match)) for name, match in entries)
    hit = _SHAPES.get(key)
    if hit is not None and all(ref() is match for ref, (_, match) in zip(hit[0], entries)):
        _SHAPES.move_to_end(key)
        return hit[1]
    shape = _build(entries)
    # A shape holds its adapters: it goes as soon as one of its matches goes, and only the last few are kept.
    _SHAPES[key] = ([weakref.ref(match, lambda _, key=key: _SHAPES.pop(key, None)) for _, match in entries], shape)
    while len(_SHAPES) > _SHAPES_KEPT:
        _SHAPES.popitem(last=False)
    return shape


def _build(entries: Sequence[tuple[str, MatchResult]]) -> StackShape | None:
    members: dict[Target, list[tuple[int, Adapter]]] = {}
    per_lora: list[dict[Target, None]] = []
    for index, (_, match) in enumerate(entries):
        targets: dict[Target, None] = {}
        for patch in match.patches:
            adapter = patch.adapter
            if patch.target in targets or not adapter.variant.additive or adapter.low_rank() is None:
                return None
            targets[patch.target] = None
            members.setdefault(patch.target, []).append((index, adapter))
        per_lora.append(targets)
    layers, where = [], {}
    for target, present in members.items():
        adapters = tuple(a for _, a in present)
        gram = tuple(tuple(row) for row in layer_gram(adapters))
        where[target] = len(layers)
        layers.append(LayerShape(target, tuple(i for i, _ in present), adapters, gram))
    return StackShape(tuple(name for name, _ in entries), tuple(layers),
                      tuple(tuple(where[t] for t in targets) for targets in per_lora))


def analyse(shape: StackShape, strengths: Sequence[tuple], decorrelate: bool = False,
            cap: float | None = None, weight_norms: Callable[[Target], float] | None = None,
            spectral_cap: float | None = None, spectra: "WeightSpectra | None" = None,
            ) -> StackAnalysis:
    """Plan, pair overlaps, optional decorrelation, optional layer cap and optional spectral cap at
    (model, clip[, model per block]) strengths per LoRA (see block_weights.strength_at); `weight_norms`
    gives ||W||_F per target and is needed with `cap`, `spectra` sigma_1(W) with `spectral_cap`."""
    names = shape.names
    layers: dict[Target, list[Term]] = {}
    labels: dict[Target, list[str]] = {}
    active: list[tuple[LayerShape, list[int], list[float]]] = []  # positions in the layer and strengths
    for layer in _plan_order(shape, strengths):
        at = [strength_at(strengths[i], layer.target) for i in layer.members]
        pos = [k for k, v in enumerate(at) if v != 0.0]
        if not pos:
            continue
        s = [at[k] for k in pos]
        layers[layer.target] = [Term(layer.adapters[k], v) for k, v in zip(pos, s)]
        labels[layer.target] = [names[layer.members[k]] for k in pos]
        active.append((layer, pos, s))
    overlaps, cosines = _overlaps(active, names)
    decorrelated: list[Decorrelated] = []
    if decorrelate:
        decorrelated = _decorrelate(active, names, cosines, layers)
    capped: list[CappedLayer] = []
    if cap is not None:
        capped = _cap(active, layers, cap, weight_norms)
    spectral: list[CappedLayer] = []
    if spectral_cap is not None:
        spectral = _spectral(shape, active, layers, spectral_cap, spectra)
    return StackAnalysis(layers, labels, overlaps, decorrelated, capped, spectral)


def _plan_order(shape: StackShape, strengths) -> list[LayerShape]:
    """Layers as plan_layers meets them: LoRA by LoRA in patch order, skipping zero strengths."""
    seen: dict[int, None] = {}
    for i, indices in enumerate(shape.per_lora):
        for li in indices:
            if li not in seen and strength_at(strengths[i], shape.layers[li].target) != 0.0:
                seen[li] = None
    return [shape.layers[li] for li in seen]


def _overlaps(active, names) -> tuple[list[LayerOverlap], dict]:
    """pair_cosines(by_lora(...)): LoRAs ordered by first appearance over the planned layers, layers
    ordered LoRA by LoRA, pairs in that LoRA order. Also the cosines by (layer, position, position)."""
    rank: dict[int, int] = {}  # stack index -> order of first appearance
    by_rank: dict[int, list[int]] = {}
    for n, (layer, pos, _) in enumerate(active):
        for k in pos:
            i = layer.members[k]
            r = rank.get(i)
            if r is None:
                r = rank[i] = len(rank)
            by_rank.setdefault(r, []).append(n)
    visit: dict[int, None] = {}
    for r in sorted(by_rank):
        visit.update(dict.fromkeys(by_rank[r]))
    overlaps, cosines = [], {}
    for n in visit:
        layer, pos, s = active[n]
        if len(pos) < 2:
            continue
        ranks = [rank[layer.members[k]] for k in pos]
        ranked = range(len(pos)) if ranks == sorted(ranks) else sorted(range(len(pos)), key=ranks.__getitem__)
        gram, target, members = layer.gram, layer.target, layer.members
        norms = [math.sqrt(max(s[q] * s[q] * gram[pos[q]][pos[q]], 0.0)) for q in range(len(pos))]
        for x, qa in enumerate(ranked):
            row, name_a = gram[pos[qa]], names[members[pos[qa]]]
            for qb in ranked[x + 1:]:
                dot = s[qa] * s[qb] * row[pos[qb]]
                cos = cosine_from(dot, norms[qa], norms[qb])
                overlaps.append(LayerOverlap(target, name_a, names[members[pos[qb]]], cos, dot, norms[qa], norms[qb]))
                cosines[(n, qa, qb)] = cosines[(n, qb, qa)] = cos
    return overlaps, cosines


def _decorrelate(active, names, cosines, layers) -> list[Decorrelated]:
    """decorrelate(): each LoRA's strength on a layer divided by 1 + its positive cosines there."""
    scaled = []
    for n, (layer, pos, s) in enumerate(active):
        if len(pos) < 2:
            continue
        overlap = [0.0] * len(pos)
        for qa in range(len(pos)):
            for qb in range(qa + 1, len(pos)):
                cos = cosines[(n, qa, qb)]
                if cos > 0.0:
                    overlap[qa] += cos
                    overlap[qb] += cos
        factors = [1.0 / (1.0 + o) for o in overlap]
        if all(f == 1.0 for f in factors):
            continue
        for q, f in enumerate(factors):
            if f != 1.0:
                s[q] = s[q] * f
                scaled.append(Decorrelated(layer.target, names[layer.members[pos[q]]], f, overlap[q]))
        layers[layer.target] = [Term(layer.adapters[k], v) for k, v in zip(pos, s)]
    return scaled


def _cap(active, layers, cap: float, weight_norms) -> list[CappedLayer]:
    """cap_layers() with known weight norms: the combined change is sqrt(s^T G s)."""
    if weight_norms is None:
        raise LoRASettingsError("the layer cap needs the weights' norms (weight_norms)")
    capped = []
    for layer, pos, s in active:
        total = 0.0
        for qa, ka in enumerate(pos):
            row = layer.gram[ka]
            for qb, kb in enumerate(pos):
                total += s[qa] * s[qb] * row[kb]
        change, norm = math.sqrt(max(total, 0.0)), weight_norms(layer.target)
        before = (math.inf if change > 0.0 else 0.0) if norm == 0.0 else change / norm
        if not before > cap or math.isinf(before):
            continue
        factor = cap / before
        layers[layer.target] = [Term(layer.adapters[k], v * factor) for k, v in zip(pos, s)]
        capped.append(CappedLayer(layer.target, before, cap, factor))
    return capped


def _spectral(shape: StackShape, active, layers, cap: float, spectra) -> list[CappedLayer]:
    """spectral.spectral_cap_layers() from per-layer cores: the QRs of the unscaled factors are taken once
    per stack (memoised in the shape); a run forms the R x R core at its strengths and takes its top
    singular value. Runs after the other rules, on the strengths they left."""
    if spectra is None:
        raise LoRASettingsError("the spectral cap needs the weights' top singular values (spectra)")
    check_cap(cap)
    capped = []
    for layer, pos, _ in active:
        terms = layers[layer.target]
        core = shape.cores.get(layer.target)
        if core is None:
            core = shape.cores[layer.target] = LayerCore([a.low_rank() for a in layer.adapters])
        strengths = [0.0] * len(layer.members)
        for k, term in zip(pos, terms):
            strengths[k] = float(term.strength)
        before = over_cap(core.top(strengths), layer.target, cap, spectra)
        if before is None or math.isinf(before):
            continue
        factor = cap / before
        layers[layer.target] = [Term(t.adapter, float(t.strength) * factor) for t in terms]
        capped.append(CappedLayer(layer.target, before, cap, factor))
    return capped


def analyse_stack(applied: Sequence[tuple], weights, weight_norms: Callable[[Target], float],
                  decorrelate: bool = False, layer_cap: float | None = None, spectral_cap: float | None = None,
                  spectra: "WeightSpectra | None" = None) -> StackAnalysis:
    """The one entry point of stack analysis: plan, overlaps, then decorrelate and the caps as asked.

    `applied`: (name, match, strength_model, strength_clip[, model strength per block]) per LoRA;
    `weights(target)`: a layer's base weight (the general path reads it; the fast path does not).
    Stacks of plain low-rank LoRAs take the memoised Gram path; others (DoRA, LoHa/LoKr, Tucker LoCon)
    the general functions, which give the same results (tests/core/test_stacking.py)."""
    shape = stack_shape([(name, match) for name, match, *_ in applied])
    if shape is not None:
        return analyse(shape, [tuple(strengths) for _, _, *strengths in applied], decorrelate, layer_cap,
                       weight_norms, spectral_cap, spectra)
    layers, names = plan_named(applied)
    result = StackAnalysis(layers, names, pair_cosines(by_lora(layers, names)), [], [])
    if decorrelate and layers:
        result.layers, result.decorrelated = interference.decorrelate(result.layers, names, result.overlaps)
    if layer_cap is not None and result.layers:
        result.layers, result.capped = cap_layers(result.layers, weights, layer_cap, weight_norms)
    if spectral_cap is not None and result.layers:
        result.layers, result.spectral = spectral_cap_layers(result.layers, weights, spectral_cap, spectra)
    return result
