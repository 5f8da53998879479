"""Measures without a human: what a toy-world image shows, and how far one image moved from another.

A small CNN reads shape, colour, background and texture. It is trained on the generator's ground
truth passed through the autoencoder (decode(encode(x))), so it reads images with the softness a
sampled image has; its accuracy on unseen renders is measured and stored beside its weights.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .world import KINDS


class Detector(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # 32
            nn.Conv2d(w, w * 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 16
            nn.Conv2d(w * 2, w * 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8
            nn.Conv2d(w * 2, w * 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({kind: nn.Linear(w * 4, len(values)) for kind, values in KINDS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [N, 3, H, W] in [0, 1] -> logits per kind."""
        h = self.features(images * 2 - 1)
        return {kind: head(h) for kind, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """ComfyUI IMAGE [N, H, W, 3] in [0, 1] -> [{"shape": "star", "colour": ..., ...}, ...]."""
        logits = self.eval()(images.permute(0, 3, 1, 2).float())
        picks = {kind: out.argmax(1).tolist() for kind, out in logits.items()}
        return [{kind: KINDS[kind][picks[kind][i]] for kind in KINDS} for i in range(images.shape[0])]


def train_detector(images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, batch: int, seed: int,
                   log=print) -> Detector:
    """images: float [N, 3, H, W] in [0, 1]; labels: kind -> class index [N]."""
    torch.manual_seed(seed)
    model = Detector()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    began = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx]
        x = x + 0.03 * torch.randn(x.shape, generator=gen)  # a sampler's grain
        out = model(x)
        loss = sum(nn.functional.cross_entropy(out[k], labels[k][idx]) for k in KINDS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"detector step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - began:.0f} s)")
    return model.eval()


@torch.no_grad()
def accuracy(model: Detector, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model.eval()(images)
    return {k: float((out[k].argmax(1) == labels[k]).float().mean()) for k in KINDS}


def movement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far each image moved: mean absolute pixel difference (0: same, 1: black to white), [N]."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)
