"""Collect what each layer receives from one or more LoRAs, strengths folded into the terms."""
from __future__ import annotations

from ..values import Target, Term
from .block_weights import strength_at


def plan_layers(applied: list[tuple]) -> dict[Target, list[Term]]:
    """(match, strength_model, strength_clip[, model strength per block]) per LoRA -> terms per host
    layer, in stack order. The per-block strengths ({block label: strength}, see block_weights) replace
    strength_model on the layers of those blocks; a strength of 0 leaves the layer out."""
    layers: dict[Target, list[Term]] = {}
    for result, *strength in applied:
        for patch in result.patches:
            value = strength_at(strength, patch.target)
            if value != 0.0:
                layers.setdefault(patch.target, []).append(Term(patch.adapter, value))
    return layers
