"""Optimizers and learning-rate schedules: constant, or cosine decay after a linear warm-up.

Optimizers: AdamW (the standard), Adam, SGD, and two that LoRA trainers use when their packages are
there: Prodigy (`prodigyopt`, learning-rate free: it estimates the step size itself, so the base rate
is 1 and the node's learning_rate is not used) and 8-bit AdamW (`bitsandbytes`, CUDA GPUs only: its
optimizer states take a quarter of the memory). `optimizer_support()` says which the host can run and
why the others cannot; the node lists only the runnable ones.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from ..errors import LoRASettingsError

CONSTANT, COSINE = "constant", "cosine"
SCHEDULES = [CONSTANT, COSINE]
ADAMW, ADAM, SGD, PRODIGY, ADAMW_8BIT = "adamw", "adam", "sgd", "prodigy", "adamw8bit"
OPTIMIZERS = [ADAMW, ADAM, SGD, PRODIGY, ADAMW_8BIT]  # every optimizer this module knows, runnable or not
LEARNING_RATE_FREE = {PRODIGY}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def optimizer_support() -> dict[str, str | None]:
    """name -> None when this host can run it, else why not (and what would make it run)."""
    support: dict[str, str | None] = {ADAMW: None, ADAM: None, SGD: None}
    support[PRODIGY] = None if _installed("prodigyopt") else \
        "the prodigyopt package is not installed (pip install prodigyopt in ComfyUI's Python)"
    if not _installed("bitsandbytes"):
        support[ADAMW_8BIT] = "the bitsandbytes package is not installed (pip install bitsandbytes)"
    elif not torch.cuda.is_available():
        support[ADAMW_8BIT] = "it needs a CUDA GPU, and this ComfyUI has none"
    else:
        support[ADAMW_8BIT] = None
    return support


def available_optimizers() -> list[str]:
    return [name for name, why in optimizer_support().items() if why is None]


def optimizer_tooltip() -> str:
    text = ("adamw is the standard; adam without weight decay; sgd with momentum 0.9; prodigy is learning-rate "
            "free (learning_rate is not used: it finds the step size itself, base rate 1); adamw8bit keeps its "
            "states in 8 bits (less GPU memory).")
    missing = [f"{name}: {why}" for name, why in optimizer_support().items() if why is not None]
    return text + (" Not offered here: " + "; ".join(missing) + "." if missing else "")


def base_learning_rate(name: str, learning_rate: float) -> float:
    """The rate the schedule scales: 1 for learning-rate-free optimizers (Prodigy's lr is a multiplier
    of the step size it estimates, and 1 is what its authors recommend), else the node's."""
    return 1.0 if name in LEARNING_RATE_FREE else learning_rate


def effective_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The step size actually taken, for progress reports: Prodigy's estimate d times its lr."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return lr * float(group["d"]) if "d" in group else lr


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == ADAM:
        return torch.optim.Adam(params, lr=lr)
    if name == SGD:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    why = optimizer_support().get(name, "unknown")
    if name not in OPTIMIZERS:
        raise LoRASettingsError(f"optimizer '{name}' unknown; choose one of {OPTIMIZERS}.")
    if why is not None:
        raise LoRASettingsError(f"optimizer '{name}' cannot run here: {why}. Choose one of {available_optimizers()}.")
    if name == PRODIGY:
        from prodigyopt import Prodigy
        # The Prodigy authors' advice for diffusion models: bias correction and a safeguarded warm-up.
        return Prodigy(params, lr=base_learning_rate(name, lr), weight_decay=weight_decay,
                       use_bias_correction=True, safeguard_warmup=True)
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


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
    raise LoRASettingsError(f"LR schedule '{schedule}' unknown; choose one of {SCHEDULES}.")
