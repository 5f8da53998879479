"""Small pictures people would rather look at than read: the loss curve."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def render_loss_curve(losses: list[float], title: str = "training loss", width: int = 512,
                      height: int = 288) -> torch.Tensor:
    """Loss per step (thin) and its moving average (thick) -> IMAGE tensor [1, H, W, 3] in 0..1."""
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 48, width - 12, 24, height - 28
    draw.text((left, 6), title, fill=(20, 20, 20), font=font)
    draw.rectangle([left, top, right, bottom], outline=(200, 200, 200))
    finite = [v for v in losses if np.isfinite(v)]
    if len(finite) >= 2:
        lo, hi = min(finite), max(finite)
        span = hi - lo or 1.0

        def point(i, v):
            x = left + (right - left) * i / max(1, len(losses) - 1)
            return x, bottom - (bottom - top) * (v - lo) / span
        raw = [point(i, v) for i, v in enumerate(losses) if np.isfinite(v)]
        draw.line(raw, fill=(160, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(_smooth(finite, max(1, len(finite) // 20)))],
                  fill=(30, 80, 200), width=3)
        draw.text((4, top), f"{hi:.3g}", fill=(60, 60, 60), font=font)
        draw.text((4, bottom - 10), f"{lo:.3g}", fill=(60, 60, 60), font=font)
    draw.text((left, bottom + 8), f"steps: {len(losses)}", fill=(60, 60, 60), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
