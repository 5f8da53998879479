"""Training step time and peak memory: our Train LoRA vs core TrainLoraNode, same model and data.

Both get the same pre-encoded data (4 random 32x32 latents = 256 px images, one [1,77,768]
conditioning), batch 1, rank 8, fp32 (weights, compute and LoRA), gradient checkpointing,
AdamW, on a reduced-depth SD1.5-layout UNet (fixtures.REDUCED_LAYOUT, loaded by UNETLoader).

ours  the training half of LW_TrainLoRA's execute, through the same functions it calls
      (nodes.train_bridge.attach_trainable / load_for_training / denoiser / noise_model_of,
      lora_core.training.train, unload) with the node's defaults (attention targets,
      alpha = rank, cosine schedule, min-SNR 5). The node itself also VAE/CLIP-encodes the
      images once, hashes the base weights and saves the file: outside the step loop, left out.
core  TrainLoraNode.execute with training_dtype fp32, lora_dtype fp32, algorithm LoRA, MSE,
      its default learning rate. It trains EVERY weight layer (linear, conv, norms, with bias
      diffs) -- it has no target option -- so its trainable set is far larger than ours.
Step times come from each loop's own per-step callback (ours: TrainHooks.on_step; core: its
ProgressBar through comfy.utils' global progress hook); the first step of a run is a warm-up.
"""
from __future__ import annotations

import time
import warnings

import torch

from .measure import PeakRSS, settle, stats

OURS, CORE = "ours TrainLoRA (attention)", "core TrainLoraNode (all layers)"
LATENT = 32
RANK = 8


def _data(hub, model):
    tb = hub.pack_module("nodes.train_bridge")
    tr = hub.pack_module("lora_core.training")
    g = torch.Generator().manual_seed(11)
    latents = [torch.randn(4, LATENT, LATENT, generator=g) for _ in range(4)]
    cond = torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode():
        samples = tb.build_samples(model, latents, [[cond, {"pooled_output": None}]] * len(latents))
    return latents, cond, samples


def _ours(hub, model, samples, steps: int) -> dict:
    tb = hub.pack_module("nodes.train_bridge")
    tr = hub.pack_module("lora_core.training")
    stamps: list[float] = []
    settings = tr.TrainSettings(steps=steps, learning_rate=1e-4, batch_size=1, grad_accumulation=1,
                                optimizer="adamw", lr_schedule="cosine", warmup_steps=0, seed=0,
                                noise_offset=0.0, min_snr_gamma=5.0)
    hooks = tr.TrainHooks(on_step=lambda step, loss, lr: stamps.append(time.perf_counter()))
    settle()
    with torch.inference_mode(), PeakRSS() as peak:
        with torch.inference_mode(False), torch.enable_grad():
            t0 = time.perf_counter()
            trainer, layers = tb.attach_trainable(model, tr.ATTENTION, RANK, float(RANK), 0, "kaiming", True)
            params = [p for layer in layers.values() for p in layer.parameters()]
            try:
                device = tb.load_for_training(trainer)
                t_ready = time.perf_counter()
                with tb.training_context():
                    tr.train(tb.denoiser(trainer), samples, params, tb.noise_model_of(trainer), settings, hooks,
                             device, collate=tb.collate_host_conds)
            finally:
                tb.unload(trainer)
            t_end = time.perf_counter()
    return {"stamps": [t_ready] + stamps, "setup": t_ready - t0, "total": t_end - t0, "peak_rss": peak.delta,
            "trainable_params": sum(p.numel() for p in params), "layers": len(layers)}


def _core(hub, model, latents, cond, steps: int) -> dict:
    import comfy.utils
    stamps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, node_id=None:
                                             stamps.append(time.perf_counter()))
    node = hub.node("TrainLoraNode")
    settle()
    try:
        with torch.inference_mode(), PeakRSS() as peak, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CPU autocast ... not supported": fp32 autocast is a no-op
            t0 = time.perf_counter()
            out = node.execute(model=[model], latents=[{"samples": torch.stack(latents)}], positive=[[[cond, {}]]],
                               batch_size=[1], steps=[steps], grad_accumulation_steps=[1], learning_rate=[5e-4],
                               rank=[RANK], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                               training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                               gradient_checkpointing=[True], existing_lora=["[None]"], bucket_mode=[False])
            t_end = time.perf_counter()
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    lora_sd, trained = out.args[1], out.args[0]
    import comfy.model_management as mm
    for i, loaded in enumerate(list(mm.current_loaded_models)):  # core leaves its clone loaded; free it
        if loaded.model is trained:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            break
    del out, trained
    return {"stamps": stamps, "total": t_end - t0, "peak_rss": peak.delta,
            "trainable_params": sum(v.numel() for v in lora_sd.values()), "tensors": len(lora_sd)}


def _step_times(stamps: list[float], skip_first: bool) -> list[float]:
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return steps[1:] if skip_first else steps


def run(hub, model, runs: int, steps: int, log, gate=None) -> dict:
    latents, cond, samples = _data(hub, model)
    results = {OURS: [], CORE: []}
    for r in range(runs):
        for impl in ([OURS, CORE] if r % 2 == 0 else [CORE, OURS]):
            if gate is not None:
                gate()
            res = _ours(hub, model, samples, steps) if impl == OURS else _core(hub, model, latents, cond, steps)
            # ours: stamps start when the model is ready, so interval 0 is step 1 (warm-up);
            # core: stamps are step ends, so intervals begin at step 2 already.
            res["step_times"] = _step_times(res.pop("stamps"), skip_first=(impl == OURS))
            results[impl].append(res)
            log(f"train run {r + 1}/{runs} {impl}: steps {', '.join(f'{t:.2f}' for t in res['step_times'])} s, "
                f"peak +{res['peak_rss'] / 2**20:.0f} MiB")
    summary = {}
    for impl, rs in results.items():
        summary[impl] = {"step": stats([t for r in rs for t in r["step_times"]]),
                         "peak_rss": stats([r["peak_rss"] for r in rs]),
                         "total_run": stats([r["total"] for r in rs]),
                         "trainable_params": rs[0]["trainable_params"],
                         "runs": rs}
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return {"model_params": n_params, "latent": [1, 4, LATENT, LATENT], "batch": 1, "rank": RANK, "dtype": "fp32",
            "gradient_checkpointing": True, "steps_per_run": steps, "runs_each": runs, "results": summary}
