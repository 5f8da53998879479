"""Build synthetic LoRA state dicts in the layouts real tools write (pure torch, seeded)."""
from __future__ import annotations

import torch

# (up suffix, down suffix) per layout, as kohya, diffusers and PEFT write them.
LAYOUTS = {
    "kohya": (".lora_up.weight", ".lora_down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
    "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"),
    "diffusers_old": (".lora.up.weight", ".lora.down.weight"),
    "diffusers_underscore": ("_lora.up.weight", "_lora.down.weight"),
    "transformers": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
}


def low_rank_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int, scale: float = 0.1):
    """{prefix: (up [out, r], down [r, in])} with both factors non-zero (a trained LoRA)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (rows, cols) in sorted(shapes.items()):
        r = min(rank, rows, cols)
        out[prefix] = (torch.randn(rows, r, generator=g) * scale, torch.randn(r, cols, generator=g) * scale)
    return out


def lora_state_dict(factors: dict, alpha: float | None, layout: str = "kohya",
                    rename=lambda p: p) -> dict[str, torch.Tensor]:
    up_suffix, down_suffix = LAYOUTS[layout]
    sd = {}
    for prefix, (up, down) in factors.items():
        name = rename(prefix)
        sd[name + up_suffix] = up.contiguous()
        sd[name + down_suffix] = down.contiguous()
        if alpha is not None and layout in ("kohya",):
            sd[name + ".alpha"] = torch.tensor(float(alpha))
    return sd
