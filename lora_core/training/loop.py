"""The training loop: knows nothing of ComfyUI, only a denoiser callable, the noise model and data.

denoise(x_t, sigma, cond) -> predicted x0, where cond is a dict of batched tensors.
Everything random comes from one seeded generator, so a seed gives the same LoRA bit for bit on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LoRAError
from .objective import NoiseModel, sample_noise, weighted_x0_loss
from .schedule import base_learning_rate, effective_learning_rate, lr_factor, make_optimizer


class TrainingDiverged(LoRAError):
    """The loss became NaN or inf; the parameters keep their last finite values."""


@dataclass
class TrainSettings:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accumulation: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    noise_offset: float = 0.0
    min_snr_gamma: float = 5.0
    v_pred_like_loss: float = 0.0  # epsilon models only (kohya's option of the same name)
    max_grad_norm: float = 1.0
    preservation_weight: float = 1.0  # the loss weight of output preservation's twin rows (Sample.twin)

    def validate(self) -> None:
        checks = [(self.steps >= 1, "steps must be at least 1"),
                  (self.batch_size >= 1, "batch_size must be at least 1"),
                  (self.grad_accumulation >= 1, "gradient accumulation must be at least 1"),
                  (math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning rate must be > 0"),
                  (0 <= self.warmup_steps <= self.steps, "warmup steps must be between 0 and steps"),
                  (math.isfinite(self.preservation_weight) and self.preservation_weight > 0,
                   "preservation_weight must be > 0")]
        for ok, message in checks:
            if not ok:
                raise LoRAError(f"Train LoRA: {message}.")


@dataclass
class Sample:
    latent: torch.Tensor    # [C, H, W] (or [C, T, H, W]) clean latent, as the model sees it
    cond: dict              # per-sample conditioning: tensors with a leading batch dim of 1, or other values
    # The same latent under another conditioning (its caption without the trigger word), trained in the same
    # step, at the same noise, toward the frozen base model's prediction: output preservation.
    twin: "Sample | None" = None


def collate_conds(conds: list[dict], device) -> dict:
    """Batch per-sample conditionings: tensors concatenated along the batch, other values (ints,
    flags) taken from the first sample. A host may pass its own (e.g. padding token lengths)."""
    out = {}
    for key, first in conds[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([c[key] for c in conds]).to(device)
        else:
            out[key] = first
    return out


@dataclass
class TrainHooks:
    on_step: Callable[[int, float, float], None] = lambda step, loss, lr: None   # after each optimizer step
    should_stop: Callable[[], bool] = lambda: False                              # checked before each step
    on_checkpoint: Callable[[int], None] = lambda step: None                     # every `every` steps
    checkpoint_every: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def _buckets(samples: list[Sample]) -> list[list[int]]:
    """Indices of samples grouped by latent shape (aspect-ratio buckets batch together)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.latent.shape), []).append(i)
    return [groups[k] for k in sorted(groups)]


def collate_batch(samples: list[Sample], indices: list[int], device, collate: Callable) -> tuple[torch.Tensor, dict]:
    """The latents of samples[indices] stacked on `device`, and their conditioning as `collate` joins it."""
    batch = [samples[i] for i in indices]
    return _latents(batch, device), collate([s.cond for s in batch], device)


def _latents(batch: list[Sample], device) -> torch.Tensor:
    return torch.stack([s.latent for s in batch]).to(device)


def _pick(buckets: list[list[int]], batch_size: int, g: torch.Generator) -> list[int]:
    sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float64)
    bucket = buckets[int(torch.multinomial(sizes, 1, generator=g))]
    order = torch.randperm(len(bucket), generator=g)[: min(batch_size, len(bucket))]
    return [bucket[int(i)] for i in order]


@torch.no_grad()
def _with_twins(batch: list[Sample], x_t, sigma, x0, base_denoise, device, collate):
    """The batch plus its samples' twins: the same noisy latents, the twins' conditioning, and as the
    target the base model's own prediction there (what the LoRA must leave unchanged)."""
    rows = [r for r, s in enumerate(batch) if s.twin is not None]
    twins = [batch[r].twin for r in rows]
    kept = base_denoise(x_t[rows], sigma[rows], collate([t.cond for t in twins], device)).to(x0.dtype)
    return (torch.cat([x_t, x_t[rows]]), torch.cat([sigma, sigma[rows]]), torch.cat([x0, kept]), batch + twins)


def train(denoise: Callable, samples: list[Sample], params: list[torch.nn.Parameter], noise_model: NoiseModel,
          settings: TrainSettings, hooks: TrainHooks | None = None, device="cpu", start_step: int = 0,
          optimizer_state: dict | None = None, target: Callable | None = None,
          collate: Callable = collate_conds, optimizer: torch.optim.Optimizer | None = None,
          base_denoise: Callable | None = None) -> tuple[TrainResult, torch.optim.Optimizer]:
    """Run settings.steps - start_step optimizer steps. `target(x_t, sigma, cond)`, when given, replaces
    the clean latent as the regression target (distilling a teacher's denoiser). `collate(conds, device)`
    batches the samples' conditionings. `base_denoise`, the frozen base model's denoiser, turns on the
    samples' twins (output preservation). A caller that passes its own `optimizer` keeps it, and with it
    what was learned, when an exception (a host's interrupt) leaves the loop mid-way."""
    settings.validate()
    hooks = hooks or TrainHooks()
    if not samples:
        raise LoRAError("Train LoRA: no training images.")
    g = torch.Generator().manual_seed(settings.seed + start_step)
    if optimizer is None:
        optimizer = make_optimizer(settings.optimizer, params, settings.learning_rate, settings.weight_decay)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    buckets, result, began = _buckets(samples), TrainResult(), time.perf_counter()
    for step in range(start_step, settings.steps):
        if hooks.should_stop():
            result.stopped_early = True
            break
        lr = base_learning_rate(settings.optimizer, settings.learning_rate) * lr_factor(
            step, settings.steps, settings.lr_schedule, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(settings.grad_accumulation):
            batch = [samples[i] for i in _pick(buckets, settings.batch_size, g)]
            x0 = _latents(batch, device)
            noise = sample_noise(x0, g, settings.noise_offset)
            sigma = noise_model.sigma_of(torch.rand(x0.shape[0], generator=g, dtype=torch.float64)).float().to(device)
            x_t = noise_model.add_noise(x0, noise, sigma)
            rows = len(batch)
            if base_denoise is not None and any(s.twin is not None for s in batch):
                x_t, sigma, x0, batch = _with_twins(batch, x_t, sigma, x0, base_denoise, device, collate)
            cond = collate([s.cond for s in batch], device)
            if target is not None:
                with torch.no_grad():
                    x0 = target(x_t, sigma, cond)
            weight = noise_model.loss_weight(sigma, settings.min_snr_gamma, settings.v_pred_like_loss)
            if len(batch) > rows and settings.preservation_weight != 1.0:
                weight = torch.cat([weight[:rows], weight[rows:] * settings.preservation_weight])
            loss = weighted_x0_loss(denoise(x_t, sigma, cond), x0, weight)
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(f"Train LoRA: the loss became {loss.item()} at step {step + 1}; the LoRA keeps "
                                       "its last finite weights. Lower the learning rate or check the images.")
            (loss / settings.grad_accumulation).backward()
            total += loss.item() / settings.grad_accumulation
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(total)
        result.steps_done = step + 1
        hooks.on_step(step + 1, total, effective_learning_rate(optimizer, lr))
        if hooks.checkpoint_every and (step + 1) % hooks.checkpoint_every == 0 and step + 1 < settings.steps:
            hooks.on_checkpoint(step + 1)
    result.seconds = time.perf_counter() - began
    return result, optimizer
