"""The toy world's base UNet: ComfyUI's own SD1.5 UNetModel, trained here on the base world.

Training is plain DDPM epsilon prediction on SD1.5's schedule, which is what ComfyUI's SD15
model sampling assumes: with sigma = sqrt((1 - a) / a), ComfyUI feeds the UNet
x / sqrt(sigma^2 + 1) = sqrt(a) z + sqrt(1 - a) eps, the same input as here. Latents are the
autoencoder's raw output (unit scale); the VAE file's vae_scale 0.18215 cancels SD1.5's latent
scale, so ComfyUI's LATENT round-trips to exactly these numbers.
"""
from __future__ import annotations

import time

import torch
from torch import nn

TIMESTEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    """SD1.5's scaled-linear schedule (ComfyUI's ModelSamplingDiscrete default)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def init_weights(module: nn.Module, seed: int) -> None:
    """ComfyUI's ops classes skip weight initialisation: run torch's own for every layer."""
    torch.manual_seed(seed)
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls.__module__.startswith("torch.nn.modules") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(m)
                break


def loss_weights(max_weight: float = 10.0) -> torch.Tensor:
    """Per-timestep weight of the epsilon loss: 1 + 1/SNR (v-prediction's emphasis), capped.

    With plain epsilon loss a small model learns almost nothing at high noise, where predicting
    the noise is easy but the image's layout and colours are decided: it then ignores its
    caption there, and sampling commits to a random background before the caption matters."""
    abar = alphas_cumprod()
    weight = (1 + (1 - abar) / abar).clamp(max=max_weight)
    return weight / weight.mean()


def train_unet(unet: nn.Module, latents: torch.Tensor, contexts: torch.Tensor, caption_index: torch.Tensor,
               empty: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 1e-3, ema_decay: float = 0.998,
               prefixed: float = 0.25, log=print) -> nn.Module:
    """latents [N, 4, h, w]; contexts [V, C, 77, D]: each of the C captions plain (V index 0) and
    behind V - 1 filler words ("zorp, a red ..."); caption_index [N] into C; empty [77, D].

    A share `prefixed` of the samples reads a filler-prefixed caption, so the model learns to read
    its words wherever they stand (a user's trigger word comes first and shifts them all); a tenth
    gets the empty caption, so classifier-free guidance works. Returns the weights' exponential
    moving average (a small model's samples are much cleaner from it)."""
    gen = torch.Generator().manual_seed(seed)
    abar, weights = alphas_cumprod(), loss_weights()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.03)
    unet.train()
    began = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
        z = latents[idx]
        variant = torch.randint(1, contexts.shape[0], (batch,), generator=gen) if contexts.shape[0] > 1 \
            else torch.zeros(batch, dtype=torch.long)
        variant[torch.rand(batch, generator=gen) >= prefixed] = 0
        context = contexts[variant, caption_index[idx]]
        context[torch.rand(batch, generator=gen) < 0.1] = empty
        t = torch.randint(0, TIMESTEPS, (batch,), generator=gen)
        eps = torch.randn(z.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * eps
        pred = unet(x, timesteps=t.float(), context=context)
        loss = ((pred - eps).pow(2).mean((1, 2, 3)) * weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - began:.0f} s)")
    unet.load_state_dict(ema)
    return unet.eval()


@torch.no_grad()
def ddim_sample(unet: nn.Module, context: torch.Tensor, uncond: torch.Tensor, shape: tuple, seed: int,
                steps: int = 30, cfg: float = 3.0) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance; context/uncond [B, 77, D]; latents out."""
    abar = alphas_cumprod()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    ts = torch.linspace(TIMESTEPS - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        a = abar[t]
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        tt = t.float().expand(shape[0])
        eps_c = unet(x, timesteps=tt, context=context)
        eps_u = unet(x, timesteps=tt, context=uncond)
        eps = eps_u + cfg * (eps_c - eps_u)
        z0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * z0 + (1 - a_next).sqrt() * eps
    return x
