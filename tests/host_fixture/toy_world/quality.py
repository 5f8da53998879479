"""Quality measures on the toy world, through ComfyUI's own nodes in this process.

Everything a user would wire is called as the node class ComfyUI registered: Load Checkpoint,
CLIP Text Encode, Empty Latent Image, KSampler, VAE Decode, this pack's Train/Stack/Merge LoRA and
core's TrainLoraNode. The detector reads what was drawn. Used by benchmarks/quality.py (full
figures) and tests/host/test_toy_world.py (fast versions with stated thresholds).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import build, world
from .detector import Detector, movement

SAMPLER = {"steps": 20, "cfg": 3.0, "sampler_name": "ddim", "scheduler": "ddim_uniform"}
NEGATIVE = ""
# How a held-out value is trained, shared by the example LoRAs, benchmarks/quality.py (ours and core's
# runs) and tests/host/test_toy_world.py: 50 captioned images (the most issue 16 allows) and 20 base-world
# images for regularisation, batches of 8, rank 8, learning rate 4e-3. Measured on the star, one run
# each: 20 images drew it in 62% of samples, 50 in 79%, batches of 8 in 83% (world of 4000 UNet steps);
# on the world of 3200 steps, 55% at learning rate 2e-3 and 69% at 4e-3.
IMAGES, REG_IMAGES, BATCH, RANK, LEARNING_RATE = 50, 20, 8, 8, 4e-3


@dataclasses.dataclass
class Concept:
    """A held-out value a LoRA learns, with the word that asks for it."""
    kind: str       # "shape", "colour" or "texture"
    value: str      # "star", "purple", "dotted"
    trigger: str    # "lwstar"

    def scenes(self) -> list[world.Scene]:
        return world.scenes_with(self.kind, self.value)

    def prompt(self, scene: world.Scene) -> str:
        """How a user asks for it: the trigger word first, the caption as the LoRA was trained."""
        return f"{self.trigger}, {scene.caption()}"


CONCEPTS = {c.value: c for c in (Concept("shape", "star", "lwstar"), Concept("texture", "dotted", "lwdots"),
                                 Concept("colour", "purple", "lwpurple"))}


def training_set(concept: Concept) -> tuple[torch.Tensor, list[str]]:
    """The IMAGES captioned images a LoRA of `concept` learns from."""
    return images_of(concept.scenes(), IMAGES, seed=31)


def regularisation_set() -> tuple[torch.Tensor, list[str]]:
    """The REG_IMAGES base-world images (and captions) mixed into its batches."""
    return images_of(world.base_scenes(), REG_IMAGES, seed=32)


def images_of(scenes: list[world.Scene], count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` rendered images (ComfyUI IMAGE, [N, 64, 64, 3] in [0, 1]) and their captions."""
    pixels, chosen = world.dataset(scenes, count, seed)
    return torch.from_numpy(pixels).float() / 255, [s.caption() for s in chosen]


class ToyWorld:
    """The toy checkpoint loaded by Load Checkpoint, the detector, and ComfyUI's node classes."""

    def __init__(self, node_classes: dict, models_dir: Path):
        self.nodes = node_classes
        self.model, self.clip, self.vae = node_classes["CheckpointLoaderSimple"]().load_checkpoint(
            Path(build.CHECKPOINT).name)[:3]
        self.detector = load_detector(models_dir)
        self._conds: dict = {}

    # ------------------------------------------------------------ drawing
    def encode(self, clip, text: str):
        key = (id(clip), text)
        if key not in self._conds:
            self._conds[key] = self.nodes["CLIPTextEncode"]().encode(clip, text)[0]
        return self._conds[key]

    @torch.inference_mode()
    def draw(self, model, prompts: list[str], seed: int, per_prompt: int = 1, clip=None) -> torch.Tensor:
        """Each prompt drawn `per_prompt` times (one KSampler batch, seed `seed`): IMAGE [P * n, 64, 64, 3].
        The same prompt and seed give the same starting noise whatever the model."""
        clip = clip or self.clip
        latent = self.nodes["EmptyLatentImage"]().generate(world.SIZE, world.SIZE, per_prompt)[0]
        negative = self.encode(clip, NEGATIVE)
        out = []
        for prompt in prompts:
            samples = self.nodes["KSampler"]().sample(model, seed, SAMPLER["steps"], SAMPLER["cfg"],
                                                      SAMPLER["sampler_name"], SAMPLER["scheduler"],
                                                      self.encode(clip, prompt), negative, latent)[0]
            out.append(self.nodes["VAEDecode"]().decode(self.vae, samples)[0])
        return torch.cat(out)

    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        return self.detector.read(images)

    # ------------------------------------------------------------ training
    def train_ours(self, concept: Concept, images: torch.Tensor, captions: list[str], steps: int, rank: int = RANK,
                   learning_rate: float = LEARNING_RATE, name: str = "toy", reg: tuple | None = None, seed: int = 0,
                   batch_size: int = BATCH, targets: str = "attention", **optional):
        """Train LoRA (Workbench) at the node; `optional`: its optional inputs (reg_target, v_pred_like_loss).
        Returns (MODEL with the LoRA, LORA, seconds)."""
        node = self.nodes["LW_TrainLoRA"]
        args = dict(model=self.model, clip=self.clip, vae=self.vae, images=images, captions=captions,
                    trigger_word=concept.trigger, output_name=f"lw_toy/{name}", scope=f"toy world: {concept.value}",
                    rank=rank, alpha=0.0, targets=targets, steps=steps, learning_rate=learning_rate,
                    batch_size=batch_size, grad_accumulation=1, optimizer="adamw", lr_schedule="cosine",
                    warmup_steps=0, seed=seed, resolution=64, bucketing=False, noise_offset=0.0,
                    min_snr_gamma=5.0, gradient_checkpointing=False, training_dtype="float32", save_every=0,
                    sample_prompt="", sample_every=0, resume_from="None")
        lists = {k: ([v] if k != "captions" else [*v]) for k, v in args.items()}
        if reg is not None:
            lists["reg_images"], lists["reg_captions"] = [reg[0]], [*reg[1]]
        lists.update({k: [v] for k, v in optional.items()})
        began = time.perf_counter()
        out = node.execute(**lists)
        return out.args[0], out.args[2], time.perf_counter() - began

    def train_core(self, concept: Concept, images: torch.Tensor, captions: list[str], steps: int, rank: int = RANK,
                   learning_rate: float = LEARNING_RATE, seed: int = 0, batch_size: int = BATCH):
        """core's Train LoRA (TrainLoraNode) on the same images, captions (with the trigger), steps and
        rank, through the VAE Encode and CLIP Text Encode nodes its workflows use; returns
        (MODEL with the LoRA at strength 1 through core's LoraModelLoader, seconds)."""
        with torch.inference_mode():  # as ComfyUI's executor runs every node: outside it the latents carry
            # a graph back through the VAE, and core's second training step fails ("backward through the
            # graph a second time"), with or without this pack's nodes run before it
            latents = self.nodes["VAEEncode"]().encode(self.vae, images)[0]
            positive = [self.encode(self.clip, f"{concept.trigger}, {c}") for c in captions]
        began = time.perf_counter()
        out = self.nodes["TrainLoraNode"].execute(
            model=[self.model], latents=[latents], positive=positive, batch_size=[batch_size], steps=[steps],
            grad_accumulation_steps=[1], learning_rate=[learning_rate], rank=[rank], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[seed], training_dtype=["fp32"], lora_dtype=["fp32"],
            algorithm=["LoRA"], gradient_checkpointing=[False], existing_lora=["[None]"], bucket_mode=[False])
        seconds = time.perf_counter() - began
        lora = out.args[1]
        model = self.nodes["LoraModelLoader"].execute(self.model, lora, 1.0).args[0]
        return model, seconds


def load_detector(models_dir: Path) -> Detector:
    import safetensors.torch
    detector = Detector()
    detector.load_state_dict(safetensors.torch.load_file(str(Path(models_dir) / build.DETECTOR)))
    return detector.eval()


# ---------------------------------------------------------------- figures

def share_showing(readings: list[dict], kind: str, value: str) -> float:
    return sum(r[kind] == value for r in readings) / max(len(readings), 1)


def share_matching(readings: list[dict], scenes: list[world.Scene]) -> float:
    """Share of images whose every detected value is what the caption asked for."""
    return sum(all(r[k] == getattr(s, k) for k in world.KINDS) for r, s in zip(readings, scenes)) / max(len(scenes), 1)


def agreement(a: list[dict], b: list[dict]) -> float:
    """Share of same-seed pairs detected as the same scene (every kind)."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def agreement_where_drawn_right(base: list[dict], drawn: list[dict], scenes: list[world.Scene]) -> tuple[float, int]:
    """agreement() over only the same-seed pairs whose base image shows what its caption asked for, and
    how many those are. The base model's wrong images sit where its sampler is undecided: a LoRA that
    learned nothing new (trained on more base-world images) changes 5 of 11 of them, 1 of the other 117."""
    kept = [(x, y) for x, y, s in zip(base, drawn, scenes) if all(x[k] == getattr(s, k) for k in world.KINDS)]
    return sum(x == y for x, y in kept) / max(len(kept), 1), len(kept)


def mean_movement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(movement(a, b).mean())
