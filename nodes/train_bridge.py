"""ComfyUI side of training: data encoding, the denoiser, trainable layers on a clone, loading.

lora_core.training runs the loop; this module only adapts ComfyUI's objects to it.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import weakref

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..lora_core import LoRA, LoRAError, LowRankAdapter
from ..lora_core.export import kohya_prefix
from ..lora_core.training import (
    EPS,
    FLOW,
    V_PRED,
    CheckpointedForward,
    CloneInputForward,
    LoRATrainLayer,
    NoiseModel,
    Sample,
    TrainForward,
    bucket_sizes,
    fit_image,
    nearest_bucket,
    select_targets,
)

# ---------------------------------------------------------------- data

def split_captions(captions: str, trigger: str, count: int) -> list[str]:
    lines = [c.strip() for c in captions.splitlines() if c.strip()] or [""]
    if len(lines) == 1:
        lines = lines * count
    if len(lines) != count:
        raise LoRAError(f"Train LoRA: {len(lines)} caption lines for {count} images; give one caption per image "
                        "(one per line, in image order) or a single caption for all.")
    trigger = trigger.strip()
    return [f"{trigger}, {c}".strip(", ") if trigger else c for c in lines]


def prepare_images(images: list[torch.Tensor], resolution: int, bucketing: bool) -> list[torch.Tensor]:
    """Split IMAGE batches into single [H, W, 3] images at trainable sizes."""
    singles = [img[i, :, :, :3] for img in images for i in range(img.shape[0])]
    if not singles:
        raise LoRAError("Train LoRA: no training images; connect an IMAGE batch with 10-50 images.")
    if bucketing:
        sizes = bucket_sizes(resolution)
        return [fit_image(im, *nearest_bucket(im.shape[1], im.shape[0], sizes)) for im in singles]
    shapes = sorted({(im.shape[1], im.shape[0]) for im in singles})
    if len(shapes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in shapes)
        raise LoRAError(f"Train LoRA: images have different sizes ({listed}); turn on bucketing or resize them "
                        "to one size.")
    w, h = shapes[0]
    if w % 8 or h % 8:
        raise LoRAError(f"Train LoRA: image size {w}x{h} is not a multiple of 8; turn on bucketing or crop them.")
    return singles


def model_conds(model, cross_attn: torch.Tensor, pooled: torch.Tensor | None, latent: torch.Tensor) -> dict:
    """The model's own extra conditioning (SDXL adm, Flux guidance...), as its sampler builds it."""
    height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
    extra = model.model.extra_conds(cross_attn=cross_attn, pooled_output=pooled, noise=latent[None],
                                    device=torch.device("cpu"), width=width, height=height, target_width=width,
                                    target_height=height, crop_w=0, crop_h=0)
    return {k: v.process_cond(batch_size=1, device=torch.device("cpu")).cond.clone() for k, v in extra.items()}


@torch.no_grad()
def encode_dataset(model, clip, vae, images: list[torch.Tensor], captions: list[str]) -> list[Sample]:
    """VAE-encode every image and CLIP-encode every caption once; cached for the whole run."""
    samples, cache = [], {}
    for image, caption in zip(images, captions):
        latent = model.model.process_latent_in(vae.encode(image[None])).float()[0]
        if caption not in cache:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            cache[caption] = (cond, pooled)
        cond, pooled = cache[caption]
        samples.append(Sample(latent.clone(), model_conds(model, cond.clone(), pooled, latent)))
    return samples


# ---------------------------------------------------------------- the model

def noise_model_of(model) -> NoiseModel:
    sampling = model.model.model_sampling
    if isinstance(sampling, comfy.model_sampling.CONST):
        prediction = FLOW
    elif isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = V_PRED
    elif isinstance(sampling, comfy.model_sampling.EPS):
        prediction = EPS
    else:
        raise LoRAError(f"Train LoRA: unsupported model sampling {type(sampling).__name__}.")

    def sigma_of(u: torch.Tensor) -> torch.Tensor:
        # Away from the ends: percent 0 means "infinite" noise in ComfyUI's discrete schedules.
        return torch.tensor([sampling.percent_to_sigma(float(p)) for p in u.clamp(1e-3, 1 - 1e-3)])
    return NoiseModel(prediction, sigma_of, lambda x0, noise, sigma: sampling.noise_scaling(sigma, noise, x0))


def denoiser(model):
    def denoise(x_t, sigma, cond):
        with differentiable_rope():
            return model.model.apply_model(x_t, sigma, **cond)
    return denoise


def _rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # ComfyUI's reference rope (comfy/ldm/flux/math.py), plain torch ops, so autograd flows through it.
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _rope(xq, xk, freqs_cis):
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


@contextlib.contextmanager
def differentiable_rope():
    """comfy_kitchen's fused rope op has no backward; DiT training swaps in the reference math meanwhile."""
    swapped = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy.ldm.") or module is None:
            continue
        for attr, replacement in (("apply_rope", _rope), ("apply_rope1", _rope1)):
            current = getattr(module, attr, None)
            if current is not None and getattr(current, "__module__", "") != __name__ and \
                    "kitchen" in repr(current).lower() + getattr(current, "__module__", "").lower():
                swapped.append((module, attr, current))
                setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, original in swapped:
            setattr(module, attr, original)


def _checkpoint_blocks(diffusion_model) -> list[str]:
    """Modules whose forward is called directly: DiT blocks, and the layers inside each UNet block
    (ComfyUI's UNet iterates a block's layers itself, so a block-level forward would never run)."""
    names = []
    for group in ("double_blocks", "single_blocks"):
        blocks = getattr(diffusion_model, group, None)
        names += [f"{group}.{i}" for i in range(len(blocks))] if blocks is not None else []
    unet_blocks = [f"input_blocks.{i}" for i in range(len(getattr(diffusion_model, "input_blocks", [])))]
    unet_blocks += [f"output_blocks.{i}" for i in range(len(getattr(diffusion_model, "output_blocks", [])))]
    unet_blocks += ["middle_block"] if getattr(diffusion_model, "middle_block", None) is not None else []
    for block in unet_blocks:
        for j, layer in enumerate(comfy.utils.get_attr(diffusion_model, block)):
            if any(True for _ in layer.parameters()):
                names.append(f"{block}.{j}")
    return names


def attach_trainable(model, preset: str, rank: int, alpha: float, seed: int, init: str,
                     checkpointing: bool) -> tuple[object, dict[str, LoRATrainLayer]]:
    """A clone whose target linears carry trainable LoRA layers (object patches, removed on unpatch)."""
    trainer = model.clone()
    trainer.weight_inplace_update = False
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    keys = select_targets(shapes, preset)
    if not keys:
        raise LoRAError(f"Train LoRA: no '{preset}' layers found in this model.")
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in keys:
        path = key[: -len(".weight")]
        module = comfy.utils.get_attr(trainer.model, path)
        out_features, in_features = shapes[key]
        layer = LoRATrainLayer(in_features, out_features, rank, alpha, g, init, name=path)
        trainer.add_object_patch(f"{path}.forward", TrainForward(module, layer))
        layers[key] = layer
    for name, module in trainer.model.diffusion_model.named_modules():
        in_dit_block = ".double_blocks." in f".{name}" or ".single_blocks." in f".{name}"
        if isinstance(module, torch.nn.LayerNorm) and in_dit_block:
            trainer.add_object_patch(f"diffusion_model.{name}.forward", CloneInputForward(module))
    if checkpointing:
        for name in _checkpoint_blocks(trainer.model.diffusion_model):
            block = comfy.utils.get_attr(trainer.model.diffusion_model, name)
            trainer.add_object_patch(f"diffusion_model.{name}.forward", CheckpointedForward(block))
    # Weights loaded by other nodes are inference tensors, which autograd cannot save. A patch on every
    # weight makes ComfyUI swap in trainable-safe ones during training (and restore the originals after).
    alias = AutogradSafeWeight(trainer)
    trainer.add_patches({k: alias for k in shapes}, 1.0)
    return trainer, layers


class AutogradSafeWeight(WeightAdapterBase):
    """The base weight itself, as a tensor autograd may save for backward.

    ComfyUI hands each weight patch a fresh copy of the weight. Where the original (kept in the
    patcher's backup) is already on that device, a non-inference alias of its storage is returned
    instead and the copy is dropped: training then holds no second copy of the model (and no
    round trip through ComfyUI's patch dtype). Where the original sits on another device, the
    fresh copy is what autograd gets.
    Base weights are frozen and never written, so sharing their storage is safe.
    """

    name = "lora_workbench_autograd_safe"

    def __init__(self, patcher):
        self.patcher = patcher
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        backup = self.patcher.backup.get(key)
        original = None if backup is None else backup.weight
        if original is None or (original.device, original.shape) != (weight.device, weight.shape):
            return weight
        with torch.inference_mode(False):
            return torch.empty(0, dtype=original.dtype, device=original.device).set_(
                original.untyped_storage(), original.storage_offset(), original.shape, original.stride())


def load_for_training(trainer) -> torch.device:
    mm.load_models_gpu([trainer], force_full_load=True)
    return trainer.load_device


def unload(trainer) -> None:
    """Give the training clone's memory back and restore the original weights."""
    for index, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is trainer:
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
            break


def layers_to_lora(layers: dict[str, LoRATrainLayer], name: str) -> LoRA:
    adapters = {}
    for key, layer in layers.items():
        prefix = kohya_prefix("lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_"))
        adapters[prefix] = LowRankAdapter({"up": layer.up.detach().float().cpu().clone(),
                                           "down": layer.down.detach().float().cpu().clone(),
                                           "alpha": torch.tensor(float(layer.alpha))})
    return LoRA(name=name, adapters=adapters)


def load_layers(layers: dict[str, LoRATrainLayer], lora: LoRA) -> None:
    """Resume: copy a saved LoRA's factors into freshly made layers (same targets and rank)."""
    for key, layer in layers.items():
        prefix = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        adapter = lora.adapters.get(prefix)
        if adapter is None or adapter.roles["down"].shape != layer.down.shape:
            raise LoRAError(f"Train LoRA: cannot resume from {lora.name}: layer {prefix} is missing or has another "
                            "rank; resume with the same targets and rank.")
        with torch.no_grad():
            layer.up.copy_(adapter.roles["up"])
            layer.down.copy_(adapter.roles["down"])


# Hashing a base model reads every weight (seconds for SDXL); ComfyUI never changes base weights
# for good, so each loaded model is hashed once, however often it is trained on.
_WEIGHTS_SHA256: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_sha256(model) -> str:
    """Fingerprint of the base model's weights, for the file's provenance."""
    # Only the pure base is memoised: no patches on this MODEL and none written into the module now.
    pure = not model.patches and getattr(model.model, "current_weight_patches_uuid", None) is None
    if pure and model.model in _WEIGHTS_SHA256:
        return _WEIGHTS_SHA256[model.model]
    digest = hashlib.sha256()
    for key, tensor in sorted(model.model.state_dict().items()):
        if key.startswith("diffusion_model."):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if pure:
        _WEIGHTS_SHA256[model.model] = digest.hexdigest()
    return digest.hexdigest()


def image_sha256(image: torch.Tensor) -> str:
    return hashlib.sha256((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().tobytes()).hexdigest()
