"""Live feedback while training: progress events for the frontend and sample renders."""
from __future__ import annotations

import comfy.sample
import comfy.utils
import numpy as np
import torch
from PIL import Image

EVENT = "lw.train.progress"  # the web extension draws the live loss chart from these


def send_progress(node_id, step: int, total: int, loss: float, lr: float, eta_s: float, preview=None) -> None:
    comfy.utils.ProgressBar(total, node_id=node_id).update_absolute(
        step, total, ("JPEG", _to_pil(preview), 512) if preview is not None else None)
    try:
        from server import PromptServer
        PromptServer.instance.send_sync(EVENT, {"node": node_id, "step": step, "total": total, "loss": loss,
                                                "lr": lr, "eta_s": round(eta_s, 1)})
    except (ImportError, AttributeError):  # no server (library use): the progress bar is enough
        pass


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))


@torch.no_grad()
def render_samples(model, clip, vae, prompt: str, seed: int, image_shape) -> torch.Tensor:
    """A short txt2img with the LoRA as trained so far -> IMAGE [1, H, W, 3]."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled) if pooled is not None else None}]]
    h, w = image_shape[0] // 8, image_shape[1] // 8
    latent = torch.zeros(1, model.model.latent_format.latent_channels, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, 12, 5.0, "euler", "normal", positive, negative, latent,
                                  seed=seed, disable_pbar=True)
    return vae.decode(samples).float()[:, :, :, :3].clamp(0, 1).cpu()
