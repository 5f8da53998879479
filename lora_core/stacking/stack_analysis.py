"""Stack LoRA's per-layer analysis at any strengths, from parts that do not depend on them.

When every LoRA of a stack puts at most one plain low-rank term on a layer, all the analysis
needs follows from each layer's Gram matrix G_ab = <dW_a, dW_b>_F at strength 1:
dot_ab = s_a s_b G_ab, ||s_a dW_a||_F = |s_a| sqrt(G_aa), ||sum_a s_a dW_a||_F^2 = s^T G s.
`stack_shape` gathers those per layer once per stack composition (memoised while the match
results live); `analyse` turns strengths into what plan_named + pair_cosines + decorrelate +
cap_layers give for the same stack (same orders, same sums), with plain float arithmetic per
layer instead of a pass over factors. A strength change then re-reads no tensor at all.

What does not depend on the strengths' sizes is kept per sign pattern (which LoRA is on, off or
negative where; `_Pattern`, memoised in the shape): the planned layers and their order, the pairs,
their cosines cos_ab = sign(s_a s_b) G_ab / sqrt(G_aa G_bb), the pairs ranked by |cos| and the
heatmap's block table. A strength change then only builds its terms and sums s^T G s for the layer
cap. The LayerOverlap list at the run's strengths (the same floats as before) is built only when
asked for (decorrelate, StackAnalysis.overlaps); the report's strongest few come from the ranking.

Stacks outside that form (DoRA, LoHa/LoKr, Tucker LoCon, two terms of one LoRA on a layer) get
None from `stack_shape`; the caller takes the general functions.
"""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from .. import caches
from ..errors import LoRASettingsError
from ..formats.adapters import Adapter
from ..patching.block_weights import block_label, strength_at
from ..patching.matching import MatchResult
from ..values import MODEL, Target, Term
from . import interference
from .clamping import CappedLayer, cap_layers
from .frobenius import gram as layer_gram
from .interference import (
    Decorrelated,
    LayerOverlap,
    block_of,
    block_table,
    by_lora,
    cosine_from,
    pair_cosines,
    plan_named,
    top_overlaps,
)
from .spectral import LayerCore, WeightSpectra, check_cap, over_cap, spectral_cap_layers


@dataclass(frozen=True)
class LayerShape:
    target: Target
    members: tuple[int, ...]  # stack indices of the LoRAs patching this layer, in stack order
    adapters: tuple[Adapter, ...]
    gram: tuple[tuple[float, ...], ...]  # <dW_a, dW_b>_F at strength 1, members x members
    slot: int = 0  # which of a LoRA's strengths this layer takes (StackShape.slots)


@dataclass(frozen=True)
class StackShape:
    names: tuple[str, ...]
    layers: tuple[LayerShape, ...]  # in first appearance over the stack
    per_lora: tuple[tuple[int, ...], ...]  # each LoRA's layers (indices into layers), in its patch order
    # One target per strength a LoRA can give a layer (the clip strength, the model strength per block):
    # block_weights.strength_at gives every layer of a slot the same value, so a run looks up len(slots)
    # strengths per LoRA instead of one per term.
    slots: tuple[Target, ...] = ()
    # Slots that share a heatmap block (interference.block_of): the memoised block table holds while each
    # LoRA's strengths agree over each group.
    shared_blocks: tuple[tuple[int, ...], ...] = ()
    cores: dict = field(default_factory=dict, compare=False, repr=False)  # layer -> spectral.LayerCore, lazily
    patterns: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)  # sign pattern -> _Pattern


class StackAnalysis:
    """What analyse_stack found: the planned (and clamped) terms per layer, the LoRA behind each term,
    the pair overlaps, and what decorrelate and the caps did. `plain`: every term is an additive
    low-rank adapter (the Gram path), so a bypass needs to ask no adapter again."""

    def __init__(self, layers: dict[Target, list[Term]], names: dict[Target, list[str]],
                 overlaps: "list[LayerOverlap] | _PatternOverlaps", decorrelated: list[Decorrelated],
                 capped: list[CappedLayer], spectral: list[CappedLayer] | None = None, plain: bool = False):
        self.layers = layers
        self.names = names
        self._overlaps = overlaps
        self.decorrelated = decorrelated
        self.capped = capped
        self.spectral = [] if spectral is None else spectral  # layers the spectral cap scaled
        self.plain = plain

    @property
    def overlaps(self) -> list[LayerOverlap]:
        """One LayerOverlap per LoRA pair per layer both patch, at the planned strengths (before
        decorrelate and the caps); the Gram path builds the list on first use."""
        source = self._overlaps
        return source.all() if isinstance(source, _PatternOverlaps) else source

    def top_overlaps(self, n: int) -> list[LayerOverlap]:
        """interference.top_overlaps(self.overlaps, n); the Gram path keeps the ranking per sign pattern."""
        source = self._overlaps
        return source.top(n) if isinstance(source, _PatternOverlaps) else top_overlaps(source, n)

    def block_table(self) -> tuple[list[str], list[str], list[list[float]]]:
        """interference.block_table(self.overlaps), for the heatmap; the Gram path keeps it per sign
        pattern (a block's cosine does not change with the sizes of strengths that are equal over it)."""
        source = self._overlaps
        return source.blocks() if isinstance(source, _PatternOverlaps) else block_table(source)

    def __repr__(self) -> str:
        return (f"StackAnalysis({len(self.layers)} layers, {len(self.decorrelated)} decorrelated, "
                f"{len(self.capped)} capped, {len(self.spectral)} spectral, plain={self.plain})")


_SHAPES: "OrderedDict[tuple, tuple[list, StackShape | None]]" = OrderedDict()
_SHAPES_KEPT = 8
_PATTERNS_KEPT = 16  # sign patterns kept per shape (each: a few hundred pairs of floats)
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


def _slot_key(target: Target) -> tuple:
    """What block_weights.strength_at reads of a target: its component, and a model layer's block."""
    return (target.component,) if target.component != MODEL else (MODEL, block_label(target.key))


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
    layers, where, slots, slot_of, heat = [], {}, [], {}, {}
    for target, present in members.items():
        adapters = tuple(a for _, a in present)
        gram = tuple(tuple(row) for row in layer_gram(adapters))
        slot = slot_of.setdefault(_slot_key(target), len(slots))
        if slot == len(slots):
            slots.append(target)
        heat.setdefault(block_of(target.key), {})[slot] = None
        where[target] = len(layers)
        layers.append(LayerShape(target, tuple(i for i, _ in present), adapters, gram, slot))
    return StackShape(tuple(name for name, _ in entries), tuple(layers),
                      tuple(tuple(where[t] for t in targets) for targets in per_lora), tuple(slots),
                      tuple(tuple(group) for group in heat.values() if len(group) > 1))


def analyse(shape: StackShape, strengths: Sequence[tuple], decorrelate: bool = False,
            cap: float | None = None, weight_norms: Callable[[Target], float] | None = None,
            spectral_cap: float | None = None, spectra: "WeightSpectra | None" = None,
            ) -> StackAnalysis:
    """Plan, pair overlaps, optional decorrelation, optional layer cap and optional spectral cap at
    (model, clip[, model per block]) strengths per LoRA (see block_weights.strength_at); `weight_norms`
    gives ||W||_F per target and is needed with `cap`, `spectra` sigma_1(W) with `spectral_cap`."""
    values = [[strength_at(s, slot) for slot in shape.slots] for s in strengths]  # per LoRA, per slot
    pattern = _pattern(shape, values)
    layers: dict[Target, list[Term]] = {}
    active: list[tuple[LayerShape, tuple[int, ...], list[float]]] = []  # positions in the layer and strengths
    for layer, pos, loras, adapters in pattern.active:
        slot = layer.slot
        s = [values[i][slot] for i in loras]
        layers[layer.target] = [Term(a, v) for a, v in zip(adapters, s)]
        active.append((layer, pos, s))
    labels = {target: list(names) for target, names in pattern.labels}
    decorrelated: list[Decorrelated] = []
    overlaps = _PatternOverlaps(shape, pattern, values)
    if decorrelate:
        decorrelated = _decorrelate(active, shape.names, overlaps.cosines(), layers)
    capped: list[CappedLayer] = []
    if cap is not None:
        capped = _cap(active, pattern.grams, layers, cap, weight_norms)
    spectral: list[CappedLayer] = []
    if spectral_cap is not None:
        spectral = _spectral(shape, active, layers, spectral_cap, spectra)
    return StackAnalysis(layers, labels, overlaps, decorrelated, capped, spectral, plain=True)


def _sign(value: float) -> int:
    return 0 if value == 0.0 else (1 if value > 0.0 else -1)  # NaN counts as on, as `!= 0.0` does


def _pattern(shape: StackShape, values: list[list[float]]) -> "_Pattern":
    """The shape's memo for these strengths' signs (per LoRA and slot); the last few are kept."""
    key = tuple(tuple(_sign(v) for v in row) for row in values)
    memo = shape.patterns
    pattern = memo.get(key)
    if pattern is not None:
        memo.move_to_end(key)
        return pattern
    pattern = memo[key] = _Pattern(shape, key)
    while len(memo) > _PATTERNS_KEPT:
        memo.popitem(last=False)
    return pattern


class _Pair(NamedTuple):
    """One LoRA pair on one planned layer, at strengths +-1 (the pattern's signs)."""
    n: int          # the active layer (index into _Pattern.active)
    qa: int         # positions of the two LoRAs among the layer's LoRAs that are on
    qb: int
    cosine: float
    target: Target
    name_a: str
    name_b: str
    dot: float
    root_a: float   # sqrt(G_aa), sqrt(G_bb): the norms at strength 1
    root_b: float
    g_ab: float
    g_aa: float
    g_bb: float

    def overlap(self) -> LayerOverlap:
        return LayerOverlap(self.target, self.name_a, self.name_b, self.cosine, self.dot, self.root_a, self.root_b)


class _Pattern:
    """What a stack's analysis keeps per sign pattern of its strengths: everything but their sizes.

    active:  (layer, positions of the LoRAs on, their stack indices, their adapters) in plan order:
             LoRA by LoRA in patch order, as plan_layers meets them, skipping zero strengths
    labels:  (target, LoRA names) in the same order
    grams:   each active layer's Gram matrix over the LoRAs on, row by row, for the layer cap's s^T G s
    pairs:   as pair_cosines(by_lora(...)) orders them (LoRAs by first appearance over the planned
             layers, layers LoRA by LoRA): _Pair each
    ranking, block_table: built on first use
    """

    def __init__(self, shape: StackShape, signs: tuple[tuple[int, ...], ...]):
        names = shape.names
        seen: dict[int, None] = {}
        for i, indices in enumerate(shape.per_lora):
            row = signs[i]
            for li in indices:
                if li not in seen and row[shape.layers[li].slot]:
                    seen[li] = None
        self.active, self.labels, self.grams = [], [], []
        for li in seen:
            layer = shape.layers[li]
            pos = tuple(k for k, i in enumerate(layer.members) if signs[i][layer.slot])
            loras = tuple(layer.members[k] for k in pos)
            self.active.append((layer, pos, loras, tuple(layer.adapters[k] for k in pos)))
            self.labels.append((layer.target, tuple(names[i] for i in loras)))
            self.grams.append(tuple(layer.gram[ka][kb] for ka in pos for kb in pos))
        self.pairs = self._pairs(names, signs)

    def _pairs(self, names, signs) -> list[_Pair]:
        rank: dict[int, int] = {}  # stack index -> order of first appearance
        by_rank: dict[int, list[int]] = {}
        for n, (_, _, loras, _) in enumerate(self.active):
            for i in loras:
                r = rank.get(i)
                if r is None:
                    r = rank[i] = len(rank)
                by_rank.setdefault(r, []).append(n)
        visit: dict[int, None] = {}
        for r in sorted(by_rank):
            visit.update(dict.fromkeys(by_rank[r]))
        pairs = []
        for n in visit:
            layer, pos, loras, _ = self.active[n]
            if len(pos) < 2:
                continue
            ranks = [rank[i] for i in loras]
            ranked = range(len(pos)) if ranks == sorted(ranks) else sorted(range(len(pos)), key=ranks.__getitem__)
            gram = layer.gram
            sign = [float(signs[i][layer.slot]) for i in loras]
            diag = [gram[k][k] for k in pos]
            roots = [math.sqrt(max(g, 0.0)) for g in diag]
            for x, qa in enumerate(ranked):
                row, name_a = gram[pos[qa]], names[loras[qa]]
                for qb in ranked[x + 1:]:
                    g = row[pos[qb]]
                    dot = sign[qa] * sign[qb] * g
                    cos = cosine_from(dot, roots[qa], roots[qb])
                    pairs.append(_Pair(n, qa, qb, cos, layer.target, name_a, names[loras[qb]], dot, roots[qa],
                                       roots[qb], g, diag[qa], diag[qb]))
        return pairs

    @cached_property
    def ranking(self) -> list[int]:
        """Pairs by |cosine|, strongest first, as top_overlaps sorts them (stable, NaN left out)."""
        order = [p for p, pair in enumerate(self.pairs) if not math.isnan(pair.cosine)]
        order.sort(key=lambda p: abs(self.pairs[p].cosine), reverse=True)
        return order

    @cached_property
    def block_table(self) -> tuple[list[str], list[str], list[list[float]]]:
        """interference.block_table at strengths +-1: a block's cosine, sum of dots over the root sums of
        squared norms, is the same at any strengths that are equal over the block."""
        return block_table([pair.overlap() for pair in self.pairs])


class _PatternOverlaps:
    """A run's overlaps from its pattern and strengths, each as pair_cosines gives it (dots, norms and
    cosine at these strengths): all of them only when asked for; the report's few from the ranking."""

    def __init__(self, shape: StackShape, pattern: _Pattern, values: list[list[float]]):
        self._shape, self._pattern, self._values = shape, pattern, values
        self._all: list[LayerOverlap] | None = None
        # Strengths whose squares neither underflow nor overflow: then a pair's cosine at them is its
        # pattern's cosine to rounding (|difference| < 1e-15), which the ranking and block table rely on.
        self._sizes_safe = all(v == 0.0 or _SAFE_LOW < abs(v) < _SAFE_HIGH for row in values for v in row)

    def _overlap(self, pair: _Pair) -> LayerOverlap:
        layer, _, loras, _ = self._pattern.active[pair.n]
        sa, sb = self._values[loras[pair.qa]][layer.slot], self._values[loras[pair.qb]][layer.slot]
        dot = sa * sb * pair.g_ab
        na, nb = math.sqrt(max(sa * sa * pair.g_aa, 0.0)), math.sqrt(max(sb * sb * pair.g_bb, 0.0))
        return LayerOverlap(pair.target, pair.name_a, pair.name_b, cosine_from(dot, na, nb), dot, na, nb)

    def all(self) -> list[LayerOverlap]:
        if self._all is None:
            self._all = [self._overlap(pair) for pair in self._pattern.pairs]
        return self._all

    def cosines(self) -> dict[tuple[int, int, int], float]:
        """The cosines at these strengths by (active layer, position, position), both ways, for decorrelate."""
        cosines = {}
        for pair, o in zip(self._pattern.pairs, self.all()):
            cosines[(pair.n, pair.qa, pair.qb)] = cosines[(pair.n, pair.qb, pair.qa)] = o.cosine
        return cosines

    def top(self, n: int) -> list[LayerOverlap]:
        """top_overlaps(self.all(), n), building only the pairs that can be in it: those whose pattern
        cosine is within _RANK_SLACK of the n-th strongest (rounding moves a cosine far less)."""
        pairs, ranking = self._pattern.pairs, self._pattern.ranking
        if n <= 0 or not ranking or not self._sizes_safe or self._all is not None:
            return top_overlaps(self.all(), n)
        bar = abs(pairs[ranking[min(n, len(ranking)) - 1]].cosine) - _RANK_SLACK
        near = []
        for p in ranking:
            if abs(pairs[p].cosine) < bar:
                break
            near.append(p)
        return top_overlaps([self._overlap(pairs[p]) for p in sorted(near)], n)

    def blocks(self) -> tuple[list[str], list[str], list[list[float]]]:
        uniform = self._sizes_safe and all(len({row[slot] for slot in group}) == 1
                                           for group in self._shape.shared_blocks for row in self._values)
        rows, cols, values = self._pattern.block_table if uniform else block_table(self.all())
        return list(rows), list(cols), [list(line) for line in values]


_SAFE_LOW, _SAFE_HIGH = 1e-150, 1e150
_RANK_SLACK = 1e-9


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


def _cap(active, grams, layers, cap: float, weight_norms) -> list[CappedLayer]:
    """cap_layers() with known weight norms: the combined change is sqrt(s^T G s), G over the LoRAs on."""
    if weight_norms is None:
        raise LoRASettingsError("the layer cap needs the weights' norms (weight_norms)")
    capped = []
    for (layer, pos, s), gram in zip(active, grams):
        total, k = 0.0, 0
        for sa in s:  # the sum in cap_layers' order: row by row
            for sb in s:
                total += sa * sb * gram[k]
                k += 1
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
