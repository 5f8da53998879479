"""ComfyUI side of training: data encoding, the denoiser, trainable layers on a clone, loading.

lora_core.training runs the loop; this module only adapts ComfyUI's objects to it.
"""
from __future__ import annotations

import hashlib
import re
import weakref

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch
from comfy.weight_adapter import WeightAdapterBase

from ..lora_core import LoRA, LoRAError, LowRankAdapter, caches
from ..lora_core.formats.export import kohya_prefix
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
from . import comfy_compat
from .comfy_bridge import model_family

# ---------------------------------------------------------------- data

def split_captions(captions: str | list[str], trigger: str, count: int, what: str = "images") -> list[str]:
    """One caption per image: a list of captions (as a dataset loader gives them, one per image),
    or one text with a caption per line, or a single caption for all; the trigger goes first."""
    if isinstance(captions, (list, tuple)) and len(captions) > 1:
        lines = [" ".join(str(c).split()) for c in captions]
    else:
        text = captions[0] if isinstance(captions, (list, tuple)) else captions
        lines = [c.strip() for c in (text or "").splitlines() if c.strip()] or [""]
    if len(lines) == 1:
        lines = lines * count
    if len(lines) != count:
        raise LoRAError(f"Train LoRA: {len(lines)} captions for {count} {what}; give one caption per image "
                        "(one per line, in image order) or a single caption for all.")
    trigger = trigger.strip()
    return [f"{trigger}, {c}".strip(", ") if trigger else c for c in lines]


def without_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger word taken out wherever it stands as a word (commas tidied)."""
    if not trigger.strip():
        return caption
    text = re.sub(rf"(?<![\w-]){re.escape(trigger.strip())}(?![\w-])", "", caption)
    parts = [" ".join(part.split()) for part in text.split(",")]
    return ", ".join(part for part in parts if part)


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


def encode_captions(clip, captions: list[str]) -> dict[str, list]:
    """caption -> ComfyUI conditioning [cond, extras], exactly as CLIPTextEncode makes it (pooled
    output, attention masks, a second encoder's output: whatever this family's encoder returns)."""
    out = {}
    for caption in captions:
        if caption not in out:
            out[caption] = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0]
    return out


def _private(value):
    # Tensors made under inference mode cannot be saved for backward: train on copies. Ints, flags and
    # lists (Lumina's num_tokens, LTX's frame_rate) are passed as they are.
    return value.clone() if isinstance(value, torch.Tensor) else value


def model_conds(model, conditioning: list, latent: torch.Tensor) -> dict:
    """The model's own inputs for one sample, built the way ComfyUI's sampler builds them
    (comfy.samplers.encode_model_conds, then each COND's process_cond for a batch of one)."""
    cond, extras = conditioning
    params = {k: _private(v) for k, v in extras.items()}
    if cond is not None:
        params["cross_attn"] = _private(cond)
    noise = latent[None]
    # Text-to-image semantics: an empty latent_image, so no model sees the clean latent it must learn.
    params.update(device=torch.device("cpu"), noise=noise, prompt_type="positive",
                  latent_image=torch.zeros_like(noise), denoise_mask=None, seed=None)
    params.setdefault("width", noise.shape[3] * 8 if noise.dim() >= 4 else None)  # encode_model_conds' formula
    params.setdefault("height", noise.shape[2] * 8)
    out = model.model.extra_conds(**params)
    return {k: v.process_cond(batch_size=1, device=torch.device("cpu"), area=None) for k, v in out.items()}


def collate_host_conds(conds: list[dict], device) -> dict:
    """Batch samples' COND objects with ComfyUI's own concat (it pads cross-attention lengths)."""
    out = {}
    for key, first in conds[0].items():
        value = first.concat([c[key] for c in conds[1:]])
        out[key] = _private(value).to(device) if isinstance(value, torch.Tensor) else value
    return out


def build_samples(model, latents: list[torch.Tensor], conditionings: list[list]) -> list[Sample]:
    """Samples from clean latents (as the model sees them) and their ComfyUI conditionings."""
    return [Sample(latent.float().clone(), model_conds(model, cond, latent))
            for latent, cond in zip(latents, conditionings)]


@torch.no_grad()
def encode_dataset(model, clip, vae, images: list[torch.Tensor], captions: list[str]) -> list[Sample]:
    """VAE-encode every image and CLIP-encode every caption once; cached for the whole run."""
    by_caption = encode_captions(clip, captions)
    latents = [model.model.process_latent_in(vae.encode(image[None])).float()[0] for image in images]
    return build_samples(model, latents, [by_caption[c] for c in captions])


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
    """x0 prediction of the (trainable) model. Call it, and run backward, inside training_context():
    checkpointed blocks recompute their forward during the backward pass."""
    def denoise(x_t, sigma, cond):
        return model.model.apply_model(x_t, sigma, **cond)
    return denoise


def training_context():
    """What must hold for the whole training loop, forward and backward alike."""
    return comfy_compat.training_swaps()


_UNET_BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


def _unet_layers(diffusion_model) -> list[str]:
    """The layers inside each UNet block: ComfyUI's UNet iterates a block's layers itself, so a
    block-level forward would never run."""
    names = []
    for group in _UNET_BLOCK_LISTS:
        blocks = getattr(diffusion_model, group, None)
        if blocks is None:
            continue
        block_names = [group] if group == "middle_block" else [f"{group}.{i}" for i in range(len(blocks))]
        for block in block_names:
            for j, layer in enumerate(comfy.utils.get_attr(diffusion_model, block)):
                if any(True for _ in layer.parameters()):
                    names.append(f"{block}.{j}")
    return names


def dit_blocks(diffusion_model, target_paths: list[str]) -> list[str]:
    """The transformer blocks gradients pass through: every item of the model's top-level block lists
    (double_blocks, single_blocks, blocks, layers, ...), and for each target the item of the first
    ModuleList on its path (txt_in.individual_token_refiner.blocks.0, ...)."""
    blocks = [f"{name}.{i}" for name, child in diffusion_model.named_children()
              if isinstance(child, torch.nn.ModuleList) and ("block" in name or name == "layers")
              for i in range(len(child))]
    for path in target_paths:
        parts, module = path.split("."), diffusion_model
        for i, part in enumerate(parts):
            if isinstance(module, torch.nn.ModuleList) and part.isdigit():
                name = ".".join(parts[: i + 1])
                if name not in blocks:
                    blocks.append(name)
                break
            module = getattr(module, part, None) if not part.isdigit() else module[int(part)]
            if module is None:
                break
    return blocks


def _is_unet(diffusion_model) -> bool:
    return getattr(diffusion_model, "input_blocks", None) is not None


def attach_trainable(model, preset: str, rank: int, alpha: float, seed: int, init: str,
                     checkpointing: bool, family_name: str | None = None, keys: list[str] | None = None,
                     ) -> tuple[object, dict[str, LoRATrainLayer]]:
    """A clone whose target linears carry trainable LoRA layers (object patches, removed on unpatch).
    `keys`: the targets when the caller has already chosen them (training_targets)."""
    trainer = model.clone()
    comfy_compat.copy_weights_before_patching(trainer)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    if keys is None:
        keys = training_targets(model, preset, family_name or model_family(model))
    g = torch.Generator().manual_seed(seed)
    layers = {}
    diffusion_model = trainer.model.diffusion_model
    dit = not _is_unet(diffusion_model)
    for key in keys:
        path = key[: -len(".weight")]
        module = comfy.utils.get_attr(trainer.model, path)
        out_features, in_features = shapes[key]
        layer = LoRATrainLayer(in_features, out_features, rank, alpha, g, init, name=path)
        trainer.add_object_patch(f"{path}.forward", TrainForward(module, layer, private_input=dit))
        layers[key] = layer
    if not dit:
        checkpointed, clone_inputs = (_unet_layers(diffusion_model) if checkpointing else []), False
    else:
        blocks = dit_blocks(diffusion_model, [k[len("diffusion_model."):] for k in keys])
        checkpointed, clone_inputs = (blocks if checkpointing else []), True
        _protect_norm_inputs(trainer, diffusion_model)
    for name in checkpointed:
        block = comfy.utils.get_attr(diffusion_model, name)
        trainer.add_object_patch(f"diffusion_model.{name}.forward",
                                 CheckpointedForward(block, clone_inputs=clone_inputs))
    # Weights loaded by other nodes are inference tensors, which autograd cannot save. A patch on every
    # weight makes ComfyUI swap in trainable-safe ones during training (and restore the originals after).
    alias = AutogradSafeWeight(trainer)
    trainer.add_patches({k: alias for k in shapes}, 1.0)
    return trainer, layers


def _protect_norm_inputs(trainer, diffusion_model) -> None:
    """DiT blocks normalise the residual stream, then update it in place: each norm module of the model
    gets a private copy of its input while gradients are recorded (CloneInputForward). Norms inside a
    norm (Flux's QKNorm holds two RMSNorms) are left to the outer one (named_modules lists parents first)."""
    protected: list[str] = []
    for name, module in diffusion_model.named_modules():
        if name and "norm" in type(module).__name__.lower() and not name.startswith(tuple(protected)):
            trainer.add_object_patch(f"diffusion_model.{name}.forward", CloneInputForward(module))
            protected.append(name + ".")


def training_targets(model, preset: str, family_name: str) -> list[str]:
    """The weight keys Train LoRA would train on this model; a clear error, before any work, when none."""
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    keys = select_targets(shapes, preset, family_name)
    if not keys:
        raise LoRAError(f"Train LoRA: this {family_name} model has no '{preset}' linear layers to train "
                        "(no attention projections were found by its names). Pick another model or targets preset.")
    return keys


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
        original = comfy_compat.original_weight(self.patcher, key)
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
    comfy_compat.unload_model(trainer)


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
caches.register("weights_sha256", _WEIGHTS_SHA256.clear)


def weights_sha256(model) -> str:
    """Fingerprint of the base model's weights, for the file's provenance."""
    # Only the pure base is memoised: no patches on this MODEL and none written into the module now.
    pure = not comfy_compat.has_weight_patches(model) and not comfy_compat.weights_written_into_module(model)
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
