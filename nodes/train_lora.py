"""LW_TrainLoRA: train a new LoRA inside ComfyUI from 10-50 captioned images."""
from __future__ import annotations

import hashlib
import json
import os
import time

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..lora_core import LoRAError, plan_layers
from ..lora_core.export import build_metadata, save_lora
from ..lora_core.plots import render_loss_curve
from ..lora_core.training import (
    ATTENTION,
    OPTIMIZERS,
    PRESETS,
    SCHEDULES,
    TrainHooks,
    TrainingDiverged,
    TrainSettings,
    train,
)
from ..lora_core.training.state_io import STATE_SUFFIX, load_optimizer_state, save_optimizer_state
from ..lora_core.version import __version__ as PACK_VERSION
from .comfy_bridge import MERGE, apply_layers, match_on_host, model_family
from .input_checks import check_inputs
from .lora_files import load_named_lora, lora_names, lora_path, output_path
from .lw_types import LW_LORA
from .train_bridge import (
    attach_trainable,
    denoiser,
    encode_dataset,
    image_sha256,
    layers_to_lora,
    load_for_training,
    load_layers,
    noise_model_of,
    prepare_images,
    split_captions,
    unload,
    weights_sha256,
)
from .train_preview import render_samples, send_progress

NONE = "None"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_TrainLoRA",
            display_name="Train LoRA (Workbench)",
            category="LoRA Workbench/train",
            description="Trains a LoRA on the attention layers from captioned images (frozen base, A random, "
                        "B zero), with live loss, previews and atomic saves a kohya-format file every tool loads.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model to train on (it is not changed)."),
                io.Clip.Input("clip", tooltip="Encodes the captions, once per run."),
                io.Vae.Input("vae", tooltip="Encodes the images, once per run."),
                io.Image.Input("images", tooltip="Training images: one batch or several (10-50 images is typical)."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line in image order, or a single line for all images."),
                io.String.Input("trigger_word", default="", tooltip="Put before every caption, e.g. 'sks style'. "
                                "Saved in the file as its trigger phrase."),
                io.String.Input("output_name", default="my_lora",
                                tooltip="File name under models/loras (.safetensors added). Sub-folders allowed."),
                io.String.Input("scope", multiline=True, default="",
                                tooltip="What this adapter owns: one style, one character or one product. Stored "
                                        "in the file and shown by Load LoRA."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank r: 4-16 for a style or face, "
                             "32+ for complex subjects. Larger files learn more and overfit sooner."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=1.0,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank."),
                io.Combo.Input("targets", options=PRESETS, default=ATTENTION,
                               tooltip="attention: to_q/to_k/to_v/to_out (DiT: qkv/proj). attention + feed-forward "
                                       "learns more, with a bigger file."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="1e-4 is a safe start for AdamW."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step (same bucket)."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=64,
                             tooltip="Steps of gradients summed before each optimizer step (a bigger batch "
                                     "without more memory)."),
                io.Combo.Input("optimizer", options=OPTIMIZERS, default="adamw", tooltip="AdamW is the standard."),
                io.Combo.Input("lr_schedule", options=SCHEDULES, default="cosine",
                               tooltip="cosine decays to 0 by the last step; constant keeps the rate."),
                io.Int.Input("warmup_steps", default=0, min=0, max=10000, tooltip="Linear warm-up steps."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Same seed, same LoRA (on CPU)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training resolution (side of a square bucket)."),
                io.Boolean.Input("bucketing", default=True, tooltip="Aspect-ratio buckets: images of any size "
                                 "are resized and cropped to the nearest bucket. Off: all images must share a size."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0.05-0.1 helps learn very dark or bright images."),
                io.Float.Input("min_snr_gamma", default=5.0, min=0.0, max=50.0, step=0.5,
                               tooltip="Min-SNR loss weighting (5 is the paper's choice); 0 turns it off."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, ~30% slower."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="float32",
                               tooltip="bfloat16 on modern GPUs is faster and leaner; float32 on CPU."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save name-000500.safetensors every N steps (0: only at the end)."),
                io.String.Input("sample_prompt", default="", tooltip="Optional: render this prompt every "
                                "sample_every steps to watch the LoRA learn."),
                io.Int.Input("sample_every", default=0, min=0, max=100000, tooltip="0: no samples."),
                io.Combo.Input("resume_from", options=[NONE] + lora_names(), default=NONE,
                               tooltip="Continue a run saved by this node (weights and optimizer state)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The base model with the new LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder (not trained; passed through)."),
                LW_LORA.Output(display_name="LORA", tooltip="The new LoRA, for Stack LoRA or Merge LoRA."),
                io.Image.Output(display_name="loss", tooltip="The loss curve."),
                io.Image.Output(display_name="samples", tooltip="Sample renders during training (if asked)."),
                io.String.Output(display_name="file", tooltip="The saved file's name under models/loras."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, **inputs):
        check_inputs(cls, inputs)  # every number finite and in its declared range, before any work
        args = {k: (v if k == "images" else v[0]) for k, v in inputs.items()}
        with torch.inference_mode(False), torch.enable_grad():
            return _run(args, cls.hidden.unique_id if cls.hidden else None)


def _settings(a: dict, start_step: int) -> TrainSettings:
    return TrainSettings(steps=a["steps"], learning_rate=a["learning_rate"], batch_size=a["batch_size"],
                         grad_accumulation=a["grad_accumulation"], optimizer=a["optimizer"],
                         lr_schedule=a["lr_schedule"], warmup_steps=min(a["warmup_steps"], a["steps"]),
                         seed=a["seed"], noise_offset=a["noise_offset"], min_snr_gamma=a["min_snr_gamma"])


def _run(a: dict, node_id):
    name = a["output_name"].strip().removesuffix(".safetensors")
    if not name:
        raise LoRAError("Train LoRA: give an output_name.")
    final_path = output_path(name)  # refuses names that leave the loras folder, before any work
    alpha = a["alpha"] or float(a["rank"])
    captions = split_captions(a["captions"], a["trigger_word"], sum(img.shape[0] for img in a["images"]))
    images = prepare_images(a["images"], a["resolution"], a["bucketing"])
    model, clip, vae = a["model"], a["clip"], a["vae"]
    samples = encode_dataset(model, clip, vae, images, captions)

    trainer, layers = attach_trainable(model, a["targets"], a["rank"], alpha, a["seed"], "kaiming",
                                       a["gradient_checkpointing"])
    start_step, optimizer_state = 0, None
    if a["resume_from"] != NONE:
        load_layers(layers, load_named_lora(a["resume_from"]))
        state_path = lora_path(a["resume_from"]) + STATE_SUFFIX
        if os.path.exists(state_path):
            optimizer_state, start_step = load_optimizer_state(state_path)
    settings = _settings(a, start_step)
    params = [p for layer in layers.values() for p in layer.parameters()]
    provenance = {"base_model_sha256": weights_sha256(model), "images_sha256": [image_sha256(i) for i in images],
                  "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
                  "settings": {k: v for k, v in a.items() if k not in ("model", "clip", "vae", "images")},
                  "pack_version": PACK_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    family = model_family(model)
    saved: dict = {"last_good": None}
    previews: list[torch.Tensor] = []
    losses: list[float] = []
    began = time.perf_counter()

    def save(path: str, step: int, partial: bool, optimizer=None) -> None:
        lora = layers_to_lora(layers, os.path.basename(path))
        meta = build_metadata(title=name, base_family=family, rank=a["rank"], alpha=alpha, scope=a["scope"],
                              provenance=provenance, trigger_words=[a["trigger_word"]] if a["trigger_word"] else (),
                              training={"steps": step, "learning_rate": a["learning_rate"], "images": len(images),
                                        "resolution": a["resolution"]},
                              extra={"lw.steps": str(step), "lw.partial": str(partial).lower()})
        save_lora(path, lora, meta)
        if optimizer is not None:
            save_optimizer_state(path + STATE_SUFFIX, optimizer, step)
        saved["last_good"] = os.path.basename(path)

    optimizer_box: dict = {}

    def on_step(step: int, loss: float, lr: float) -> None:
        losses.append(loss)
        elapsed = time.perf_counter() - began
        done = step - start_step
        eta = elapsed / max(done, 1) * (settings.steps - step)
        send_progress(node_id, step, settings.steps, loss, lr, eta)
        if a["sample_every"] and a["sample_prompt"] and step % a["sample_every"] == 0:
            previews.append(render_samples(trainer, clip, vae, a["sample_prompt"], a["seed"], images[0].shape))
            send_progress(node_id, step, settings.steps, loss, lr, eta, preview=previews[-1])

    def checkpoint(step: int) -> None:
        save(output_path(f"{name}-{step:06d}"), step, partial=False)

    hooks = TrainHooks(on_step=on_step, should_stop=mm.processing_interrupted, on_checkpoint=checkpoint,
                       checkpoint_every=a["save_every"])
    dtype = DTYPES[a["training_dtype"]]
    try:
        device = load_for_training(trainer)
        denoise = denoiser(trainer)
        if dtype != torch.float32:
            plain = denoise

            def denoise(x, s, c):  # autocast the base model; LoRA parameters stay fp32
                with torch.autocast(device.type, dtype=dtype):
                    return plain(x, s, c).float()
        result, optimizer = train(denoise, samples, params, noise_model_of(trainer), settings, hooks, device,
                                  start_step=start_step, optimizer_state=optimizer_state)
        optimizer_box["opt"] = optimizer
    except TrainingDiverged as e:
        kept = f" The last good save is {saved['last_good']}." if saved["last_good"] else " Nothing was saved."
        raise LoRAError(f"{e}{kept}") from e
    finally:
        unload(trainer)

    steps_done = max(result.steps_done, start_step)
    save(final_path, steps_done, partial=result.stopped_early, optimizer=optimizer_box.get("opt"))
    file_name = os.path.relpath(final_path, os.path.dirname(output_path("x")))
    if result.stopped_early:  # cancel: what was learned is saved (marked partial); tell ComfyUI it stopped
        raise mm.InterruptProcessingException()

    lora = layers_to_lora(layers, file_name)
    lora.metadata = {"lw.scope": a["scope"], "modelspec.trigger_phrase": a["trigger_word"]}
    match = match_on_host(lora, model, None)
    new_model, _, _ = apply_layers(model, None, plan_layers([(match, 1.0, 0.0)]), [], MERGE)
    loss_image = render_loss_curve(losses or [float("nan")], title=f"loss: {file_name}")
    sample_image = torch.cat(previews) if previews else torch.zeros(1, 64, 64, 3)
    summary = {"file": file_name, "steps": steps_done, "seconds": round(result.seconds, 2),
               "final_loss": losses[-1] if losses else None}
    return io.NodeOutput(new_model, clip, lora, loss_image, sample_image, file_name,
                         ui={"lw_train": [json.dumps(summary)], "lw_loss": losses})
