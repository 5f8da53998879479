"""One UNet forward at a 64x64 latent: base vs our merge mode vs our bypass mode, 3 LoRAs.

model.model.apply_model(x [1,4,64,64], sigma, c_crossattn [1,77,768]) under inference mode, each
variant loaded through load_models_gpu first (untimed), variants rotated every repetition. The
warm-up runs every variant once at a 32x32 latent (first-call costs: bypass factor caches, allocator).
"""
from __future__ import annotations

import time

import torch

from .measure import settle, stats
from .stacks import OURS_CHAIN, OURS_CHAIN_BYPASS, Stacker

BASE, MERGE, BYPASS = "base", "ours merge (3 LoRAs)", "ours bypass (3 LoRAs)"


def _tokens_per_layer(base, keys: list[str], x, sigma, ctx, scale: int) -> dict[str, int]:
    """Rows each patched linear sees at the benchmark latent (hooks on a small warm-up forward)."""
    import comfy.utils
    seen, handles = {}, []
    for key in keys:
        module = comfy.utils.get_attr(base.model, key.rsplit(".", 1)[0])
        handles.append(module.register_forward_pre_hook(
            lambda m, args, key=key: seen.__setitem__(key, args[0].shape[:-1].numel())))
    try:
        base.model.apply_model(x, sigma, c_crossattn=ctx)
    finally:
        for h in handles:
            h.remove()
    # image tokens grow with the latent's area; the 77 text tokens (cross-attention k/v) do not
    return {k: (n if n == ctx.shape[1] else n * scale) for k, n in seen.items()}


def run(hub, base, names: list[str], reps: int, log, latent: int = 64, gate=None) -> dict:
    import comfy.model_management as mm

    from .fixtures import lora_targets
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, latent, latent, generator=g)
    small = torch.randn(1, 4, latent // 2, latent // 2, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    sigma = torch.tensor([3.0])
    with torch.inference_mode():
        variants = {BASE: base,
                    MERGE: Stacker(hub, OURS_CHAIN, base, names).run([1.0] * len(names)),
                    BYPASS: Stacker(hub, OURS_CHAIN_BYPASS, base, names).run([1.0] * len(names))}
        outputs, times, cpu = {}, {k: [] for k in variants}, {k: [] for k in variants}
        mm.load_models_gpu([base])
        targets = lora_targets(base, "attention")
        tokens = _tokens_per_layer(base, list(targets), small, sigma, ctx, scale=(latent // (latent // 2)) ** 2)
        rank = 32 * len(names)
        extra_flops = sum(2.0 * tokens[k] * rank * (s[0] + s[1]) for k, s in targets.items())
        for name, patcher in variants.items():  # warm-up
            mm.load_models_gpu([patcher])
            patcher.model.apply_model(small, sigma, c_crossattn=ctx)
        order = list(variants)
        for rep in range(reps):
            for name in order[rep % len(order):] + order[:rep % len(order)]:
                if gate is not None:
                    gate()
                patcher = variants[name]
                mm.load_models_gpu([patcher])
                settle(trim=False)
                t0, c0 = time.perf_counter(), time.process_time()
                out = patcher.model.apply_model(x, sigma, c_crossattn=ctx)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                if rep == 0:
                    outputs[name] = out.clone()
            log(f"forward rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        mm.load_models_gpu([base])
    diff = float((outputs[BYPASS] - outputs[MERGE]).abs().max() / outputs[MERGE].abs().max())
    change = float((outputs[MERGE] - outputs[BASE]).abs().max() / outputs[BASE].abs().max())
    paired = {k: stats([t / b for t, b in zip(times[k], times[BASE])]) for k in (MERGE, BYPASS)}
    return {"latent": [1, 4, latent, latent], "context": [1, 77, 768], "sigma": 3.0,
            "wall": {k: stats(v) for k, v in times.items()}, "cpu": {k: stats(v) for k, v in cpu.items()},
            "paired_ratio_to_base": paired,
            "bypass_extra_gflops": extra_flops / 1e9,  # the low-rank side products, x @ D^T @ U^T per layer
            "bypass_vs_merge_max_rel_diff": diff, "merge_vs_base_max_rel_change": change}
