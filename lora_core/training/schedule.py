"""Learning-rate schedules: constant, or cosine decay after a linear warm-up."""
from __future__ import annotations

import math

import torch

CONSTANT, COSINE = "constant", "cosine"
SCHEDULES = [CONSTANT, COSINE]
OPTIMIZERS = ["adamw", "adam", "sgd"]


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer '{name}' unknown; choose one of {OPTIMIZERS}.")


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == CONSTANT:
        return 1.0
    if schedule == COSINE:
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"LR schedule '{schedule}' unknown; choose one of {SCHEDULES}.")
