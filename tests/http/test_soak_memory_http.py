"""Soak: a few dozen mixed prompts of ours (Load LoRA strengths, merge/bypass switches, Stack LoRA toggles,
a Merge LoRA into a stack) against the started server, and as many core LoraLoader prompts; the server's
resident memory may not grow more with ours than with core's loader, plus a stated margin."""
import os
import time
from pathlib import Path

SD15 = "lw_tiny_sd15.safetensors"
LORAS = ["lw_demo_a.safetensors", "lw_demo_b.safetensors", "lw_demo_c.safetensors"]
PROMPTS = int(os.environ.get("LW_SOAK_PROMPTS", 24))  # measured prompts per side (more: a longer soak)
WARM_UP = 8           # per side, before measuring: one-time allocations (model load, first use of each path)
MARGIN_MIB = 16.0     # ours may grow at most this much more than core (measured: 3-5 MiB more over 24 prompts)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _sampled(model, clip, i: int) -> dict:
    return {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a red fox {i % 3}", "clip": clip}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": model, "seed": i, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["5", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def _ckpt() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}


def _strength(i: int) -> float:
    return round(0.3 + 0.05 * (i % 13), 2)  # a new value each prompt, so nothing is served from the cache


def core_prompt(i: int) -> dict:
    lora = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORAS[i % 3],
                                                   "strength_model": _strength(i), "strength_clip": _strength(i)}}
    return _ckpt() | {"2": lora} | _sampled(["2", 0], ["2", 1], i)


def _rows(i: int, count: int = 3) -> dict:
    rows = {}
    for r in range(1, count + 1):
        rows |= {f"lora_{r}": LORAS[r - 1], f"on_{r}": bool((i >> (r - 1)) & 1) or r == 1,
                 f"strength_model_{r}": _strength(i + r), f"strength_clip_{r}": _strength(i + r)}
    return rows


def _stack(model, clip, i: int, rows: dict) -> dict:
    return {"class_type": "LW_StackLoRA", "inputs": {
        "model": model, "clip": clip, "mode": ("merge", "bypass")[i % 2], "clamp_weights": True,
        "weight_min": -1.0, "weight_max": 1.0, "use_budget": True, "budget": 1.5, "use_layer_cap": i % 3 != 0,
        "layer_cap": 0.1, "decorrelate": i % 5 == 0} | rows}


def our_prompt(i: int) -> dict:
    """Four shapes in turn: Load LoRA merge, Load LoRA bypass, Stack LoRA with toggled rows, and Load LoRA
    into a Stack LoRA whose first row is a Merge LoRA result."""
    kind = i % 4
    prompt = _ckpt()
    if kind in (0, 1):
        prompt["2"] = {"class_type": "LW_LoadLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": LORAS[i % 3], "strength_model": _strength(i),
            "strength_clip": _strength(i), "mode": ("merge", "bypass")[kind]}}
        return prompt | _sampled(["2", 0], ["2", 1], i)
    if kind == 2:
        prompt["3"] = _stack(["1", 0], ["1", 1], i // 4, _rows(i // 4 + 1))
        return prompt | _sampled(["3", 0], ["3", 1], i)
    prompt["2"] = {"class_type": "LW_LoadLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": LORAS[2], "strength_model": _strength(i),
        "strength_clip": 0.5, "mode": ("bypass", "merge")[(i // 4) % 2]}}
    prompt["4"] = {"class_type": "LW_MergeLoRA", "inputs": {
        "method": ("concat", "svd")[(i // 4) % 2], "target_rank": 4, "rank_mode": "fixed", "energy": 0.95,
        "density": 0.5, "seed": 0, "output_name": "", "scope": "", "lora_1": LORAS[0], "on_1": True,
        "strength_model_1": _strength(i), "strength_clip_1": 1.0, "lora_2": LORAS[1], "on_2": True,
        "strength_model_2": 0.5, "strength_clip_2": 0.5}}
    rows = {"lora_1_in": ["4", 0], "on_1": True, "strength_model_1": 0.6, "strength_clip_1": 0.6}
    prompt["3"] = _stack(["2", 0], ["2", 1], i // 4, rows)
    return prompt | _sampled(["3", 0], ["3", 1], i)


def _run_all(comfy_http, prompts) -> None:
    for prompt in prompts:
        entry = comfy_http.run_prompt(prompt, timeout=120)
        assert entry["status"]["status_str"] == "success"


def test_soak_memory_growth_is_no_more_than_core_loraloaders(comfy_http, comfy_server_process):
    pid = comfy_server_process.pid
    started = time.monotonic()
    _run_all(comfy_http, [f(i) for i in range(WARM_UP) for f in (core_prompt, our_prompt)])
    base = _rss_mib(pid)
    _run_all(comfy_http, [core_prompt(i) for i in range(WARM_UP, WARM_UP + PROMPTS)])
    after_core = _rss_mib(pid)
    half = WARM_UP + PROMPTS // 2
    _run_all(comfy_http, [our_prompt(i) for i in range(WARM_UP, half)])
    mid_ours = _rss_mib(pid)
    _run_all(comfy_http, [our_prompt(i) for i in range(half, WARM_UP + PROMPTS)])
    after_ours = _rss_mib(pid)
    core_growth, our_growth = after_core - base, after_ours - after_core
    print(f"\nsoak, {PROMPTS} prompts each after {WARM_UP} + {WARM_UP} warm-up "
          f"({time.monotonic() - started:.1f} s): server RSS {base:.1f} MiB -> core LoraLoader "
          f"{after_core:.1f} MiB (growth {core_growth:+.1f} MiB) -> ours {after_ours:.1f} MiB "
          f"(growth {our_growth:+.1f} MiB: {mid_ours - after_core:+.1f} in the first half, "
          f"{after_ours - mid_ours:+.1f} in the second); allowed: core's growth + {MARGIN_MIB:.0f} MiB")
    assert our_growth <= max(core_growth, 0.0) + MARGIN_MIB, (
        f"ours grew the server by {our_growth:.1f} MiB over {PROMPTS} prompts, core's LoraLoader by "
        f"{core_growth:.1f} MiB (margin {MARGIN_MIB} MiB)")
