"""LW_TrainLoRA: train a new LoRA inside ComfyUI from 10-50 captioned images."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io

from ..lora_core import LoRA, LoRAError, plan_layers
from ..lora_core.formats import file_sha256
from ..lora_core.formats.export import build_metadata, kohya_prefix, save_lora
from ..lora_core.formats.metadata import SCOPE_KEY, TRIGGER_PHRASE_KEY
from ..lora_core.formats.safetensors_io import data_sha256
from ..lora_core.plots import render_loss_curve
from ..lora_core.training import (
    ATTENTION,
    PRESETS,
    SCHEDULES,
    TrainHooks,
    TrainingDiverged,
    TrainSettings,
    available_optimizers,
    base_outputs,
    make_optimizer,
    optimizer_tooltip,
    train,
)
from ..lora_core.training.state_io import STATE_SUFFIX, load_optimizer_state, save_optimizer_state
from ..lora_core.version import __version__ as PACK_VERSION
from .comfy_bridge import apply_layers, match_on_host, model_family
from .file_names import host_names, standard_names
from .input_checks import check_inputs
from .lora_files import load_named_lora, lora_names, lora_path, output_path
from .lw_types import LW_LORA, MERGE, NONE
from .train_bridge import (
    attach_trainable,
    build_samples,
    collate_host_conds,
    denoiser,
    encode_captions,
    encode_dataset,
    image_sha256,
    layers_to_lora,
    load_for_training,
    load_layers,
    noise_model_of,
    prepare_images,
    split_captions,
    training_context,
    training_targets,
    unload,
    weights_sha256,
    without_trigger,
)
from .train_preview import render_samples, send_progress

IMAGE_INPUTS = ("images", "reg_images")  # every batch ComfyUI passes is kept
CAPTION_INPUTS = ("captions", "reg_captions")  # a dataset loader's list: one caption per image
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
                                tooltip="One caption per line in image order, or a single line for all images. "
                                        "Connect a dataset loader's texts for one caption per image."),
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
                                       "learns more, with a bigger file. cross-attention: only the layers that read "
                                       "the prompt (attn2; UNets, Wan, LTX-Video), which touches prompts without "
                                       "the trigger less."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="1e-4 is a safe start for AdamW."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step (same bucket)."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=64,
                             tooltip="Steps of gradients summed before each optimizer step (a bigger batch "
                                     "without more memory)."),
                # Only what this host can run (Prodigy with prodigyopt, 8-bit AdamW with bitsandbytes on a GPU);
                # the tooltip says why an option is missing.
                io.Combo.Input("optimizer", options=available_optimizers(), default="adamw",
                               tooltip=optimizer_tooltip()),
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
                io.Image.Input("reg_images", optional=True,
                               tooltip="Regularisation (prior-preservation) images: what the base model should "
                                       "keep drawing, trained beside the images (no trigger word). Keeps the "
                                       "LoRA from bleeding into prompts without its trigger."),
                io.String.Input("reg_captions", optional=True, multiline=True, default="",
                                tooltip="Captions of the regularisation images: one per line, or a dataset "
                                        "loader's texts."),
                io.Float.Input("v_pred_like_loss", optional=True, default=0.0, min=0.0, max=10.0, step=0.1,
                               tooltip="kohya's option: adds this much of a v-prediction-like loss, which weights "
                                       "the noisiest steps (where shapes and layout are decided) more; 0 is off. "
                                       "Measured on the toy world it did not help a LoRA learn a new shape. "
                                       "Epsilon models (SD1.5, SDXL) only: v-prediction and flow models already "
                                       "weight those steps."),
                # New inputs go last: a saved workflow maps its widget values by position.
                io.Boolean.Input("preserve_untriggered", optional=True, default=False,
                                 tooltip="Output preservation (ai-toolkit's Differential Output Preservation): each "
                                         "image is also trained under its caption without the trigger word, at the "
                                         "same noise, toward what the base model itself predicts there. The LoRA "
                                         "learns to act only where its trigger word is: prompts without it keep "
                                         "what the base model draws, even without regularisation images. Needs a "
                                         "trigger word. A step costs up to 2.3x (each image trains twice, plus "
                                         "one forward of the base model)."),
                io.Float.Input("preservation_weight", optional=True, default=1.0, min=0.1, max=10.0, step=0.5,
                               tooltip="With preserve_untriggered: how much the untriggered twins weigh in the loss "
                                       "against the images themselves. Higher keeps prompts without the trigger "
                                       "closer to the base model and learns the concept more slowly (raise the "
                                       "learning rate with it). On the toy world 3.0 with cross-attention targets at "
                                       "learning rate 2.4e-2 drew the new shape in 77% of samples and changed "
                                       "none of the untriggered samples the base model draws right."),
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
        args = {k: _argument(k, v) for k, v in inputs.items()}
        with torch.inference_mode(False), torch.enable_grad():
            return _run(args, cls.hidden.unique_id if cls.hidden else None)


def _argument(name: str, values: list):
    """The node takes lists (is_input_list): image batches and caption lists stay lists."""
    if name in IMAGE_INPUTS or (name in CAPTION_INPUTS and len(values) > 1):
        return values
    return values[0]


def _settings(a: dict) -> TrainSettings:
    return TrainSettings(steps=a["steps"], learning_rate=a["learning_rate"], batch_size=a["batch_size"],
                         grad_accumulation=a["grad_accumulation"], optimizer=a["optimizer"],
                         lr_schedule=a["lr_schedule"], warmup_steps=min(a["warmup_steps"], a["steps"]),
                         seed=a["seed"], noise_offset=a["noise_offset"], min_snr_gamma=a["min_snr_gamma"],
                         v_pred_like_loss=a.get("v_pred_like_loss", 0.0),
                         preservation_weight=a.get("preservation_weight", 1.0))


def _run(a: dict, node_id):
    run = TrainingRun(a, node_id)
    samples = run.encode()
    run.train(samples)
    return run.outputs()


class TrainingRun:
    """One Train LoRA run: checks (before any work), encoding, training, saving, outputs.

    Everything a save needs is checked in __init__, so a finished run cannot die at its save; and
    however the run ends (done, cancelled through any of ComfyUI's interrupt paths, diverged), what
    was learned is written to disk.
    """

    def __init__(self, a: dict, node_id=None):
        self.a, self.node_id = a, node_id
        self.name = a["output_name"].strip().removesuffix(".safetensors")
        if not self.name:
            raise LoRAError("Train LoRA: give an output_name.")
        self.final_path = output_path(self.name)  # refuses names that leave the loras folder, before any work
        check_writable_folder(os.path.dirname(self.final_path))
        self.alpha = a["alpha"] or float(a["rank"])
        self.model = a["model"]
        self.family = model_family(self.model)
        self.targets = training_targets(self.model, a["targets"], self.family)  # none: refused now
        self.settings = _settings(a)
        self.settings.validate()
        if self.preserving and not a["trigger_word"].strip():
            raise LoRAError("Train LoRA: preserve_untriggered trains each image without its trigger word too; give "
                            "a trigger_word, or turn preserve_untriggered off.")
        self.start_step, self.optimizer_state = 0, None
        # Files name modules as the family's trainers do (SD1.x/SDXL: diffusers paths, kohya sd-scripts).
        self.file_names = standard_names(self.family, self.model)
        self.resume, resumed_from = None, None
        if a["resume_from"] != NONE:
            resume_file = lora_path(a["resume_from"])
            self.resume = _with_host_names(load_named_lora(a["resume_from"]), self.file_names)
            resumed_from = {"name": a["resume_from"], "sha256": file_sha256(resume_file),
                            "data_sha256": data_sha256(resume_file)}
            state_path = resume_file + STATE_SUFFIX
            if os.path.exists(state_path):
                self.optimizer_state, self.start_step = load_optimizer_state(state_path)
        self.images: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.layers: dict = {}
        self.losses: list[float] = []
        self.previews: list[torch.Tensor] = []
        self.last_good: str | None = None
        self.steps_done = self.start_step
        self.seconds = self.began = 0.0
        # No clock value: the same inputs give the same file, byte for byte.
        self.provenance = {"base_model_sha256": weights_sha256(self.model),
                           "settings": {k: v for k, v in a.items()
                                        if k not in ("model", "clip", "vae", "images", "reg_images")},
                           "pack_version": PACK_VERSION}
        if resumed_from:  # the parent, by its tensor data (renaming or re-tagging it keeps this) and its file
            self.provenance["resumed_from"] = resumed_from
        self._metadata(0, partial=False)  # metadata that cannot be built fails here, not after training

    # ------------------------------------------------------------ data
    def encode(self) -> list:
        a = self.a
        self.captions = split_captions(a["captions"], a["trigger_word"], sum(img.shape[0] for img in a["images"]))
        self.images = prepare_images(a["images"], a["resolution"], a["bucketing"])
        self.provenance["images_sha256"] = [image_sha256(i) for i in self.images]
        self.provenance["captions_sha256"] = hashlib.sha256("\n".join(self.captions).encode()).hexdigest()
        samples = encode_dataset(self.model, a["clip"], a["vae"], self.images, self.captions)
        self._pair_with_untriggered(samples)
        return samples + self._regularisation()

    def _pair_with_untriggered(self, samples: list) -> None:
        """Output preservation: each image also under its caption without the trigger word, trained in the
        same step toward the base model's own prediction, so the LoRA acts where the trigger word is."""
        a = self.a
        if not self.preserving:
            return
        plain = [without_trigger(c, a["trigger_word"]) for c in self.captions]
        by_caption = encode_captions(a["clip"], plain)
        for sample, twin in zip(samples, build_samples(self.model, [s.latent for s in samples],
                                                       [by_caption[c] for c in plain])):
            sample.twin = twin

    def _regularisation(self) -> list:
        """Prior preservation (as kohya's reg images): samples of what the base model should keep
        drawing, mixed into the batches with their own captions and no trigger word."""
        a = self.a
        reg = [img for img in a.get("reg_images") or [] if img is not None]
        if not reg:
            return []
        count = sum(img.shape[0] for img in reg)
        captions = split_captions(a.get("reg_captions", ""), "", count, "regularisation images")
        images = prepare_images(reg, a["resolution"], a["bucketing"])
        self.provenance["reg_images_sha256"] = [image_sha256(i) for i in images]
        self.provenance["reg_captions_sha256"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
        return encode_dataset(self.model, a["clip"], a["vae"], images, captions)

    @property
    def preserving(self) -> bool:
        return bool(self.a.get("preserve_untriggered"))

    # ------------------------------------------------------------ training
    def train(self, samples: list) -> None:
        a, settings = self.a, self.settings
        trainer, self.layers = attach_trainable(self.model, a["targets"], a["rank"], self.alpha, a["seed"], "kaiming",
                                                a["gradient_checkpointing"], self.family, self.targets)
        if self.resume is not None:
            load_layers(self.layers, self.resume)
        params = [p for layer in self.layers.values() for p in layer.parameters()]
        optimizer = make_optimizer(settings.optimizer, params, settings.learning_rate, settings.weight_decay)
        hooks = TrainHooks(on_step=lambda step, loss, lr: self._on_step(trainer, step, loss, lr),
                           should_stop=mm.processing_interrupted, on_checkpoint=self._checkpoint,
                           checkpoint_every=a["save_every"])
        self.began = time.perf_counter()
        try:
            device = load_for_training(trainer)
            with training_context():
                denoise = self._denoiser(trainer, device)
                result, _ = train(denoise, samples, params, noise_model_of(trainer),
                                  settings, hooks, device, start_step=self.start_step,
                                  optimizer_state=self.optimizer_state, collate=collate_host_conds,
                                  optimizer=optimizer, base_denoise=self._base_denoiser(denoise))
        except TrainingDiverged as e:
            kept = f" The last good save is {self.last_good}." if self.last_good else " Nothing was saved."
            raise LoRAError(f"{e}{kept}") from e
        except mm.InterruptProcessingException:
            # ComfyUI interrupts from inside any op and from its progress hook: keep what was learned.
            self._save_final(optimizer, partial=True)
            raise
        finally:
            self.seconds = time.perf_counter() - self.began
            unload(trainer)
        self.steps_done = max(result.steps_done, self.start_step)
        self._save_final(optimizer, partial=result.stopped_early)
        if result.stopped_early:  # cancel seen by the loop: saved (marked partial); tell ComfyUI it stopped
            raise mm.InterruptProcessingException()

    def _denoiser(self, trainer, device):
        denoise = denoiser(trainer)
        dtype = DTYPES[self.a["training_dtype"]]
        if dtype == torch.float32:
            return denoise

        def autocast_denoise(x, s, c):  # autocast the base model; LoRA parameters stay fp32
            with torch.autocast(device.type, dtype=dtype):
                return denoise(x, s, c).float()
        return autocast_denoise

    def _base_denoiser(self, denoise):
        """The frozen base model's prediction (every LoRA layer off), for output preservation."""
        if not self.preserving:
            return None

        def base_denoise(x, s, c):
            with base_outputs(self.layers.values()):
                return denoise(x, s, c)
        return base_denoise

    def _on_step(self, trainer, step: int, loss: float, lr: float) -> None:
        a = self.a
        self.steps_done = step
        self.losses.append(loss)
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(step - self.start_step, 1) * (self.settings.steps - step)
        send_progress(self.node_id, step, self.settings.steps, loss, lr, eta)
        if a["sample_every"] and a["sample_prompt"] and step % a["sample_every"] == 0:
            self.previews.append(render_samples(trainer, a["clip"], a["vae"], a["sample_prompt"], a["seed"],
                                                self.images[0].shape))
            send_progress(self.node_id, step, self.settings.steps, loss, lr, eta, preview=self.previews[-1])

    # ------------------------------------------------------------ saving
    def _metadata(self, step: int, partial: bool) -> dict:
        a = self.a
        return build_metadata(title=self.name, base_family=self.family, rank=a["rank"], alpha=self.alpha,
                              scope=a["scope"], provenance=self.provenance,
                              trigger_words=[a["trigger_word"]] if a["trigger_word"] else (),
                              training={"steps": step, "learning_rate": a["learning_rate"],
                                        "images": len(self.images), "resolution": a["resolution"]},
                              extra={"lw.steps": str(step), "lw.partial": str(partial).lower(),
                                     "lw.base_family": self.family})

    def _save(self, path: str, step: int, partial: bool, optimizer=None) -> None:
        lora = layers_to_lora(self.layers, os.path.basename(path))
        try:
            meta = self._metadata(step, partial)
        except Exception as e:  # the weights are what took the time: save them with what is known
            save_lora(path, lora, {"lw.steps": str(step), "lw.partial": str(partial).lower()}, self.file_names)
            raise LoRAError(f"Train LoRA: the LoRA's weights were saved to {path}, but its metadata could not be "
                            f"written ({e}).") from e
        save_lora(path, lora, meta, self.file_names)
        if optimizer is not None:
            save_optimizer_state(path + STATE_SUFFIX, optimizer, step)
        self.last_good = os.path.basename(path)

    def _save_final(self, optimizer, partial: bool) -> None:
        try:
            self._save(self.final_path, self.steps_done, partial, optimizer)
        except OSError as e:  # the folder went away or filled up mid-run: keep the work elsewhere
            rescue = os.path.join(folder_paths.get_output_directory(), os.path.basename(self.final_path))
            self._save(rescue, self.steps_done, partial, optimizer)
            raise LoRAError(f"Train LoRA: could not write {self.final_path} ({e}); the trained LoRA was saved to "
                            f"{rescue} instead: move it into models/loras.") from e

    def _checkpoint(self, step: int) -> None:
        self._save(output_path(f"{self.name}-{step:06d}"), step, partial=False)

    # ------------------------------------------------------------ outputs
    def outputs(self) -> io.NodeOutput:
        a, model = self.a, self.model
        file_name = os.path.relpath(self.final_path, os.path.dirname(output_path("x")))
        lora = layers_to_lora(self.layers, file_name)
        lora.metadata = {SCOPE_KEY: a["scope"], TRIGGER_PHRASE_KEY: a["trigger_word"]}
        if os.path.isfile(self.final_path):  # the file holds these weights: a merge names this parent by it
            lora.source_path = self.final_path
        match = match_on_host(lora, model, None)
        new_model, _, _ = apply_layers(model, None, plan_layers([(match, 1.0, 0.0)]), [], MERGE)
        loss_image = render_loss_curve(self.losses or [float("nan")], title=f"loss: {file_name}")
        sample_image = torch.cat(self.previews) if self.previews else torch.zeros(1, 64, 64, 3)
        summary = {"file": file_name, "steps": self.steps_done, "seconds": round(self.seconds, 2),
                   "final_loss": self.losses[-1] if self.losses else None}
        return io.NodeOutput(new_model, a["clip"], lora, loss_image, sample_image, file_name,
                             ui={"lw_train": [json.dumps(summary)], "lw_loss": self.losses})


def _with_host_names(lora: LoRA, file_names: dict[str, str]) -> LoRA:
    """A saved LoRA under the names training layers use (the ComfyUI paths), for resuming a file written
    in the family's standard naming; files already named by ComfyUI paths come back as they are."""
    if not file_names:
        return lora
    to_host = host_names(file_names)
    adapters = {}
    for prefix, adapter in lora.adapters.items():
        kohya = kohya_prefix(prefix)
        adapters[to_host.get(kohya, kohya)] = adapter
    return LoRA(name=lora.name, adapters=adapters, metadata=lora.metadata, source_path=lora.source_path)


def check_writable_folder(folder: str) -> None:
    """Refuse, before training, a loras folder the run could not save into."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lw_write_check_"):
            pass
    except OSError as e:
        raise LoRAError(f"Train LoRA: cannot write into {folder} ({e.strerror or e}); the trained LoRA could not be "
                        "saved there. Fix the folder's permissions or pick another output_name folder.") from e
