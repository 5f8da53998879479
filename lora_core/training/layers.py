"""Trainable LoRA layers, peft-style: a frozen base layer plus A (random) and B (zero).

delta W = (alpha / r) B A, so at step 0 the model is exactly the base model. A
`TrainForward` is installed as the base module's `forward` by the host (object patch)
and removed again on unpatch, exactly like the inference-time BypassForward.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..errors import LoRAShapeError

INIT_KAIMING, INIT_GAUSSIAN = "kaiming", "gaussian"


class LoRATrainLayer(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator,
                 init: str = INIT_KAIMING, name: str = ""):
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise LoRAShapeError(f"rank {rank} does not fit layer '{name}' ({out_features}x{in_features}): "
                                 f"choose a rank between 1 and {min(in_features, out_features)}.")
        self.rank, self.alpha, self.name = rank, float(alpha), name
        self.enabled = True  # off: the host model computes the frozen base's output (base_outputs())
        self.down = torch.nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))   # B = 0: step 0 is the base model
        if init == INIT_GAUSSIAN:
            torch.nn.init.normal_(self.down, std=1.0 / rank, generator=generator)
        else:  # peft's default: kaiming-uniform with a = sqrt(5)
            torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.down.to(x.dtype))
        return F.linear(h, self.up.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).detach() * self.scale


class TrainForward:
    """Forward of a frozen linear plus a trainable LoRA layer (optionally on a slice of its outputs).

    private_input: the LoRA keeps its input for the backward pass (the gradient of A needs it); DiT
    blocks feed some linears the residual stream itself and update it in place afterwards
    (LTX-Video: `x += attn2(x)`), so there the LoRA keeps a copy.
    """

    def __init__(self, module: torch.nn.Module, layer: LoRATrainLayer, offset: tuple[int, int, int] | None = None,
                 inner=None, private_input: bool = False):
        self.module, self.layer, self.offset, self.inner = module, layer, offset, inner
        self.private_input = private_input

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.inner(x, *args, **kwargs) if self.inner is not None else \
            type(self.module).forward(self.module, x, *args, **kwargs)
        if not self.layer.enabled:
            return base
        extra = self.layer(x.clone() if self.private_input and torch.is_grad_enabled() else x)
        if self.offset is not None:
            _, start, length = self.offset
            extra = F.pad(extra, (start, base.shape[-1] - start - length))
        return base + extra


@contextlib.contextmanager
def base_outputs(layers):
    """Inside: the model the layers are attached to computes what its frozen base computes."""
    layers = list(layers)
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


class CloneInputForward:
    """Give a module a private copy of its input while gradients are recorded.

    DiT blocks normalise the residual stream and later update it in place (`x += ...`); the
    norm keeps its input for the backward pass, so it must not be the tensor updated.
    """

    def __init__(self, module: torch.nn.Module, inner=None):
        self.module, self.inner = module, inner

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled():
            x = x.clone()
        if self.inner is not None:
            return self.inner(x, *args, **kwargs)
        return type(self.module).forward(self.module, x, *args, **kwargs)


def _private(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class CheckpointedForward:
    """Recompute a block in the backward pass instead of keeping its activations (saves memory).

    clone_inputs: DiT blocks update their inputs in place (`img += ...`); the checkpoint keeps
    those inputs to recompute the block, so the block must work on private copies of them.
    """

    def __init__(self, module: torch.nn.Module, inner=None, clone_inputs: bool = False):
        self.module, self.inner, self.clone_inputs = module, inner, clone_inputs

    def _run(self, *args, **kwargs):
        if self.clone_inputs:
            args = tuple(_private(a) for a in args)
            kwargs = {k: _private(v) for k, v in kwargs.items()}
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._run(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self._run, *args, use_reentrant=False, **kwargs)
