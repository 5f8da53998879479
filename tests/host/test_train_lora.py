"""LW_TrainLoRA inside a real ComfyUI: the node end to end, its file, and that it really learns."""
import json

import pytest
import torch
from safetensors import safe_open

from autograd_probe import saved_tensor_bytes
from lora_fixtures import SD15, attention_targets, max_relative_error, patched_weights


def _train_prompt(name, steps=6, extra=None, captions="a photo of a lighthouse"):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "captions": captions,
              "trigger_word": "lwtest", "output_name": name, "scope": "one style: test stripes", "rank": 4,
              "alpha": 0.0, "targets": "attention", "steps": steps, "learning_rate": 1e-3, "batch_size": 2,
              "grad_accumulation": 1, "optimizer": "adamw", "lr_schedule": "cosine", "warmup_steps": 0, "seed": 3,
              "resolution": 64, "bucketing": True, "noise_offset": 0.05, "min_snr_gamma": 5.0,
              "gradient_checkpointing": True, "training_dtype": "float32", "save_every": 0, "sample_prompt": "",
              "sample_every": 0, "resume_from": "None"}
    inputs.update(extra or {})
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4, "color": 0x336699}},
        "3": {"class_type": "LW_TrainLoRA", "inputs": inputs},
    }


def test_train_node_saves_a_kohya_file_that_core_loads_to_the_same_weights(comfy_host):
    out = comfy_host.run(_train_prompt("trained/unit_test_lora"), outputs=["3"])["3"]
    model_out, _, lora, loss_image, _, file_name = (out.output(i) for i in range(6))
    assert file_name == "trained/unit_test_lora.safetensors"
    path = comfy_host.loras_dir / file_name
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["modelspec.trigger_phrase"] == "lwtest"
    assert meta["lw.scope"] == "one style: test stripes" and meta["ss_base_model_version"] == "sd_v1"
    provenance = json.loads(meta["lw.provenance"])
    assert len(provenance["base_model_sha256"]) == 64 and len(provenance["images_sha256"]) == 4
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in keys)
    assert len(keys) == 56 * 3
    assert loss_image.shape[-1] == 3 and out.ui["lw_loss"] and len(out.ui["lw_loss"]) == 6
    model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    core_model = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, file_name, 1.0)[0]
    targets = list(attention_targets(model))
    ours, theirs, base = patched_weights(model_out), patched_weights(core_model), patched_weights(model)
    assert max_relative_error(ours, theirs, targets) < 1e-5
    assert max_relative_error(ours, base, targets) > 1e-6  # six steps moved the weights


def test_same_seed_same_file_bit_for_bit(comfy_host):
    comfy_host.run(_train_prompt("det_a", steps=3), outputs=["3"])
    comfy_host.run(_train_prompt("det_b", steps=3), outputs=["3"])
    with safe_open(str(comfy_host.loras_dir / "det_a.safetensors"), "pt") as a, \
            safe_open(str(comfy_host.loras_dir / "det_b.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize("extra,message", [
    ({"output_name": "../escape"}, "names may not contain '..'"),
    ({"captions": "one\ntwo\nthree"}, "3 captions for 4 images"),
    ({"rank": 64}, "rank 64 does not fit layer"),
    ({"preserve_untriggered": True, "trigger_word": " "}, "preserve_untriggered trains each image without its trigger"),
])
def test_bad_input_is_a_clear_error(comfy_host, extra, message):
    from conftest import PromptError
    with pytest.raises(PromptError, match=message):
        comfy_host.run(_train_prompt("bad", steps=2, extra=extra), outputs=["3"])


@pytest.mark.parametrize("path", ["between steps", "inside a layer", "progress hook"])
def test_cancel_through_each_interrupt_path_saves_a_partial_file(comfy_host, monkeypatch, path):
    """ComfyUI delivers a cancel three ways: the loop's own check between steps, the check at the top of
    every op's forward (comfy/ops.py), and the progress-bar hook main.py installs. Each saves the
    partial LoRA (3 steps learned) and its optimizer state, then ComfyUI marks the prompt interrupted."""
    import comfy.model_management as mm
    import comfy.utils
    from server import PromptServer

    from conftest import PromptError
    seen = []
    name = f"cancelled_{path.replace(' ', '_')}"

    def cancel_at_step_3(event, data, sid=None):
        if event == "lw.train.progress":
            seen.append(data["step"])
            if data["step"] == 3 and path != "progress hook":
                mm.interrupt_current_processing(True)  # what ComfyUI's cancel button does
    monkeypatch.setattr(PromptServer.instance, "send_sync", cancel_at_step_3)
    if path == "inside a layer":  # the loop's check misses it: the next op's forward raises
        monkeypatch.setattr(comfy_host.pack.nodes.train_lora.mm, "processing_interrupted", lambda: False)
    if path == "progress hook":
        def hook(value, total, preview, prompt_id=None, node_id=None):  # as main.py's hijack_progress
            if value == 3:
                mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()
        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(PromptError):  # ComfyUI reports the prompt interrupted
            comfy_host.run(_train_prompt(name, steps=50), outputs=["3"])
    finally:
        mm.interrupt_current_processing(False)
    assert seen[-1] <= 3 and seen[:2] == [1, 2]
    with safe_open(str(comfy_host.loras_dir / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lw.partial"] == "true" and meta["lw.steps"] == "3"
    assert (comfy_host.loras_dir / f"{name}.safetensors.lwstate").is_file()


def test_save_every_and_resume_continue_the_same_run(comfy_host):
    comfy_host.run(_train_prompt("resumable", steps=4, extra={"save_every": 2}), outputs=["3"])
    assert (comfy_host.loras_dir / "resumable-000002.safetensors").is_file()
    assert (comfy_host.loras_dir / "resumable.safetensors.lwstate").is_file()
    resumed = comfy_host.run(_train_prompt("resumed", steps=6, extra={"resume_from": "resumable.safetensors"}),
                             outputs=["3"])["3"]
    assert len(resumed.ui["lw_loss"]) == 2  # steps 5 and 6 only
    with safe_open(str(comfy_host.loras_dir / "resumed.safetensors"), "pt") as f:
        assert f.metadata()["lw.steps"] == "6"


def test_only_lora_parameters_learn(comfy_host):
    pack = comfy_host.pack
    with torch.inference_mode():
        model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    bridge = pack.nodes.train_bridge
    with torch.inference_mode(False), torch.enable_grad():
        trainer, layers = bridge.attach_trainable(model, "attention", 4, 4.0, 0, "kaiming", checkpointing=True)
        try:
            bridge.load_for_training(trainer)
            x = torch.randn(1, 4, 8, 8)
            cond = {"c_crossattn": torch.randn(1, 77, 32)}
            bridge.denoiser(trainer)(x, torch.tensor([1.0]), cond).square().mean().backward()
            base = list(trainer.model.parameters())
            assert base and all(p.grad is None and not p.requires_grad for p in base)
            assert all(layer.down.grad is not None for layer in layers.values())
            assert len(layers) == 56
        finally:
            bridge.unload(trainer)


def test_training_shares_the_base_weights_instead_of_copying_them(comfy_host):
    """The checkpoint's weights are inference tensors; training swaps in non-inference aliases of the
    same storage (no second copy of the model), and unload puts the very originals back."""
    bridge = comfy_host.pack.nodes.train_bridge
    with torch.inference_mode():
        model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    import comfy.model_management as mm
    mm.unload_all_models()
    before = dict(model.model.diffusion_model.named_parameters())
    values = {k: v.clone() for k, v in before.items()}
    assert all(p.is_inference() for p in before.values())
    with torch.inference_mode(False), torch.enable_grad():
        trainer, _ = bridge.attach_trainable(model, "attention", 4, 4.0, 0, "kaiming", checkpointing=False)
        try:
            bridge.load_for_training(trainer)
            during = dict(trainer.model.diffusion_model.named_parameters())
            assert during.keys() == before.keys()
            assert all(not p.is_inference() and p.data_ptr() == before[k].data_ptr() for k, p in during.items())
            x = torch.randn(1, 4, 8, 8)
            bridge.denoiser(trainer)(x, torch.tensor([1.0]), {"c_crossattn": torch.randn(1, 77, 32)}).sum().backward()
        finally:
            bridge.unload(trainer)
    after = dict(model.model.diffusion_model.named_parameters())
    assert all(after[k].data_ptr() == before[k].data_ptr() and torch.equal(after[k], values[k]) for k in before)


def test_sample_prompt_renders_previews_while_training(comfy_host):
    out = comfy_host.run(_train_prompt("with_samples", steps=2, extra={"sample_prompt": "lwtest, a lighthouse",
                                                                      "sample_every": 1}), outputs=["3"])["3"]
    samples = out.output(4)
    assert samples.shape == (2, 64, 64, 3) and torch.isfinite(samples).all()
    assert samples.std() > 0  # a real render, not the empty placeholder


def test_gradient_checkpointing_lowers_saved_activation_memory(comfy_host):
    """Bytes autograd keeps for the backward pass of one training forward, with and without checkpointing."""
    bridge = comfy_host.pack.nodes.train_bridge
    with torch.inference_mode():
        model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    saved = {}
    for checkpointing in (False, True):
        with torch.inference_mode(False), torch.enable_grad():
            trainer, layers = bridge.attach_trainable(model, "attention", 4, 4.0, 0, "kaiming", checkpointing)
            try:
                bridge.load_for_training(trainer)
                x = torch.randn(2, 4, 16, 16)
                with saved_tensor_bytes() as total:
                    out = bridge.denoiser(trainer)(x, torch.tensor([1.0, 3.0]), {"c_crossattn": torch.randn(2, 77, 32)})
                out.square().mean().backward()
                saved[checkpointing] = total["bytes"]
            finally:
                bridge.unload(trainer)
    assert saved[True] < 0.5 * saved[False]


def test_base_model_hash_is_taken_once_per_unpatched_model(comfy_host, monkeypatch):
    bridge = comfy_host.pack.nodes.train_bridge
    with torch.inference_mode():
        model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    first = bridge.weights_sha256(model)
    reads = []
    real = type(model.model).state_dict
    monkeypatch.setattr(type(model.model), "state_dict", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    assert bridge.weights_sha256(model) == first and reads == []  # memoised: no weight read again
    patched = model.clone()
    patched.add_patches({next(iter(attention_targets(model))): bridge.AutogradSafeWeight(patched)}, 1.0)
    assert bridge.weights_sha256(patched) == first and reads  # a MODEL with patches is hashed afresh


def _dataset_folder(input_dir, name: str, captions: list[str]) -> list[str]:
    """A kohya-style folder of PNGs with .txt captions; the captions in the order the loader lists them."""
    import os

    from PIL import Image
    folder = input_dir / name
    folder.mkdir(exist_ok=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    listed = [f for f in os.listdir(folder) if f.endswith(".png")]  # LoadImageTextDataSetFromFolder's order
    return [captions[int(f[:2])] for f in listed]


def test_captions_from_a_dataset_loader_and_regularisation_images(comfy_host, host_dirs):
    """Core's Load Image and Text Dataset from Folder feeds one caption per image, and a second one the
    regularisation set (prior preservation): both are encoded, and the file records both sets."""
    import hashlib
    texts = _dataset_folder(host_dirs["input"], "lw_train_set", [f"a square number {i}" for i in range(4)])
    reg_texts = _dataset_folder(host_dirs["input"], "lw_reg_set", ["a circle", "a triangle", "a cross"])
    prompt = _train_prompt("trained/with_reg", steps=2, extra={
        "images": ["4", 0], "captions": ["4", 1], "reg_images": ["5", 0], "reg_captions": ["5", 1]})
    prompt["4"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "lw_train_set"}}
    prompt["5"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "lw_reg_set"}}
    comfy_host.run(prompt, outputs=["3"])
    with safe_open(str(comfy_host.loras_dir / "trained/with_reg.safetensors"), "pt") as f:
        provenance = json.loads(f.metadata()["lw.provenance"])
    assert provenance["captions_sha256"] == hashlib.sha256(
        "\n".join(f"lwtest, {t}" for t in texts).encode()).hexdigest()  # the trigger first, one caption per image
    assert len(provenance["images_sha256"]) == 4 and len(provenance["reg_images_sha256"]) == 3
    assert provenance["reg_captions_sha256"] == hashlib.sha256("\n".join(reg_texts).encode()).hexdigest()  # no trigger
    # a caption count that fits neither one-per-image nor one-for-all is refused before training
    prompt["3"]["inputs"]["reg_captions"] = "a circle\na triangle"
    with pytest.raises(Exception, match="2 captions for 3 regularisation images"):
        comfy_host.run(prompt, outputs=["3"])


def test_cross_attention_targets_train_only_the_layers_that_read_the_prompt(comfy_host):
    """targets 'cross-attention': the file holds attn2's four linears per transformer block and nothing of
    attn1, and core's loader applies it to the same weights as ours."""
    out = comfy_host.run(_train_prompt("trained/cross_attention", steps=3, extra={"targets": "cross-attention"}),
                         outputs=["3"])["3"]
    model_out, file_name = out.output(0), out.output(5)
    with safe_open(str(comfy_host.loras_dir / file_name), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    assert modules and all("_attn2_" in m for m in modules), sorted(modules)
    assert len(modules) == 56 // 2  # half of the attention linears (test above: 56 modules)
    model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    core_model = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, file_name, 1.0)[0]
    targets = [k for k in attention_targets(model) if ".attn2." in k]
    ours, theirs, base = patched_weights(model_out), patched_weights(core_model), patched_weights(model)
    assert max_relative_error(ours, theirs, targets) < 1e-5
    assert max_relative_error(ours, base, targets) > 1e-6
    untouched = [k for k in attention_targets(model) if ".attn1." in k]
    assert max_relative_error(ours, base, untouched) == 0.0


def test_cross_attention_targets_on_a_joint_attention_model_are_refused_before_training(comfy_host):
    from conftest import PromptError
    prompt = _train_prompt("refused", steps=2, extra={"targets": "cross-attention", "model": ["4", 0]})
    prompt["4"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "lw_tiny_flux.safetensors",
                                                          "weight_dtype": "default"}}
    with pytest.raises(PromptError, match="a Flux model has no separate cross-attention layers"):
        comfy_host.run(prompt, outputs=["3"])
    assert not (comfy_host.loras_dir / "refused.safetensors").exists()


@pytest.mark.parametrize("caption,trigger,expected", [
    ("lwtest, a photo of a lighthouse", "lwtest", "a photo of a lighthouse"),    # the node's own prefix
    ("a lwtest lighthouse, at dusk", "lwtest", "a lighthouse, at dusk"),         # the trigger inside a caption
    ("lwtest-2 and lwtest, lwtest", "lwtest", "lwtest-2 and"),                   # a longer word keeps its part
    ("a photo", "", "a photo"),                                                  # no trigger: unchanged
])
def test_the_untriggered_twin_caption_drops_only_the_trigger_word(comfy_host, caption, trigger, expected):
    assert comfy_host.pack.nodes.train_bridge.without_trigger(caption, trigger) == expected
