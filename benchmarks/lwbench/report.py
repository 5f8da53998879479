"""Turning measurements into rows with targets, a printed table, JSON and a Markdown page."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import forward as fwd
from . import stacks as st
from . import training as trn
from .measure import stats

MIB = 2 ** 20


def _paired(ours: list[float], ref: list[float]) -> dict:
    return stats([a / b for a, b in zip(ours, ref) if b > 0])


def _verdict(paired: bool, minima: bool):
    """True/False when the median of paired ratios and the ratio of minima agree, else 'mixed'."""
    return paired if paired == minima else "mixed"


def _row(section, case, what, ours_impl, ours, ref_impl=None, ref=None, ratio=None, target=None, met=None,
         unit="s", note=""):
    return {"section": section, "case": case, "what": what, "ours_impl": ours_impl, "ours": ours,
            "ref_impl": ref_impl, "ref": ref, "ratio": ratio, "target": target, "met": met, "unit": unit,
            "note": note}


def floor_of(case_info: dict, floor: dict) -> dict:
    """Lower bound of patching a case: max(FLOPs / GEMM rate, bytes / copy bandwidth)."""
    gemm = floor["gemm_gflops_best"] * 1e9
    bw = floor["copy_gbps_best"] * 1e9
    flops, nbytes = case_info["flops"], case_info["bytes"]
    return {"flops": flops, "bytes": nbytes, "compute_s": flops / gemm, "memory_s": nbytes / bw,
            "lower_bound_s": max(flops / gemm, nbytes / bw)}


def stack_rows(stack_results: dict, cases: dict, floor: dict) -> list[dict]:
    rows = []
    for case, per_impl in stack_results.items():
        name, temp = case.rsplit(", ", 1)  # "3 x attention r32, cold" -> its case and temperature
        info = cases[name]
        fl = floor_of(info, floor)
        # ComfyUI's patch loop with a zero patch (its copies and books) plus the LoRA products at GEMM rate;
        # results written before 2026-12-01 measured the loop once per case (host_loop_s)
        host_loop = info["host_loop"][temp]["median"] if "host_loop" in info else info.get("host_loop_s", 0.0)
        host_floor = host_loop + fl["compute_s"]
        core = per_impl.get(st.CORE)
        if core is None:
            continue
        n = info["loras"]
        for impl, res in per_impl.items():
            if impl == st.CORE:
                continue
            bypass = "bypass" in impl
            # apply
            ours_t, core_t = res["apply"]["total"], core["apply"]["total"]
            ratio = _paired(ours_t["values"], core_t["values"])
            target = met = None
            ratio["min"] = ours_t["min"] / core_t["min"]
            if n == 3 and not bypass:
                target = "<= 0.5x core and <= 1.3x host floor"
                met = _verdict(ratio["median"] <= 0.5 and ours_t["median"] <= 1.3 * host_floor,
                               ratio["min"] <= 0.5 and ours_t["min"] <= 1.3 * host_floor)
            rows.append(_row("apply", case, "node + patch", impl, ours_t, st.CORE, core_t, ratio, target, met,
                             note=(f"node {res['apply']['node']['median']:.3f} s + patch "
                                   f"{res['apply']['patch']['median']:.3f} s "
                                   f"(core {core['apply']['node']['median']:.3f}"
                                   f" + {core['apply']['patch']['median']:.3f}); ratio of minima {ratio['min']:.3f}; "
                                   + (f"host floor {host_floor:.3f} s (ComfyUI's loop "
                                      f"{host_loop:.3f} s + GEMM), ours/host floor median "
                                      f"{ours_t['median'] / host_floor:.2f}, min {ours_t['min'] / host_floor:.2f}; "
                                      f"floor {fl['lower_bound_s']:.3f} s, ours/floor median "
                                      f"{ours_t['median'] / fl['lower_bound_s']:.2f}" + _patch_parts(res, core, fl)
                                      if not bypass else "bypass writes no weight"))))
            # strength change
            ours_s, core_s = res["strength"]["total"], core["strength"]["total"]
            ratio = _paired(ours_s["values"], core_s["values"])
            target = met = None
            ratio["min"] = ours_s["min"] / core_s["min"]
            if bypass:
                written = max(res["strength"]["weights_written"]["values"])
                target = "no re-patch, >= 50x faster than core"
                met = _verdict(written == 0 and ratio["median"] <= 1 / 50, written == 0 and ratio["min"] <= 1 / 50)
            rows.append(_row("strength", case, "re-run + reload", impl, ours_s, st.CORE, core_s, ratio, target, met,
                             note=f"weights re-patched: {int(max(res['strength']['weights_written']['values']))}; "
                                  f"node {res['strength']['node']['median']:.3f} s + reload "
                                  f"{res['strength']['patch']['median']:.3f} s; core/ours {1 / ratio['median']:.1f}x "
                                  f"(of minima {1 / ratio['min']:.1f}x)"))
            # restore
            ours_r, core_r = res["restore"]["total"], core["restore"]["total"]
            rows.append(_row("restore", case, "load base", impl, ours_r, st.CORE, core_r,
                             _paired(ours_r["values"], core_r["values"])))
            # peak memory while applying (a separate run after freed heap went back to the OS)
            ours_m, core_m = res["memory"]["apply_peak_rss"], core["memory"]["apply_peak_rss"]
            rows.append(_row("memory", case, "peak RSS over start, apply", impl, {"median": ours_m}, st.CORE,
                             {"median": core_m}, {"median": ours_m / core_m if core_m else None}, unit="B",
                             note=f"strength change: ours {res['memory']['strength_peak_rss'] / MIB:.0f} MiB, core "
                                  f"{core['memory']['strength_peak_rss'] / MIB:.0f} MiB"))
    return rows


def _patch_parts(res: dict, core: dict, fl: dict) -> str:
    """Inside the patch: ComfyUI's copy of every weight, and the LoRA math (ours vs core's)."""
    if "patch_lora_math" not in res["apply"]:
        return ""
    copy, math_ = res["apply"]["patch_core_copy"]["median"], res["apply"]["patch_lora_math"]["median"]
    return (f"; inside the patch: ComfyUI's weight copies {copy:.3f} s (core's run "
            f"{core['apply']['patch_core_copy']['median']:.3f} s), LoRA math ours {math_:.3f} s vs core "
            f"{core['apply']['patch_lora_math']['median']:.3f} s, ours/floor {math_ / fl['lower_bound_s']:.2f}")


def forward_rows(res: dict) -> list[dict]:
    rows = []
    base = res["wall"][fwd.BASE]
    for impl, limit, target in ((fwd.MERGE, 0.02, "within 2% of base"), (fwd.BYPASS, 0.15, "within 15% of base")):
        ratio = dict(res["paired_ratio_to_base"][impl])
        ratio["min"] = res["wall"][impl]["min"] / base["min"]
        ok = (lambda r: abs(r - 1) <= limit) if impl == fwd.MERGE else (lambda r: r <= 1 + limit)
        met = _verdict(ok(ratio["median"]), ok(ratio["min"]))
        rows.append(_row("forward", "3 x attention r32, 64x64 latent", "apply_model", impl, res["wall"][impl],
                         fwd.BASE, base, ratio, target, met,
                         note=f"ratio of medians {res['wall'][impl]['median'] / base['median']:.3f}, of minima "
                              f"{res['wall'][impl]['min'] / base['min']:.3f}"
                              + (f"; bypass side products {res['bypass_extra_gflops']:.1f} GFLOP per forward"
                                 if impl == fwd.BYPASS else
                                 f"; max |merge - bypass| / max |out| = {res['bypass_vs_merge_max_rel_diff']:.1e}")))
    return rows


def train_rows(res: dict) -> list[dict]:
    ours, core = res["results"][trn.OURS], res["results"][trn.CORE]
    ratio = {"median": ours["step"]["median"] / core["step"]["median"],
             "min": ours["step"]["min"] / core["step"]["min"]}
    case = f"{res['model_params'] / 1e6:.1f} M-param SD1.5-layout UNet, 32x32 latent, b1 r8 fp32 ckpt"
    rows = [_row("train", case, "step time", trn.OURS, ours["step"], trn.CORE, core["step"], ratio,
                 "<= 0.8x core", _verdict(ratio["median"] <= 0.8, ratio["min"] <= 0.8),
                 note=f"trainable params ours {ours['trainable_params']:,} vs core {core['trainable_params']:,}")]
    m_ratio = {"median": ours["peak_rss"]["median"] / core["peak_rss"]["median"]}
    m_ratio["min"] = ours["peak_rss"]["min"] / core["peak_rss"]["min"]
    rows.append(_row("train", case, "peak RSS over start", trn.OURS, ours["peak_rss"], trn.CORE, core["peak_rss"],
                     m_ratio, "<= core", _verdict(m_ratio["median"] <= 1.0, m_ratio["min"] <= 1.0), unit="B"))
    return rows


def merge_rows(res: dict) -> list[dict]:
    ours, dense = res["ours_whole"], res["dense_whole_estimate"]
    speedup = dense["median"] / ours["median"]
    ratio = {"median": ours["median"] / dense["median"], "min": ours["min"] / dense["min"]}
    return [_row("merge", "3 x r32 -> r64 (svd)", "whole LoRA", "ours factored SVD", ours,
                 "dense SVD per layer (estimate)", dense, ratio,
                 ">= 5x faster, same per-layer error (1e-5)",
                 _verdict(speedup >= 5 and res["max_error_diff"] <= 1e-5,
                          dense["min"] / ours["min"] >= 5 and res["max_error_diff"] <= 1e-5),
                 note=f"{speedup:.0f}x faster; max |error ours - dense| {res['max_error_diff']:.1e}; "
                      f"mean rel. error {res['mean_rel_error']:.4f}")]


# ---------------------------------------------------------------- printing

def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / MIB:.0f} MiB"
    return f"{value:.3f} s" if value < 100 else f"{value:.0f} s"


def _cell(stat: dict | None, unit: str) -> str:
    if not stat or stat.get("median") is None:
        return "-"
    text = _fmt(stat["median"], unit)
    if stat.get("min") is not None:
        text += f" ({_fmt(stat['min'], unit)})"
    return text


def _met(row) -> str:
    if row["met"] is None:
        return ""
    if row["met"] == "mixed":
        return "mixed"
    return "yes" if row["met"] else "NO"


HEAD = ["section", "case", "ours", "ours median (min)", "reference", "ref median (min)", "ratio", "target", "met"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = r["ratio"]["median"] if r["ratio"] else None
        out.append([r["section"], r["case"], r["ours_impl"], _cell(r["ours"], r["unit"]), r["ref_impl"] or "",
                    _cell(r["ref"], r["unit"]), f"{ratio:.3f}" if ratio is not None else "-", r["target"] or "",
                    _met(r)])
    return out


def text_table(rows: list[dict]) -> str:
    body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(HEAD)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEAD, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def markdown(results: dict, rows: list[dict]) -> str:
    m = results["machine"]
    lines = [f"# LoRA Workbench benchmarks: {results['date']} ({'quick' if results['quick'] else 'full'} run)", "",
             f"Command: `{results['command']}`", "",
             "## Machine", "",
             f"- CPU: {m['cpu']}, {m['cores']} cores visible, torch threads {m['torch_threads']}, "
             f"AVX2 {m['avx2']}, AVX-512 {m['avx512']}",
             f"- RAM: {m['ram_gb']} GB; {m['os']}",
             f"- torch {m['torch']}, Python {m['python']}, ComfyUI {results['comfyui_version']} (`--cpu`), fp32",
             f"- load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}; "
             f"CPU pressure (PSI some avg60) start {results['contention']['start']}, end "
             f"{results['contention']['end']}",
             f"- measured: GEMM {results['floor']['gemm_gflops']:.1f} GFLOP/s median, "
             f"{results['floor']['gemm_gflops_best']:.1f} best ({results['floor']['gemm_shape']}); "
             f"patch-shaped addmm {results['floor']['addmm_gflops']:.1f} GFLOP/s; copy bandwidth "
             f"{results['floor']['copy_gbps']:.1f} GB/s median, {results['floor']['copy_gbps_best']:.1f} best "
             "(read + write)", "",
             "- sections measured: " + "; ".join(
                 f"{k} {v['date']} ({v['seconds']:.0f} s, CPU pressure {v['psi_avg60_start']} -> "
                 f"{v['psi_avg60_end']}, other jobs' CPU share before repetitions, median "
                 + (f"{v['others_busy_median']:.0%})" if v.get("others_busy_median") is not None else "n/a)")
                 for k, v in results.get("section_runs", {}).items()), "",
             f"Model: {results['model']['description']}", "",
             f"Repetitions: {results['reps']} after a warm-up, ours and core alternating; cells are "
             "median (min); ratio = median over repetitions of ours/reference measured back to back.", "",
             "## Results", "",
             "| " + " | ".join(HEAD + ["note"]) + " |", "|" + "---|" * (len(HEAD) + 1)]
    for b, r in zip(table_rows(rows), rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in b + [r["note"]]) + " |")
    lines += ["", "## Floor (lower bound of patching)", "",
              "| case | patched weights | FLOPs | bytes (fp32 read + write) | compute bound | memory bound "
              "| lower bound |", "|---|---|---|---|---|---|---|"]
    for case, f in results.get("floors", {}).items():
        info = results["cases"][case]
        lines.append(f"| {case} | {info['layers']} layers, {info['params'] / 1e6:.1f} M | {f['flops'] / 1e9:.1f} G "
                     f"| {f['bytes'] / 1e9:.2f} GB | {f['compute_s']:.3f} s | {f['memory_s']:.3f} s "
                     f"| {f['lower_bound_s']:.3f} s |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")
