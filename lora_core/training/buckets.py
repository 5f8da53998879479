"""Aspect-ratio bucketing: each image goes to the bucket (w, h) of about resolution^2 pixels
whose aspect ratio is nearest its own, both sides multiples of 64, then is resized and centre-cropped."""
from __future__ import annotations

import torch
import torch.nn.functional as F

STEP = 64


def bucket_sizes(resolution: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    area = resolution * resolution
    sizes = set()
    w = STEP
    while w <= resolution * max_ratio:
        h = max(STEP, int(area / w) // STEP * STEP)
        if 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((w, h))
        w += STEP
    sizes.add((resolution // STEP * STEP or STEP,) * 2)
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    import math
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def fit_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, C] in 0..1 -> [height, width, C]: scale to cover, then centre-crop."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    resized = F.interpolate(image.permute(2, 0, 1)[None].float(), size=(nh, nw), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return resized[:, top:top + height, left:left + width].permute(1, 2, 0).clamp(0, 1)
