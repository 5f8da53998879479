"""Bypass mode: adapters run beside the frozen layer, y = W x + sum_i s_i c_i B_i (A_i x).

Weights are never written, so changing a strength needs no re-patch. A `BypassForward`
is installed as a module's `forward` (by the host, through its own object-patch
mechanism so it is removed again on unpatch) and calls the class's real forward first.
Factors move lazily to the input's device and dtype, so offloaded models work too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..values import Term, slice_shape
from .factors import stack_factors
from .weight_patch import dense_delta


class BypassForward:
    def __init__(self, module: torch.nn.Module, terms: list[Term], offset: tuple[int, int, int] | None = None,
                 inner=None, all_low_rank: bool = False):
        """`all_low_rank`: the caller knows every term's adapter has a low-rank form (Stack LoRA's Gram
        path checked it once per stack), so a strength change asks no adapter again."""
        self.module = module
        self.inner = inner  # an earlier patch on the same module, chained rather than replaced
        self.offset = offset
        self.is_linear = module.weight.dim() == 2
        if all_low_rank:
            self.low_rank, self.dense = (list(terms), []) if self.is_linear else ([], list(terms))
        else:
            factored = [self.is_linear and t.adapter.low_rank() is not None for t in terms]
            self.low_rank = [t for t, f in zip(terms, factored) if f]
            self.dense = [t for t, f in zip(terms, factored) if not f]
        self._cache: dict[tuple, tuple] = {}

    def _factors(self, device, dtype) -> tuple:
        key = (device, dtype)
        if key not in self._cache:
            fused = None
            if self.low_rank:
                parts = []
                for t in self.low_rank:
                    up, down, scale = t.adapter.low_rank()
                    parts.append((up, down, scale * float(t.strength)))
                factors = stack_factors(parts, device, torch.float32)
                fused = (factors.down.to(dtype), factors.up.to(dtype))
            dense = dense_delta(self.dense, self._target_shape(), device, dtype) if self.dense else None
            self._cache[key] = (fused, dense)
        return self._cache[key]

    def _target_shape(self) -> torch.Size:
        return slice_shape(self.module.weight.shape, self.offset)

    def extra(self, x: torch.Tensor) -> torch.Tensor:
        fused, dense = self._factors(x.device, x.dtype)
        out = None
        if fused is not None:
            down, up = fused
            out = F.linear(F.linear(x, down), up)
        if dense is not None:
            m = self.module
            d = F.linear(x, dense) if self.is_linear else F.conv2d(x, dense, None, m.stride, m.padding,
                                                                     m.dilation, m.groups)
            out = d if out is None else out + d
        return out

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.inner is not None:
            base = self.inner(x, *args, **kwargs)
        else:
            base = type(self.module).forward(self.module, x, *args, **kwargs)
        extra = self.extra(x)
        if self.offset is not None:  # fused qkv: the adapter covers a slice of the outputs
            _, start, length = self.offset
            extra = F.pad(extra, (start, base.shape[-1] - start - length))
        return base + extra


def supports_bypass(module: torch.nn.Module, offset) -> bool:
    """Linear layers (sliced or not) and un-sliced convolutions can run in bypass."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    if weight.dim() == 2:
        return offset is None or offset[0] == 0
    return weight.dim() == 4 and offset is None and isinstance(module, torch.nn.Conv2d)
