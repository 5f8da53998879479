"""Train LoRA's optimizer list in a real ComfyUI: only what the host can run, the tooltip says why the others
are missing, and a short run with Prodigy (prodigyopt, a test requirement) saves a LoRA."""
import json

import pytest
import torch
from safetensors import safe_open

from lora_fixtures import SD15


def _schema(comfy_host):
    schema = comfy_host.pack.nodes.train_lora.TrainLoRA.define_schema()
    return next(i for i in schema.inputs if i.id == "optimizer")


def test_the_node_lists_what_this_host_can_run(comfy_host):
    optimizer = _schema(comfy_host)
    from lora_core.training import optimizer_support
    support = optimizer_support()
    assert optimizer.options == [name for name, why in support.items() if why is None]
    assert optimizer.options[:3] == ["adamw", "adam", "sgd"] and optimizer.default == "adamw"
    for name, why in support.items():
        if why is not None:
            assert f"{name}: {why}" in optimizer.tooltip
    if not torch.cuda.is_available():
        assert "adamw8bit" not in optimizer.options


def test_a_short_prodigy_run_saves_a_lora(comfy_host):
    pytest.importorskip("prodigyopt", reason="prodigyopt is a test requirement (scripts/comfy_host.py)")
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "captions": "a stripe",
              "trigger_word": "lwprodigy", "output_name": "prodigy_run", "scope": "", "rank": 4, "alpha": 0.0,
              "targets": "attention", "steps": 4, "learning_rate": 1e-4, "batch_size": 2, "grad_accumulation": 1,
              "optimizer": "prodigy", "lr_schedule": "cosine", "warmup_steps": 1, "seed": 3, "resolution": 64,
              "bucketing": True, "noise_offset": 0.0, "min_snr_gamma": 5.0, "gradient_checkpointing": False,
              "training_dtype": "float32", "save_every": 0, "sample_prompt": "", "sample_every": 0,
              "resume_from": "None"}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
              "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2,
                                                           "color": 0x993366}},
              "3": {"class_type": "LW_TrainLoRA", "inputs": inputs}}
    out = comfy_host.run(prompt, outputs=["3"])["3"]
    assert out.output(5) == "prodigy_run.safetensors" and len(out.ui["lw_loss"]) == 4
    with safe_open(str(comfy_host.loras_dir / "prodigy_run.safetensors"), "pt") as f:
        provenance = json.loads(f.metadata()["lw.provenance"])
    assert provenance["settings"]["optimizer"] == "prodigy"
    assert (comfy_host.loras_dir / "prodigy_run.safetensors.lwstate").is_file()  # resumable
