#!/usr/bin/env python3
"""LoRA Workbench benchmark suite: ours vs core ComfyUI, in one process, alternating.

    python3 benchmarks/run.py                      # full run (about 10 minutes on 2 cores)
    python3 benchmarks/run.py --quick              # about 2 minutes: fewer repetitions and sections
    python3 benchmarks/run.py --only apply,merge   # sections: apply strength restore forward train merge

Finds (or installs) the pinned ComfyUI host with scripts/comfy_host.py and re-runs itself with the
host's python, imports ComfyUI in-process (--cpu) and loads custom nodes with ComfyUI's own loader,
then prints a table and writes benchmarks/results/<date>-cpu.json and benchmarks/results/latest.md.
See benchmarks/README.md for what each section measures.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # lwbench; never the repo root (its nodes/ would shadow ComfyUI's nodes.py)

from lwbench import host as hostmod  # noqa: E402  (standard library only until the host python runs)

SECTIONS = ("apply", "strength", "restore", "forward", "train", "merge")
QUICK_SECTIONS = ("apply", "strength", "restore", "merge")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 repetitions, 3-LoRA attention stack only, no forward/train")
    p.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=None, help="repetitions after the warm-up (default 5, quick 3)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--from-json", type=Path, help="re-render the table and Markdown from a results JSON; runs nothing")
    p.add_argument("--update", type=Path, help="re-measure the --only sections and replace them in this results JSON "
                                               "(e.g. ones a burst of other jobs spoiled); the rest is kept")
    p.add_argument("--no-gate", action="store_true",
                   help="do not wait for other processes' CPU bursts to pass before each repetition")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = chosen or list(QUICK_SECTIONS if args.quick else SECTIONS)
    args.reps = args.reps or (3 if args.quick else 5)
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def psi_cpu() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return next(x for x in some if x.startswith("avg60=")).split("=")[1] + "%"
    except (OSError, StopIteration):
        return "n/a"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    host = hostmod.ensure_host_python(Path(__file__), argv)
    started = time.time()

    import torch  # noqa: F401  (host python from here on)
    from lwbench import fixtures, measure, report
    from lwbench import forward as fwd
    from lwbench import merge as mrg
    from lwbench import stacks as st
    from lwbench import training as trn

    if args.from_json:
        import json
        results = json.loads(args.from_json.read_text())
        _finish(results, results["cases"], args, report, trn, write_name=args.from_json.name)
        return 0

    cache = hostmod.comfy_host_script().cache_dir() / "bench"
    scratch = Path(tempfile.mkdtemp(prefix="lw-bench-"))
    dirs = {k: scratch / k for k in ("output", "input", "temp", "user", "loras")}
    for d in dirs.values():
        d.mkdir()
    models_dir = cache / "diffusion_models"
    try:
        log(f"importing ComfyUI from {host.comfyui} (--cpu)")
        logging.disable(logging.WARNING)  # ComfyUI's optional-node import warnings and per-load info
        hub = hostmod.import_comfyui(host.comfyui, dirs, {"loras": dirs["loras"], "diffusion_models": models_dir})
        logging.disable(logging.NOTSET)
        logging.getLogger().setLevel(logging.ERROR)
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False  # core's training tqdm bar
        hub.pack  # fails early if ComfyUI could not import the pack

        results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "reps": args.reps,
                         "sections": args.sections, "machine": measure.machine(),
                         "comfyui_version": hostmod.comfyui_version(host.comfyui),
                         "command": "python3 benchmarks/run.py " + " ".join(argv),
                         "contention": {"start": psi_cpu()}, "notes": []}
        results["machine"]["peak_rss_method"] = ("kernel high-water mark (VmHWM, reset via /proc/self/clear_refs)"
                                                 if measure.PeakRSS.exact else "2 ms RSS sampling thread")

        # ------------------------------------------------------------ floor, part 1
        floor_runs = [_floor(measure)]

        # ------------------------------------------------------------ the full-size model and LoRAs
        t0 = time.perf_counter()
        fixtures.ensure_model_file(models_dir, fixtures.FULL_MODEL_FILE, fixtures.SD15_LAYOUT, 1234, log)
        base = fixtures.load_unet(hub, fixtures.FULL_MODEL_FILE)
        n_params = sum(p.numel() for p in base.model.diffusion_model.parameters())
        log(f"full SD1.5 UNet loaded by UNETLoader in {time.perf_counter() - t0:.1f} s "
            f"({n_params / 1e6:.1f} M params, {base.model_dtype()}, {type(base.model.model_config).__name__})")
        results["model"] = {"description": f"full-size SD1.5 UNet ({n_params / 1e6:.1f} M parameters) built from "
                                           "ComfyUI's SD15 config with seeded random weights, fp16 file loaded "
                                           "as fp32 by UNETLoader (ComfyUI detects SD15), a real ModelPatcher",
                            "params": n_params, "file": str(models_dir / fixtures.FULL_MODEL_FILE)}
        loras = {}
        for kind in ("attention", "typical"):
            for i in range(3):
                path = dirs["loras"] / f"lw_bench_{kind}_{i + 1}.safetensors"
                loras.setdefault(kind, []).append(
                    fixtures.write_kohya_lora(path, base, kind, rank=32, alpha=16.0,
                                              seed=100 * (kind == "typical") + i))
        results["loras"] = loras
        cases = {}
        for kind, n in (("attention", 1), ("attention", 3), ("typical", 3)):
            targets = fixtures.lora_targets(base, kind)
            params = sum(s.numel() for s in targets.values())
            cases[f"{n} x {kind} r32"] = {"kind": kind, "loras": n, "layers": len(targets), "params": params,
                                          "names": [f["file"] for f in loras[kind][:n]], "keys": sorted(targets),
                                          "flops": 2.0 * params * 32 * n, "bytes": 2.0 * 4 * params}
        results["cases"] = cases  # names and keys are dropped after the stacks section (it adds host_loop)

        gate = measure.QuietGate(enabled=not args.no_gate, max_wait=20.0, budget=30.0 if args.quick else 300.0)
        section_runs = results["section_runs"] = {}

        def measured(name: str, fn):
            """Run a section and note when, and how busy the machine was meanwhile."""
            psi0, n0, t0 = psi_cpu(), len(gate.samples), time.time()
            out = fn()
            busy = sorted(gate.samples[n0:])
            section_runs[name] = {"date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                                  "seconds": round(time.time() - t0, 1), "psi_avg60_start": psi0,
                                  "psi_avg60_end": psi_cpu(),
                                  "others_busy_median": busy[len(busy) // 2] if busy else None}
            return out

        # ------------------------------------------------------------ apply / strength / restore
        if {"apply", "strength", "restore"} & set(args.sections):
            results["stacks"], results["equivalence"] = measured(
                "stacks", lambda: _stacks(hub, base, cases, args, st, measure, log, gate))
        results["cases"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("names", "keys")}
                            for k, v in cases.items()}
        # ------------------------------------------------------------ forward
        if "forward" in args.sections:
            names = cases["3 x attention r32"]["names"]
            results["forward"] = measured("forward", lambda: fwd.run(hub, base, names, args.reps, log, gate=gate))
        # ------------------------------------------------------------ merge
        if "merge" in args.sections:
            paths = [str(dirs["loras"] / f["file"]) for f in loras["attention"]]
            results["merge"] = measured("merge", lambda: mrg.run(hub, paths, args.reps, log, gate=gate))
        # ------------------------------------------------------------ train (its own reduced model)
        if "train" in args.sections:
            import comfy.model_management as mm
            mm.unload_all_models()
            fixtures.ensure_model_file(models_dir, fixtures.TRAIN_MODEL_FILE, fixtures.REDUCED_LAYOUT, 1235, log)
            small = fixtures.load_unet(hub, fixtures.TRAIN_MODEL_FILE)
            runs = 1 if args.quick else 2
            steps = 1 + -(-args.reps // runs)  # a warm-up step + enough measured steps for >= reps in total
            results["train"] = measured("train", lambda: trn.run(hub, small, runs, steps, log, gate=gate))
            results["train"]["layout"] = fixtures.REDUCED_LAYOUT

        # ------------------------------------------------------------ floor, part 2 and the table
        floor_runs.append(_floor(measure))
        results["floor"] = {
            "gemm_shape": floor_runs[0]["gemm"]["shape"],
            "gemm_gflops": max(f["gemm"]["gflops"] for f in floor_runs),
            "gemm_gflops_best": max(f["gemm"]["gflops_best"] for f in floor_runs),
            "addmm_gflops": max(f["addmm"]["gflops"] for f in floor_runs),
            "copy_gbps": max(f["copy"]["gbps"] for f in floor_runs),
            "copy_gbps_best": max(f["copy"]["gbps_best"] for f in floor_runs),
            "runs": floor_runs}
        results["floors"] = {c: report.floor_of(info, results["floor"]) for c, info in cases.items()}
        results["contention"]["end"] = psi_cpu()
        results["contention"]["gate"] = gate.summary()
        results["seconds"] = round(time.time() - started, 1)
        if args.update:
            results = _merged(args.update, results, measure)
            _finish(results, cases, args, report, trn, write_name=args.update.name, out=args.update.parent)
        else:
            _finish(results, cases, args, report, trn)
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _merged(path: Path, new: dict, measure) -> dict:
    """The results in `path` with the sections of `new` replacing theirs."""
    import json
    old = json.loads(path.read_text())
    for key in ("stacks", "equivalence", "forward", "train", "merge"):
        if key in new:
            old[key] = new[key]
    if "stacks" in new:  # the cases carry the host loop measured among the stacks
        old["cases"] = new["cases"]
    old.setdefault("section_runs", {}).update(new["section_runs"])
    old["sections"] = [s for s in SECTIONS if s in set(old["sections"]) | set(new["sections"])]
    runs = old["floor"]["runs"] + new["floor"]["runs"]
    old["floor"] = {**new["floor"], "runs": runs,
                    **{k: max(old["floor"][k], new["floor"][k])
                       for k in ("gemm_gflops", "gemm_gflops_best", "addmm_gflops", "copy_gbps", "copy_gbps_best")}}
    old.setdefault("updates", []).append({"date": new["date"], "command": new["command"],
                                          "sections": new["sections"], "contention": new["contention"]})
    return old


def _finish(results: dict, cases: dict, args, report, trn, write_name: str | None = None,
            out: Path | None = None) -> None:
    """Rows with targets, the printed table, the JSON and the Markdown page."""
    rows = []
    sections = results["sections"]
    results["floors"] = {c: report.floor_of(info, results["floor"]) for c, info in results["cases"].items()}
    if "stacks" in results:
        rows += [r for r in report.stack_rows(results["stacks"], cases, results["floor"])
                 if r["section"] in sections or r["section"] == "memory"]
    if "forward" in results:
        rows += report.forward_rows(results["forward"])
    if "train" in results:
        rows += report.train_rows(results["train"])
    if "merge" in results:
        rows += report.merge_rows(results["merge"])
    results["rows"] = rows
    results["notes"] = _notes(results, trn)

    print()
    print(report.text_table(rows))
    print()
    for r in rows:
        if r["note"] and (r["target"] or r["section"] == "memory"):
            print(f"  {r['section']} / {r['case']} / {r['ours_impl']}: {r['note']}")
    print()
    for case, f in results["floors"].items():
        print(f"floor {case}: {f['flops'] / 1e9:.1f} GFLOP, {f['bytes'] / 1e9:.2f} GB -> "
              f"max({f['compute_s']:.3f} s, {f['memory_s']:.3f} s) = {f['lower_bound_s']:.3f} s")
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"GEMM {results['floor']['gemm_gflops_best']:.0f} GFLOP/s, copy {results['floor']['copy_gbps_best']:.1f} "
          f"GB/s; CPU pressure avg60 {results['contention']['start']} -> {results['contention']['end']}; "
          f"{results['seconds']:.0f} s")
    if args.no_write:
        return
    out = out or args.out
    name = write_name or f"{time.strftime('%Y-%m-%d')}-cpu{'-quick' if results['quick'] else ''}.json"
    report.write_json(out / name, results)
    report.write_atomic(out / ("latest-quick.md" if results["quick"] else "latest.md"), report.markdown(results, rows))
    log(f"wrote {out / name}")


def _floor(measure) -> dict:
    return {"gemm": measure.gemm_rate(), "addmm": measure.lowrank_addmm_rate(), "copy": measure.copy_bandwidth()}


def _stacks(hub, base, cases: dict, args, st, measure, log, gate) -> tuple[dict, dict]:
    """Cycles (apply, strength change, restore) for every case and implementation, alternating."""
    plan = {"1 x attention r32": [st.CORE, st.OURS_CHAIN, st.OURS_CHAIN_BYPASS],
            "3 x attention r32": list(st.IMPLS),
            "3 x typical r32": list(st.IMPLS)}
    if args.quick:
        plan = {"3 x attention r32": list(st.IMPLS)}
    keys = sorted(k for k in base.model.state_dict() if k.endswith(("attn1.to_q.weight", "attn2.to_k.weight")))[:6]
    import torch
    with torch.inference_mode():
        pristine = {k: base.model.state_dict()[k].detach().clone() for k in keys}
    equivalence = st.check_equivalence(hub, base, cases["3 x attention r32"]["names"], pristine)
    log(f"equivalence: {equivalence}")
    out = {}
    for case, impls in plan.items():
        names = cases[case]["names"]
        host_loop = cases[case]["host_loop"] = {}
        for temp in (st.COLD, st.WARM):
            kept = {impl: st.Stacker(hub, impl, base, names) for impl in impls} if temp == st.WARM else {}
            raw = {impl: [] for impl in impls}
            # ComfyUI's loop with a zero patch takes its turn in the alternation like an implementation: the
            # first touch of its fresh weight copies depends on what the allocator holds at that moment
            # (0.095-0.246 s between runs when it was measured once per case, before the stacks)
            loop_s = []
            for impl in impls:  # warm-up
                st.cycle(hub, impl, base, names, rep=-1, stacker=kept.get(impl))
            st.host_loop_seconds(hub, base, cases[case]["keys"], reps=1)  # its warm-up too: like with like
            turns = [*impls, st.HOST_LOOP]
            for rep in range(args.reps):
                for impl in turns[rep % len(turns):] + turns[:rep % len(turns)]:
                    gate()
                    if impl == st.HOST_LOOP:
                        loop_s.append(st.host_loop_seconds(hub, base, cases[case]["keys"], reps=1))
                    else:
                        raw[impl].append(st.cycle(hub, impl, base, names, rep, stacker=kept.get(impl)))
                log(f"{case}, {temp} rep {rep + 1}/{args.reps}: " + ", ".join(
                    f"{impl.split(' ')[0]}{'/' + impl.split('(')[-1][:-1] if '(' in impl else ''} "
                    f"{raw[impl][-1]['apply']['total']:.2f}+{raw[impl][-1]['strength']['total']:.2f}s"
                    for impl in impls) + f", ComfyUI's loop with a zero patch {loop_s[-1]:.3f}s")
            host_loop[temp] = measure.stats(loop_s)
            key = f"{case}, {temp}"
            out[key] = {impl: {phase: {metric: measure.stats([r[phase][metric] for r in runs])
                                       for metric in runs[0][phase]}
                               for phase in runs[0]}
                        for impl, runs in raw.items()}
            for impl in impls:  # memory: one more cycle each, freed heap handed back to the OS first
                mem = st.cycle(hub, impl, base, names, args.reps, trim=True, stacker=kept.get(impl))
                out[key][impl]["memory"] = {"apply_peak_rss": mem["apply"]["peak_rss"],
                                            "strength_peak_rss": mem["strength"]["peak_rss"]}
            kept.clear()
    return out, equivalence


def _notes(results: dict, trn) -> list[str]:
    notes = [
        "Timings are wall-clock medians (min in brackets); ComfyUI writes LoRAs into the weights inside "
        "comfy.model_management.load_models_gpu, so 'patch' is that call and 'node' the node chain's execute.",
        "The machine is shared with other engineers' test runs: CPU pressure is recorded above; ratios are taken "
        "between runs measured back to back (ours and core alternate every repetition) to cancel most of it.",
        "LoRAs: synthetic kohya files (diffusers module names, fp16 factors, rank 32, alpha 16, both factors "
        "non-zero); 'attention' = the 128 to_q/to_k/to_v/to_out linears, 'typical' = those plus ff.net.0.proj, "
        "ff.net.2 and the 1x1-conv proj_in/proj_out (192 layers).",
        "StackLoRA runs at its widget defaults (the per-LoRA range on; budget and layer cap off) and its node "
        "time includes the interference analysis (pair cosines, heatmap) a user always gets.",
        "Host floor = ComfyUI's own patch loop with a patch that changes nothing (its weight copies and books), "
        "measured in every repetition in turn with the implementations, plus the LoRA products at the best "
        "GEMM rate: what any LoRA node pays inside ComfyUI's model management.",
        "Floor = max(FLOPs / best measured GEMM rate, bytes / best measured copy bandwidth) with FLOPs = "
        "2 x out x in x R per patched layer (R = total rank of the stack) and bytes = read + write of each patched "
        "weight in fp32.",
    ]
    if "train" in results:
        t = results["train"]
        notes.append(
            f"Training model: reduced-depth SD1.5 layout ({t['model_params'] / 1e6:.1f} M parameters: 320 channels, "
            "1 res block + transformer down, middle block, 2 up; SD1.5's attention and feed-forward sizes), "
            "32x32 latents, batch 1, rank 8, fp32, gradient checkpointing, AdamW. Ours trains the attention "
            f"linears ({t['results'][trn.OURS]['trainable_params']:,} parameters); core's TrainLoraNode has no "
            f"target option and trains every layer incl. convs, norms and bias diffs "
            f"({t['results'][trn.CORE]['trainable_params']:,} parameters), at its own defaults otherwise "
            "(MSE loss, lr 5e-4). Ours runs the training half of LW_TrainLoRA (its bridge functions and "
            "lora_core.training.train); the node's one-off image/caption encoding, weight hashing and save "
            "are left out.")
    if "merge" in results:
        notes.append("Merge: the dense baseline's whole-LoRA time is estimated from one layer of each distinct "
                     "shape (median of the repetitions) times the number of layers of that shape; a dense SVD of "
                     "all 128 layers takes minutes on 2 cores.")
    if results.get("quick"):
        notes.append("Quick run: fewer repetitions and sections; not the figures to quote.")
    return notes


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
