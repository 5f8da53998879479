"""Noise, timesteps and the loss, for epsilon, v-prediction and flow-matching models.

The host's denoiser returns the predicted clean latent x0 for every model type (ComfyUI's
apply_model does), so the loss is taken in x0 space and weighted to equal each type's usual
objective: epsilon -> SNR, v -> SNR + 1, flow -> 1 / sigma^2 (velocity loss). Min-SNR-gamma
(Hang et al. 2023) replaces the weight by min(SNR, gamma), the same in x0 space for all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

EPS, V_PRED, FLOW = "eps", "v", "flow"


@dataclass
class NoiseModel:
    prediction: str
    sigma_of: Callable[[torch.Tensor], torch.Tensor]  # u in (0, 1) -> sigma
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x0, noise, sigma) -> x_t

    def snr(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction == FLOW:
            return ((1.0 - sigma) / sigma) ** 2
        return 1.0 / sigma ** 2

    def loss_weight(self, sigma: torch.Tensor, min_snr_gamma: float, v_pred_like: float = 0.0) -> torch.Tensor:
        weight = self._base_weight(sigma, min_snr_gamma)
        if v_pred_like > 0 and self.prediction == EPS:
            # kohya's --v_pred_like_loss: loss + v_pred_like * loss * (SNR + 1) / SNR, which weights
            # the high-noise steps, where shapes and layout are decided, like v-prediction does
            snr = self.snr(sigma)
            weight = weight * (1.0 + v_pred_like * (snr + 1.0) / snr)
        return weight

    def _base_weight(self, sigma: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        snr = self.snr(sigma)
        if min_snr_gamma > 0:
            return torch.clamp(snr, max=min_snr_gamma)
        if self.prediction == EPS:
            return snr
        if self.prediction == V_PRED:
            return snr + 1.0
        return 1.0 / sigma ** 2


def simple_noise_model(prediction: str = EPS, sigma_min: float = 0.03, sigma_max: float = 14.6) -> NoiseModel:
    """A plain schedule for tests and tools outside ComfyUI (log-uniform sigma; flow: uniform t)."""
    if prediction == FLOW:
        return NoiseModel(FLOW, lambda u: u.clamp(1e-3, 1 - 1e-3),
                          lambda x0, n, s: s.view(-1, *[1] * (x0.dim() - 1)) * n
                          + (1 - s.view(-1, *[1] * (x0.dim() - 1))) * x0)
    lo, hi = torch.log(torch.tensor(sigma_min)), torch.log(torch.tensor(sigma_max))
    return NoiseModel(prediction, lambda u: torch.exp(lo + (hi - lo) * u),
                      lambda x0, n, s: x0 + n * s.view(-1, *[1] * (x0.dim() - 1)))


def sample_noise(latent: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype).to(latent.device)
    if noise_offset > 0:  # shifts whole channels: lets the model learn very dark / bright images
        offset = torch.randn((*latent.shape[:2], *[1] * (latent.dim() - 2)), generator=generator, dtype=latent.dtype)
        noise = noise + noise_offset * offset.to(latent.device)
    return noise


def weighted_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = ((x0_pred.float() - x0.float()) ** 2).flatten(start_dim=1).mean(dim=1)
    return (per_sample * weight.float()).mean()
