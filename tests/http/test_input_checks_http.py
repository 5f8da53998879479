"""NaN and inf sent to every LW node over HTTP (raw JSON with NaN / Infinity literals, as a hand-written or
scripted prompt may carry them): each is refused with an error naming the node's input and the value, in
/history (our check, at the start of execute) or in /prompt's validation answer (ComfyUI's min/max check,
which catches inf but lets NaN through). The server then runs a good prompt exactly as before."""
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from safetensors.torch import load as load_safetensors

SD15 = "lw_tiny_sd15.safetensors"
LORA = "lw_demo_style.safetensors"  # tests/host_fixture/demo_lora.py, in the install's models/loras
LORA_B = "lw_demo_a.safetensors"
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- prompts

def _sampled(model, clip, prefix: str) -> dict:
    """Text encode, 2 euler steps on a 64x64 latent, SaveLatent (node "s8")."""
    return {
        "s5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": clip}},
        "s6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "s7": {"class_type": "KSampler", "inputs": {"model": model, "seed": 5, "steps": 2, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "positive": ["s5", 0], "negative": ["s5", 0],
                                                    "latent_image": ["s6", 0], "denoise": 1.0}},
        "s8": {"class_type": "SaveLatent", "inputs": {"samples": ["s7", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def _ckpt() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}


def load_prompt(**inputs) -> dict:
    values = {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 0.8,
              "strength_clip": 0.8, "mode": "bypass"} | inputs
    return _ckpt() | {"2": {"class_type": "LW_LoadLoRA", "inputs": values}} | _sampled(["2", 0], ["2", 1], "lw_chk")


def linked_float(value: float, **inputs) -> dict:
    """Load LoRA's strength_model from a core Float node: ComfyUI validates the Float node's widget
    (NaN passes, 50 is inside its range) but never a linked value."""
    prompt = load_prompt(strength_model=["f", 0], **inputs)
    prompt["f"] = {"class_type": "PrimitiveFloat", "inputs": {"value": value}}
    return prompt


def stack_inputs(**inputs) -> dict:
    return {"model": ["1", 0], "clip": ["1", 1], "mode": "merge", "clamp_weights": True, "weight_min": -1.0,
            "weight_max": 1.0, "use_budget": True, "budget": 1.5, "use_layer_cap": True, "layer_cap": 0.1,
            "decorrelate": False, "lora_1": LORA, "on_1": True, "strength_model_1": 0.5,
            "strength_clip_1": 0.5} | inputs


def stack_prompt(**inputs) -> dict:
    return _ckpt() | {"3": {"class_type": "LW_StackLoRA", "inputs": stack_inputs(**inputs)}} | _sampled(
        ["3", 0], ["3", 1], "lw_chk_stack")


def merge_inputs(**inputs) -> dict:
    return {"method": "svd", "target_rank": 4, "rank_mode": "fixed", "energy": 0.95, "density": 0.5, "seed": 0,
            "output_name": "", "scope": "", "lora_1": LORA_B, "on_1": True, "strength_model_1": 1.0,
            "strength_clip_1": 1.0} | inputs


def merge_prompt(**inputs) -> dict:
    return {"4": {"class_type": "LW_MergeLoRA", "inputs": merge_inputs(**inputs)}}


def train_prompt(**inputs) -> dict:
    values = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["i", 0], "captions": "a square",
              "trigger_word": "", "output_name": "lw_input_checks_never_written", "scope": "", "rank": 2,
              "alpha": 0.0, "targets": "attention", "steps": 2, "learning_rate": 1e-3, "batch_size": 1,
              "grad_accumulation": 1, "optimizer": "adamw", "lr_schedule": "constant", "warmup_steps": 0, "seed": 0,
              "resolution": 64, "bucketing": True, "noise_offset": 0.0, "min_snr_gamma": 5.0,
              "gradient_checkpointing": False, "training_dtype": "float32", "save_every": 0, "sample_prompt": "",
              "sample_every": 0, "resume_from": "None"} | inputs
    return _ckpt() | {
        "i": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "5": {"class_type": "LW_TrainLoRA", "inputs": values}}


def good_prompt() -> dict:
    """Load LoRA (bypass) -> Stack LoRA with a Merge LoRA result in row 1 -> sampler: three of our nodes."""
    prompt = _ckpt()
    prompt["2"] = {"class_type": "LW_LoadLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 0.8, "strength_clip": 0.8,
        "mode": "bypass"}}
    prompt["4"] = {"class_type": "LW_MergeLoRA", "inputs": merge_inputs()}
    stack = stack_inputs(model=["2", 0], clip=["2", 1], lora_1="None", lora_1_in=["4", 0], strength_model_1=0.7)
    prompt["3"] = {"class_type": "LW_StackLoRA", "inputs": stack}
    return prompt | _sampled(["3", 0], ["3", 1], "lw_chk_good")


# ---------------------------------------------------------------- HTTP

def submit(url: str, prompt: dict, timeout: float = 120) -> tuple[str, str, dict]:
    """Queue `prompt` as raw JSON text; ("rejected", validation answer, {}), ("failed", "node_type:
    exception message", entry) or ("success", "", entry)."""
    text = json.dumps({"prompt": prompt, "client_id": "lw-input-checks"})  # json.dumps writes NaN / Infinity
    request = urllib.request.Request(url + "/prompt", data=text.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as err:
        assert err.code == 400, err.code
        return "rejected", err.read().decode(), {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30) as response:
            entry = json.loads(response.read()).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"]["status_str"] == "success":
                return "success", "", entry
            errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
            assert errors, entry["status"]
            return "failed", f"{errors[0]['node_type']}: {errors[0]['exception_message']}", entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s")


def saved_latent(url: str, entry: dict) -> torch.Tensor:
    saved = entry["outputs"]["s8"]["latents"][0]
    query = urllib.parse.urlencode({k: saved[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=30) as response:
        return load_safetensors(response.read())["latent_tensor"]


def executed(entry: dict) -> set[str]:
    cached = {n for event, data in entry["status"]["messages"] if event == "execution_cached" for n in data["nodes"]}
    return set(entry["prompt"][2]) - cached


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def good_before(comfy_http):
    outcome, text, entry = submit(comfy_http.url, good_prompt())
    assert outcome == "success", text
    return saved_latent(comfy_http.url, entry)


def test_raw_prompt_text_carries_nan_and_infinity_literals():
    text = json.dumps({"prompt": load_prompt(strength_model=NAN, strength_clip=INF)})
    assert '"strength_model": NaN' in text and '"strength_clip": Infinity' in text


# (prompt, "failed": our check in /history, or "rejected": ComfyUI's validation answer, words it must name)
BAD = {
    "load: strength_model NaN": (lambda: load_prompt(strength_model=NAN), "failed",
                                 ["LW_LoadLoRA", "Load LoRA (Workbench)", "'strength_model'", "nan", "-10 to 10"]),
    "load: strength_clip NaN": (lambda: load_prompt(strength_clip=NAN), "failed", ["'strength_clip'", "nan"]),
    "load: strength_clip inf": (lambda: load_prompt(strength_clip=INF), "rejected", ["strength_clip", "inf"]),
    "load: strength_model -inf": (lambda: load_prompt(strength_model=-INF), "rejected", ["strength_model", "-inf"]),
    "load: linked NaN": (lambda: linked_float(NAN), "failed", ["'strength_model'", "nan"]),
    "load: linked 50 (out of range)": (lambda: linked_float(50.0), "failed", ["'strength_model'", "50.0", "-10 to 10"]),
    "stack: budget NaN": (lambda: stack_prompt(budget=NAN), "failed",
                          ["LW_StackLoRA", "Stack LoRA (Workbench)", "'budget'", "nan"]),
    "stack: weight_min NaN": (lambda: stack_prompt(weight_min=NAN), "failed", ["'weight_min'", "nan"]),
    "stack: weight_max NaN, clamp off": (lambda: stack_prompt(weight_max=NAN, clamp_weights=False), "failed",
                                         ["'weight_max'", "nan"]),
    "stack: layer_cap NaN, cap off": (lambda: stack_prompt(layer_cap=NAN, use_layer_cap=False), "failed",
                                      ["'layer_cap'", "nan"]),
    "stack: layer_cap inf": (lambda: stack_prompt(layer_cap=INF), "rejected", ["layer_cap", "inf"]),
    "stack: spectral_cap NaN, cap off": (lambda: stack_prompt(spectral_cap=NAN, use_spectral_cap=False), "failed",
                                         ["'spectral_cap'", "nan"]),
    "merge: density NaN": (lambda: merge_prompt(density=NAN), "failed",
                           ["LW_MergeLoRA", "Merge LoRA (Workbench)", "'density'", "nan"]),
    "merge: energy NaN": (lambda: merge_prompt(energy=NAN), "failed", ["'energy'", "nan"]),
    "merge: row weight NaN": (lambda: merge_prompt(strength_model_1=NAN), "failed", ["'strength_model_1'", "nan"]),
    "merge: off row weight NaN": (lambda: merge_prompt(strength_clip_1=NAN, on_1=False), "failed",
                                  ["'strength_clip_1'", "nan"]),
    "merge: energy inf": (lambda: merge_prompt(energy=INF), "rejected", ["energy", "inf"]),
    "merge: target_rank NaN": (lambda: merge_prompt(target_rank=NAN), "rejected", ["target_rank", "nan"]),
    "merge: seed inf": (lambda: merge_prompt(seed=INF), "rejected", ["seed", "inf"]),
    "train: learning_rate NaN": (lambda: train_prompt(learning_rate=NAN), "failed",
                                 ["LW_TrainLoRA", "Train LoRA (Workbench)", "'learning_rate'", "nan"]),
    "train: alpha NaN": (lambda: train_prompt(alpha=NAN), "failed", ["'alpha'", "nan"]),
    "train: min_snr_gamma NaN": (lambda: train_prompt(min_snr_gamma=NAN), "failed", ["'min_snr_gamma'", "nan"]),
    "train: noise_offset NaN": (lambda: train_prompt(noise_offset=NAN), "failed", ["'noise_offset'", "nan"]),
    "train: v_pred_like_loss NaN": (lambda: train_prompt(v_pred_like_loss=NAN), "failed",
                                    ["'v_pred_like_loss'", "nan"]),
    "train: preservation_weight NaN": (lambda: train_prompt(preserve_untriggered=True, preservation_weight=NAN),
                                       "failed", ["'preservation_weight'", "nan"]),
    "train: noise_offset inf": (lambda: train_prompt(noise_offset=INF), "rejected", ["noise_offset", "inf"]),
    "train: steps NaN": (lambda: train_prompt(steps=NAN), "rejected", ["steps", "nan"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_nan_and_inf_are_refused_naming_the_input(comfy_http, loras_dir, good_before, case):
    make, expected, words = BAD[case]
    started = time.monotonic()
    outcome, text, _ = submit(comfy_http.url, make())
    print(f"{case}: {outcome} in {time.monotonic() - started:.2f} s: {text[:200]}")
    assert outcome == expected, text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert not list(loras_dir.rglob("lw_input_checks_never_written*"))  # Train LoRA did no work


def test_every_numeric_input_of_every_node_is_covered(comfy_http):
    """Each LW node's FLOAT inputs get a NaN case above (INT inputs: ComfyUI refuses NaN itself)."""
    info = comfy_http.get_json("/object_info")
    named = {word.strip("'") for _, _, words in BAD.values() for word in words}
    for node in ("LW_LoadLoRA", "LW_StackLoRA", "LW_MergeLoRA", "LW_TrainLoRA"):
        spec = info[node]["input"]
        floats = {name for part in ("required", "optional") for name, s in spec.get(part, {}).items()
                  if s[0] == "FLOAT" and (not name[-1].isdigit() or name.endswith("_1"))}  # rows share row 1's code
        missing = floats - named
        if node == "LW_StackLoRA":  # its row strengths skip their row instead of failing: the next test
            missing -= {"strength_model_1", "strength_clip_1"}
        assert not missing, f"{node}: no NaN case for {sorted(missing)}"


def test_stack_row_with_nan_or_out_of_range_strength_is_skipped_and_reported(comfy_http, good_before):
    outcome, text, entry = submit(comfy_http.url, stack_prompt(strength_model_1=NAN, lora_2=LORA_B, on_2=True,
                                                               strength_model_2=0.5, strength_clip_2=0.5))
    assert outcome == "success", text
    report = entry["outputs"]["3"]["lw_report"][0]
    assert "SKIPPED row 1: strengths must be finite numbers, got nan / 0.5" in report
    assert "row 2: lw_demo_a.safetensors: model 0.5 -> 0.5" in report
    prompt = stack_prompt(strength_clip_1=["f", 0])
    prompt["f"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 50.0}}
    outcome, text, entry = submit(comfy_http.url, prompt)
    assert outcome == "success", text
    report = entry["outputs"]["3"]["lw_report"][0]
    assert "SKIPPED row 1: Stack LoRA (Workbench): input 'strength_clip_1' is 50.0; it must be a finite number " \
           "from -10 to 10." in report


def test_the_next_good_prompt_gives_the_same_latent_as_before(comfy_http, good_before):
    assert submit(comfy_http.url, load_prompt(strength_model=NAN))[0] == "failed"  # also evicts the cache
    outcome, text, entry = submit(comfy_http.url, good_prompt())
    assert outcome == "success", text
    assert {"2", "3", "4"} <= executed(entry), "our nodes were served from the cache, not run again"
    after = saved_latent(comfy_http.url, entry)
    assert after.shape == (1, 4, 8, 8) and torch.isfinite(after).all()
    assert torch.equal(after, good_before)
