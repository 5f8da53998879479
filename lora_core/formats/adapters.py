"""One adapter per patched layer, one class per algorithm, and a registry of them.

Modelled on ComfyUI's comfy/weight_adapter: each class says whether it can claim a
module's tensors (`claim`) and how to turn them into a weight delta (`delta`). The math
matches ComfyUI v0.8.0 exactly so that patched weights agree with core `LoraLoader`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import LoRAShapeError
from .variants import Variant, variant_of


@dataclass(eq=False)
class Adapter:
    """Base: the tensors of one adapted module, keyed by role ("up", "down", "alpha", ...)."""

    name = "adapter"
    roles: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def claim(cls, roles: dict[str, torch.Tensor]) -> "Adapter | None":
        raise NotImplementedError

    @cached_property  # read per layer on every patch; the roles of a parsed file never change
    def alpha(self) -> float | None:
        a = self.roles.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    @property
    def dora_scale(self) -> torch.Tensor | None:
        return self.roles.get("dora_scale")

    @property
    def variant(self) -> Variant:
        """How this adapter's change reaches the weight (plain, DoRA); see variants.py."""
        return variant_of(self.roles)

    @property
    def rank(self) -> int | None:
        return None

    def target_shape_2d(self) -> tuple[int, int]:
        """(rows, numel of one row) of the weight this adapter fits."""
        raise NotImplementedError

    def delta(self, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
        """Dense weight change at strength 1, scale alpha/rank included."""
        raise NotImplementedError

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up [out, r, ...], down [r, cols], scale) when delta == scale * up.flatten(1) @ down,
        reshaped to the weight (linear layers, and convs whose delta has that form)."""
        return None

    @property
    def matrices32(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """low_rank()'s (up, down) as fp32 matrices; None without a low-rank form."""
        return None

    def check_fits(self, weight_shape: torch.Size, where: str) -> None:
        rows, cols = self.target_shape_2d()
        want = (int(weight_shape[0]), int(torch.Size(weight_shape[1:]).numel()))
        if (rows, cols) != want:
            raise LoRAShapeError(f"{where}: {self.name} adapter is {rows}x{cols} but the layer's weight is "
                                 f"{tuple(weight_shape)}; the LoRA was made for a model with other layer sizes.")


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype)


@dataclass(eq=False)
class LowRankAdapter(Adapter):
    """Classic LoRA / LoCon: delta = (alpha / r) * up @ down, with an optional Tucker mid."""

    name = "lora"

    @classmethod
    def claim(cls, roles):
        if "up" in roles and "down" in roles:
            up, down = roles["up"], roles["down"]
            if up.shape[1] != down.shape[0]:
                raise LoRAShapeError(f"up is {tuple(up.shape)} but down is {tuple(down.shape)}: their ranks differ")
            return cls(roles)
        return None

    @property
    def rank(self) -> int:
        return int(self.roles["down"].shape[0])

    @cached_property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def target_shape_2d(self):
        up, down, mid = self.roles["up"], self.roles["down"], self.roles.get("mid")
        cols = down[0].numel()
        if mid is not None:
            cols = down.shape[1] * mid.shape[2] * mid.shape[3]
        return int(up.shape[0]), int(cols)

    def _down_matrix(self, device, dtype) -> torch.Tensor:
        down = _cast(self.roles["down"], device, dtype)
        mid = self.roles.get("mid")
        if mid is None:
            return down.flatten(start_dim=1)
        # Same contraction as ComfyUI's LoCon path so results agree bit for bit.
        mid = _cast(mid, device, dtype)
        shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
        merged = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
        return merged.reshape(shape).transpose(0, 1).flatten(start_dim=1)

    def delta(self, shape, device, dtype=torch.float32):
        up = _cast(self.roles["up"], device, dtype).flatten(start_dim=1)
        return (torch.mm(up, self._down_matrix(device, dtype)) * self.scale).reshape(shape)

    def low_rank(self):
        # A conv LoRA without a Tucker mid is low-rank too: ComfyUI's delta is up.flatten(1) @
        # down.flatten(1) reshaped to the kernel, so the flattened down is the factor.
        if self.roles.get("mid") is not None:
            return None
        down = self.roles["down"]
        return self.roles["up"], (down if down.dim() == 2 else down.flatten(start_dim=1)), self.scale

    @property
    def matrices32(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up [rows, r], down [r, cols]) as fp32 matrices (the file's own tensors when they are fp32).
        Not kept: keeping fp32 copies (here and as fused factors per patch) raised the peak memory of
        applying three rank-32 SD1.5 LoRAs from 359 to 540 MiB (core: 398) to save ~6% of the patch."""
        low_rank = self.low_rank()
        if low_rank is None:
            return None
        up, down, _ = low_rank
        return (up.flatten(start_dim=1).to(torch.float32).contiguous(),
                down.to(torch.float32).contiguous())


@dataclass(eq=False)
class LoHaAdapter(Adapter):
    """LyCORIS LoHa: delta = (alpha / r) * (w1a @ w1b) * (w2a @ w2b), optional CP tensors."""

    name = "loha"
    ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    @classmethod
    def claim(cls, roles):
        return cls(roles) if all(r in roles for r in cls.ROLES) else None

    @property
    def rank(self) -> int:
        return int(self.roles["hada_w1_b"].shape[0])

    def target_shape_2d(self):
        r = self.roles
        if "hada_t1" in r:
            t = r["hada_t1"]
            return int(r["hada_w1_a"].shape[1]), int(r["hada_w1_b"].shape[1] * t.shape[2] * t.shape[3])
        return int(r["hada_w1_a"].shape[0]), int(r["hada_w1_b"].shape[1])

    def delta(self, shape, device, dtype=torch.float32):
        r = {k: _cast(v, device, dtype) for k, v in self.roles.items() if k != "alpha"}
        scale = self.alpha / self.rank if self.alpha is not None else 1.0
        if "hada_t1" in r:
            eq = "i j k l, j r, i p -> p r k l"
            m1 = torch.einsum(eq, r["hada_t1"], r["hada_w1_b"], r["hada_w1_a"])
            m2 = torch.einsum(eq, r["hada_t2"], r["hada_w2_b"], r["hada_w2_a"])
        else:
            m1 = torch.mm(r["hada_w1_a"], r["hada_w1_b"])
            m2 = torch.mm(r["hada_w2_a"], r["hada_w2_b"])
        return ((m1 * m2) * scale).reshape(shape)


@dataclass(eq=False)
class LoKrAdapter(Adapter):
    """LyCORIS LoKr: delta = scale * kron(w1, w2), each factor full or low-rank."""

    name = "lokr"

    @classmethod
    def claim(cls, roles):
        keys = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")
        return cls(roles) if any(k in roles for k in keys) else None

    def _factor(self, which: str, device, dtype) -> torch.Tensor:
        r = self.roles
        if f"lokr_{which}" in r:
            return _cast(r[f"lokr_{which}"], device, dtype)
        a, b = _cast(r[f"lokr_{which}_a"], device, dtype), _cast(r[f"lokr_{which}_b"], device, dtype)
        if which == "w2" and "lokr_t2" in r:
            return torch.einsum("i j k l, j r, i p -> p r k l", _cast(r["lokr_t2"], device, dtype), b, a)
        return torch.mm(a, b)

    @property
    def rank(self) -> int | None:
        r = self.roles
        if "lokr_w2" not in r:
            return int(r["lokr_w2_b"].shape[0])
        if "lokr_w1" not in r:
            return int(r["lokr_w1_b"].shape[0])
        return None

    def target_shape_2d(self):
        w1 = self._factor("w1", "cpu", torch.float32)
        w2 = self._factor("w2", "cpu", torch.float32)
        return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2[0].numel())

    def delta(self, shape, device, dtype=torch.float32):
        w1, w2 = self._factor("w1", device, dtype), self._factor("w2", device, dtype)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        # ComfyUI scales by alpha/dim only when a factor is low-rank.
        scale = self.alpha / self.rank if (self.alpha is not None and self.rank is not None) else 1.0
        return (torch.kron(w1, w2) * scale).reshape(shape)


# Registry, in claim order (as comfy.weight_adapter.adapters). Modules whose tensors no class
# claims are handed to ComfyUI's own mechanism by the host bridge, never dropped silently.
ADAPTER_CLASSES: list[type[Adapter]] = [LowRankAdapter, LoHaAdapter, LoKrAdapter]
ADAPTERS_BY_NAME: dict[str, type[Adapter]] = {c.name: c for c in ADAPTER_CLASSES}


def claim_adapter(roles: dict[str, torch.Tensor]) -> Adapter | None:
    for cls in ADAPTER_CLASSES:
        adapter = cls.claim(roles)
        if adapter is not None:
            return adapter
    return None
