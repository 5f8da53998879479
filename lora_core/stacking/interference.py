"""How much the LoRAs of a stack push the same layers the same way, and a rule to temper it.

The cosine between two LoRAs' changes to one layer, strengths and alpha/rank scales
included, is taken from their factors (see frobenius): cosine 1 means both move the
layer the same way (their effects add up, which over-saturates), -1 means they cancel,
0 means they leave each other alone.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Union

from .. import caches
from ..errors import LoRASettingsError
from ..patching.plan import plan_layers
from ..values import Target, Term
from . import frobenius

TermsOrTerm = Union[Term, Sequence[Term]]


class LayerOverlap(NamedTuple):  # a tuple: one per LoRA pair per layer on every Stack LoRA run
    target: Target
    lora_a: str
    lora_b: str
    cosine: float
    dot: float = 0.0  # <delta_a, delta_b>_F, kept so blocks can be summarised exactly
    norm_a: float = 0.0
    norm_b: float = 0.0


def _as_terms(value: TermsOrTerm) -> list[Term]:
    return [value] if isinstance(value, Term) else list(value)


def pair_cosines(layers_by_lora: Mapping[str, Mapping[Target, TermsOrTerm]]) -> list[LayerOverlap]:
    """One LayerOverlap per pair of LoRAs (in the given order) per layer both patch.

    Layer by layer, so at most one layer's dense fallbacks are held at a time.
    """
    names = list(layers_by_lora)
    targets: dict[Target, None] = {}
    for name in names:
        targets.update(dict.fromkeys(layers_by_lora[name]))
    overlaps: list[LayerOverlap] = []
    for target in targets:
        present = []
        for n in names:
            value = layers_by_lora[n].get(target)
            if value:
                present.append((n, _as_terms(value)))
        if len(present) < 2:
            continue
        norms = [frobenius.terms_norm(terms) for _, terms in present]
        for i, (a, terms_a) in enumerate(present):
            for j in range(i + 1, len(present)):
                b, terms_b = present[j]
                dot = frobenius.terms_inner(terms_a, terms_b)
                cos = cosine_from(dot, norms[i], norms[j])
                overlaps.append(LayerOverlap(target, a, b, cos, dot, norms[i], norms[j]))
    return overlaps


def cosine_from(dot: float, na: float, nb: float) -> float:
    """cos = <a, b> / (|a| |b|), clipped to [-1, 1]; the overlaps, the heatmap and the Gram path share it."""
    # A zero change has no direction: it overlaps nothing (torch's cosine_similarity agrees).
    if na <= 0.0 or nb <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / (na * nb)))


def top_overlaps(overlaps: Sequence[LayerOverlap], n: int = 10) -> list[LayerOverlap]:
    """The n strongest overlaps by |cosine|: both piling up (+) and cancelling (-) are interference."""
    if n < 0:
        raise LoRASettingsError(f"n must be 0 or more, got {n}")
    ranked = [o for o in overlaps if not math.isnan(o.cosine)]
    ranked.sort(key=lambda o: abs(o.cosine), reverse=True)
    return ranked[:n]


# ---------------------------------------------------------------- naming terms by LoRA

def plan_named(applied: Sequence[tuple]) -> tuple[dict[Target, list[Term]], dict[Target, list[str]]]:
    """plan_layers, plus the name of the LoRA behind each term (lists parallel to the terms).
    `applied`: (name, match, strength_model, strength_clip[, model strength per block]) per LoRA."""
    layers: dict[Target, list[Term]] = {}
    names: dict[Target, list[str]] = {}
    for name, match, *strengths in applied:
        for target, terms in plan_layers([(match, *strengths)]).items():
            layers.setdefault(target, []).extend(terms)
            names.setdefault(target, []).extend([name] * len(terms))
    return layers, names


def _check_names(target: Target, terms: Sequence[Term], names: Mapping[Target, Sequence[str]]) -> Sequence[str]:
    labels = names.get(target)
    if labels is None or len(labels) != len(terms):
        got = "none" if labels is None else len(labels)
        raise LoRASettingsError(f"layer '{target.key}' has {len(terms)} terms but {got} LoRA names; "
                         "give one name per term, in the same order")
    return labels


def by_lora(layers: Mapping[Target, Sequence[Term]],
            names: Mapping[Target, Sequence[str]]) -> dict[str, dict[Target, list[Term]]]:
    """Regroup planned layers per LoRA name, the input pair_cosines takes."""
    out: dict[str, dict[Target, list[Term]]] = {}
    for target, terms in layers.items():
        for term, name in zip(terms, _check_names(target, terms, names)):
            out.setdefault(name, {}).setdefault(target, []).append(term)
    return out


# ---------------------------------------------------------------- decorrelation

@dataclass(frozen=True)
class Decorrelated:
    target: Target
    lora: str
    factor: float  # = 1 / (1 + overlap)
    overlap: float  # sum of the positive cosines with the other LoRAs on this layer


def names_from_per_lora(layers: Mapping[Target, Sequence[Term]],
                        per_lora: Mapping[str, Mapping[Target, TermsOrTerm]]) -> dict[Target, list[str]]:
    """Name each planned term from per-LoRA plans made in the same (stack) order as `layers`.

    plan_layers appends LoRA after LoRA, so a layer's terms are the per-LoRA terms in
    order; the adapters must line up one for one, else the two plans differ.
    """
    names: dict[Target, list[str]] = {}
    for target, terms in layers.items():
        expected = [(n, t.adapter) for n, lay in per_lora.items() if target in lay for t in _as_terms(lay[target])]
        if len(expected) != len(terms) or any(a is not t.adapter for (_, a), t in zip(expected, terms)):
            raise LoRASettingsError(f"layer '{target.key}': its {len(terms)} terms do not line up with the per-LoRA "
                             f"plans ({len(expected)} terms); plan both from the same LoRAs in the same order")
        names[target] = [n for n, _ in expected]
    return names


def decorrelate(layers: Mapping[Target, Sequence[Term]],
                names: Mapping[Target, Sequence[str]] | Mapping[str, Mapping[Target, TermsOrTerm]],
                overlaps: Sequence[LayerOverlap] | None = None
                ) -> tuple[dict[Target, list[Term]], list[Decorrelated]]:
    """Divide each LoRA's strength on a layer by (1 + sum of its POSITIVE cosines with the others).

    Two identical LoRAs (cosine 1) each get 1/2, so together they act like one at full
    strength; LoRAs that are orthogonal or opposed (cosine <= 0) are left as they are.
    Cosines are taken from the strengths given, all at once (not one LoRA after another).
    Layers with nothing to scale keep their very Term objects.

    `names`: one LoRA name per term ({Target: [name, ...]}, as plan_named gives), or the
    per-LoRA plans {name: {Target: terms}} in stack order (see names_from_per_lora).
    `overlaps`: pair_cosines output computed from these same strengths, reused instead of
    recomputing; pairs it lacks are computed.
    """
    if names and not isinstance(next(iter(names)), Target):
        names = names_from_per_lora(layers, names)
    known = {}
    for o in overlaps or ():
        known[(o.target, o.lora_a, o.lora_b)] = known[(o.target, o.lora_b, o.lora_a)] = o.cosine
    new_layers: dict[Target, list[Term]] = {}
    scaled: list[Decorrelated] = []
    for target, terms in layers.items():
        labels = _check_names(target, terms, names)
        new_layers[target] = list(terms)
        groups: dict[str, list[Term]] = {}
        for term, name in zip(terms, labels):
            groups.setdefault(name, []).append(term)
        if len(groups) < 2:
            continue
        overlap = dict.fromkeys(groups, 0.0)
        order = list(groups)
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                cos = known.get((target, a, b))
                if cos is None or math.isnan(cos):
                    dot = frobenius.terms_inner(groups[a], groups[b])
                    cos = cosine_from(dot, frobenius.terms_norm(groups[a]), frobenius.terms_norm(groups[b]))
                if cos > 0.0:
                    overlap[a] += cos
                    overlap[b] += cos
        factors = {n: 1.0 / (1.0 + o) for n, o in overlap.items()}
        if all(f == 1.0 for f in factors.values()):
            continue
        new_layers[target] = [Term(t.adapter, float(t.strength) * factors[n]) if factors[n] != 1.0 else t
                              for t, n in zip(terms, labels)]
        scaled += [Decorrelated(target, n, factors[n], overlap[n]) for n in order if factors[n] != 1.0]
    return new_layers, scaled


# ---------------------------------------------------------------- blocks, for display

# Containers whose numbered children are the blocks people talk about: input_blocks.4,
# double_blocks.7, joint_blocks.3, blocks.12, layers.5, T5's block.2. `middle_block`'s
# children are parts of one block, so it stays whole.
_INDEXED = re.compile(r"^(?:\w*_blocks|blocks|layers|block)$")
_WHOLE = {"middle_block", "mid_block"}
# Wrappers of text encoders' own layer names in ComfyUI's keys.
_TE_WRAPPERS = {"transformer", "text_model", "encoder", "model"}


@lru_cache(maxsize=1 << 14)  # a few thousand host keys, looked up on every Stack LoRA run
def block_of(key: str) -> str:
    """Group a host weight key into a block name for display.

    'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight' -> 'input_blocks.1'
    'diffusion_model.middle_block.1.proj_in.weight' -> 'middle_block'
    'diffusion_model.double_blocks.0.img_attn.qkv.weight' -> 'double_blocks.0'
    'clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight' -> 'clip_l.layers.1'
    Other layers group under their first name ('diffusion_model.time_embed.0.weight' -> 'time_embed').
    """
    parts = key.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    if parts[0] == "diffusion_model":
        prefix, rest = "", parts[1:]
    else:  # a text encoder: keep its name (clip_l, clip_g, t5xxl, ...) in front
        prefix, rest = parts[0] + ".", parts[1:]
    if not rest:
        return prefix.rstrip(".") or key
    for i, part in enumerate(rest):
        if part in _WHOLE:
            return prefix + part
        if _INDEXED.match(part) and i + 1 < len(rest) and rest[i + 1].isdigit():
            return f"{prefix}{part}.{rest[i + 1]}"
    named = [p for p in rest if p not in _TE_WRAPPERS] if prefix else rest
    return prefix + (named[0] if named else rest[0])


def _natural_key(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def block_table(overlaps: Sequence[LayerOverlap]) -> tuple[list[str], list[str], list[list[float]]]:
    """(rows 'A x B', cols = blocks in natural order, values) for render_heatmap.

    A block's value is the cosine of the two LoRAs' whole changes to that block
    (sum of dots / product of the root sums of squared norms), so big layers weigh more
    than small ones; NaN where the pair shares no layer in the block.
    """
    rows: dict[str, None] = {}
    sums: dict[tuple[str, str], list[float]] = {}
    for o in overlaps:
        row, col = f"{o.lora_a} x {o.lora_b}", block_of(o.target.key)
        rows[row] = None
        acc = sums.setdefault((row, col), [0.0, 0.0, 0.0])
        acc[0] += o.dot
        acc[1] += o.norm_a ** 2
        acc[2] += o.norm_b ** 2
    cols = sorted({c for _, c in sums}, key=_natural_key)
    values = []
    for row in rows:
        line = []
        for col in cols:
            acc = sums.get((row, col))
            line.append(math.nan if acc is None else cosine_from(acc[0], math.sqrt(acc[1]), math.sqrt(acc[2])))
        values.append(line)
    return list(rows), cols, values


# The lru_caches above memoise pure functions of host keys and texts; lora_core/caches.py lists them.
caches.register("block_names", block_of.cache_clear)
