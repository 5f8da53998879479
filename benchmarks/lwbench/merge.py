"""Merging 3 rank-32 LoRAs into one rank-64 LoRA: our factor-based SVD vs a dense-SVD baseline.

ours   lora_core.merging.merge_loras(method="svd", target_rank=64) on the whole LoRAs (end to end:
       gathering, two thin QRs and an R x R SVD per layer, the cut, the error report).
dense  what SVD-merge scripts do per layer: E = sum_i scale_i up_i @ down_i as a dense fp32
       matrix, torch.linalg.svd(E), keep the top 64 (up = U S^1/2, down = S^1/2 V^T).
A dense SVD of every layer takes minutes on 2 cores, so the baseline is timed on one layer of
each distinct shape (median of reps) and its whole-LoRA time is the sum over the LoRA's layers
of its shape's median (stated as an estimate). Errors: ||E - up @ down||_F / ||E||_F in fp64
for both results on those layers, and ours' reported error checked against it on every layer.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import torch

from .measure import stats

TARGET_RANK = 64


def _exact(adapters) -> torch.Tensor:
    """E in fp64 from the factors (reference for errors)."""
    E = None
    for a in adapters:
        up, down, scale = a.low_rank()
        d = (up.double().flatten(start_dim=1) * scale) @ down.double().flatten(start_dim=1)
        E = d if E is None else E + d
    return E


def dense_merge(adapters, k: int = TARGET_RANK):
    """The dense baseline for one layer: (up, down, relative error from the singular values)."""
    E = None
    for a in adapters:
        up, down, scale = a.low_rank()
        d = (up.float().flatten(start_dim=1) * scale) @ down.float().flatten(start_dim=1)
        E = d if E is None else E.add_(d)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    h = S[:k].sqrt()
    s2 = S.double() ** 2
    err = math.sqrt(float(s2[k:].sum()) / float(s2.sum()))
    return U[:, :k] * h, h[:, None] * Vh[:k], err


def _rel_error(E: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    return float((E - up.double().flatten(start_dim=1) @ down.double().flatten(start_dim=1)).norm() / E.norm())


def run(hub, lora_paths: list[str], reps: int, log, gate=None) -> dict:
    lc = hub.pack_module("lora_core")
    merging = hub.pack_module("lora_core.merging")
    loras = [lc.load_lora(p) for p in lora_paths]
    inputs = [(lora, 1.0) for lora in loras]
    prefixes = sorted(loras[0].adapters)

    # ours, end to end, whole LoRAs (warm-up + reps)
    merging.merge_loras(inputs, method="svd", target_rank=TARGET_RANK)
    ours_times = []
    for _ in range(reps):
        if gate is not None:
            gate()
        t0 = time.perf_counter()
        merged, report = merging.merge_loras(inputs, method="svd", target_rank=TARGET_RANK)
        ours_times.append(time.perf_counter() - t0)
    log(f"merge ours: {stats(ours_times)['median']:.2f} s for {len(prefixes)} layers")

    # ours' reported error vs the real one, every layer
    reported = {r.name: r.rel_error for r in report.layers}
    check_worst = 0.0
    for prefix in prefixes:
        E = _exact([lora.adapters[prefix] for lora in loras])
        a = merged.adapters[prefix]
        check_worst = max(check_worst, abs(_rel_error(E, a.roles["up"], a.roles["down"]) - reported[prefix]))

    # dense baseline on one layer per distinct shape, ours on the same single layers
    shape_of = {p: loras[0].adapters[p].target_shape_2d() for p in prefixes}
    counts = Counter(shape_of.values())
    sample = {}
    for p in prefixes:
        sample.setdefault(shape_of[p], p)
    per_shape = []
    for shape, prefix in sorted(sample.items()):
        adapters = [lora.adapters[prefix] for lora in loras]
        single = [(lc.LoRA(name=lora.name, adapters={prefix: lora.adapters[prefix]}), 1.0) for lora in loras]
        dense_merge(adapters)
        merging.merge_loras(single, method="svd", target_rank=TARGET_RANK)
        d_times, o_times = [], []
        for _ in range(reps):
            if gate is not None:
                gate()
            t0 = time.perf_counter()
            d_up, d_down, d_err = dense_merge(adapters)
            d_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            o_merged, o_report = merging.merge_loras(single, method="svd", target_rank=TARGET_RANK)
            o_times.append(time.perf_counter() - t0)
        E = _exact(adapters)
        o = o_merged.adapters[prefix]
        row = {"shape": list(shape), "layers_of_this_shape": counts[shape], "sample_layer": prefix,
               "dense": stats(d_times), "ours_single_layer": stats(o_times),
               "dense_error": _rel_error(E, d_up, d_down), "dense_error_from_s": d_err,
               "ours_error": _rel_error(E, o.roles["up"], o.roles["down"]),
               "ours_reported_error": o_report.layers[0].rel_error}
        row["error_diff"] = abs(row["ours_error"] - row["dense_error"])
        per_shape.append(row)
        log(f"merge {shape[0]}x{shape[1]} (x{counts[shape]}): dense {row['dense']['median']:.3f} s, ours "
            f"{row['ours_single_layer']['median']:.4f} s, errors {row['dense_error']:.6f} / {row['ours_error']:.6f}")
    dense_total = sum(r["dense"]["median"] * r["layers_of_this_shape"] for r in per_shape)
    dense_total_min = sum(r["dense"]["min"] * r["layers_of_this_shape"] for r in per_shape)
    return {"inputs": [f"{len(loras)} x rank-32 kohya, {len(prefixes)} layers"], "target_rank": TARGET_RANK,
            "ours_whole": stats(ours_times), "dense_whole_estimate": {"median": dense_total, "min": dense_total_min},
            "per_shape": per_shape, "max_error_diff": max(r["error_diff"] for r in per_shape),
            "reported_vs_actual_error_worst": check_worst,
            "mean_rel_error": sum(reported.values()) / len(reported)}
