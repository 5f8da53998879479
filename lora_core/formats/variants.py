"""Adapter variants: how a module's change reaches the weight, as peft's `LoraVariant`.

A plain adapter adds its delta: the change is linear in the strength and does not depend on the
weight, so it can be fused with other terms, run in bypass and measured from the factors alone
(`additive`). DoRA (a `dora_scale` tensor) rescales the patched weight to a learned magnitude per
output (or input) channel: its change depends on the weight, so it is applied after the delta
and measured by applying it. Every module asks `adapter.variant` (or `all_additive(terms)`), never
for a variant's tensors; the next variant is one `Variant` subclass here and one line in
`variant_of`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class Variant:
    """The plain variant: W' = W + s * delta."""

    name = "plain"
    suffix = ""  # appended to the adapter's kind in reports ("lora+dora")
    additive = True  # linear in the strength and independent of the weight

    def apply(self, weight: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
        """Patch `weight` (fp32) IN PLACE with `delta` at `strength` and return it."""
        weight.add_(delta, alpha=strength)
        return weight


PLAIN = Variant()


class DoRAVariant(Variant):
    """DoRA: the patched weight's norms are set to the learned magnitude `dora_scale`."""

    name = "dora"
    suffix = "+dora"
    additive = False

    def __init__(self, magnitude: torch.Tensor):
        self.magnitude = magnitude

    def apply(self, weight: torch.Tensor, delta: torch.Tensor, strength: float) -> torch.Tensor:
        return dora_decompose(weight, self.magnitude, delta, strength)


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


def variant_of(roles: dict[str, torch.Tensor]) -> Variant:
    """The variant a module's tensors ask for."""
    magnitude = roles.get("dora_scale")
    return PLAIN if magnitude is None else DoRAVariant(magnitude)


def all_additive(terms: Iterable) -> bool:
    """Whether every term (anything with an `.adapter`) of a layer is additive."""
    return all(t.adapter.variant.additive for t in terms)
