"""Cancel in a started server: POST /interrupt while Train LoRA runs 1000 steps. ComfyUI marks the
prompt interrupted, and the partial LoRA (weights, lw.partial, steps done) and its optimizer state
are on disk; Load LoRA then reads the partial file in the next prompt."""
import time
import urllib.request

from safetensors import safe_open

SD15 = "lw_tiny_sd15.safetensors"
NAME = "http_cancelled"


def _train_prompt(steps: int) -> dict:
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
              "captions": "a photo of a lighthouse", "trigger_word": "lwtest", "output_name": NAME, "scope": "",
              "rank": 4, "alpha": 0.0, "targets": "attention", "steps": steps, "learning_rate": 1e-3,
              "batch_size": 1, "grad_accumulation": 1, "optimizer": "adamw", "lr_schedule": "constant",
              "warmup_steps": 0, "seed": 3, "resolution": 64, "bucketing": True, "noise_offset": 0.0,
              "min_snr_gamma": 5.0, "gradient_checkpointing": True, "training_dtype": "float32",
              "save_every": 1, "sample_prompt": "", "sample_every": 0, "resume_from": "None"}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x336699}},
            "3": {"class_type": "LW_TrainLoRA", "inputs": inputs}}


def _history(comfy_http, prompt_id, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = comfy_http.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry:
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} still running after {timeout} s")


def test_interrupt_during_training_keeps_a_partial_file_load_lora_reads(comfy_http, loras_dir):
    prompt_id = comfy_http.queue_prompt(_train_prompt(steps=1000))
    third = loras_dir / f"{NAME}-000003.safetensors"  # save_every=1: step 3 is done once this exists
    deadline = time.monotonic() + 120
    while not third.exists():
        assert time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.05)
    request = urllib.request.Request(comfy_http.url + "/interrupt", data=b"{}", method="POST")
    assert urllib.request.urlopen(request, timeout=10).status == 200  # the queue's Cancel button
    entry = _history(comfy_http, prompt_id)
    status = entry["status"]
    assert status["status_str"] == "error"
    assert "execution_interrupted" in [message[0] for message in status["messages"]]

    final = loras_dir / f"{NAME}.safetensors"
    with safe_open(str(final), "pt") as f:
        meta, ups = f.metadata(), [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    steps = int(meta["lw.steps"])
    assert meta["lw.partial"] == "true" and 3 <= steps < 1000
    assert any(float(up.abs().sum()) > 0 for up in ups)  # what was learned, not the zero init
    assert (loras_dir / f"{NAME}.safetensors.lwstate").is_file()
    print(f"interrupted after step {steps}; partial file {final.stat().st_size} bytes")

    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
            "2": {"class_type": "LW_LoadLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": final.name, "strength_model": 1.0,
                                                          "strength_clip": 1.0, "mode": "merge"}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}}}
    report = comfy_http.run_prompt(load)["outputs"]["3"]["text"][0]
    assert "model: 56 matched, 0 unmatched" in report
