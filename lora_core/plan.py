"""Collect what each layer receives from one or more LoRAs, strengths folded into the terms."""
from __future__ import annotations

from .matching import MODEL, MatchResult, Target
from .weight_patch import Term


def plan_layers(applied: list[tuple[MatchResult, float, float]]) -> dict[Target, list[Term]]:
    """(match, strength_model, strength_clip) per LoRA -> terms per host layer, in stack order."""
    layers: dict[Target, list[Term]] = {}
    for result, strength_model, strength_clip in applied:
        for patch in result.patches:
            strength = strength_model if patch.target.component == MODEL else strength_clip
            if strength != 0.0:
                layers.setdefault(patch.target, []).append(Term(patch.adapter, float(strength)))
    return layers
