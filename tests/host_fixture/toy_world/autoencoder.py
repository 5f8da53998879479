"""The toy world's autoencoder: TAESD's layout at a slim width, trained here, padded to TAESD's 64.

ComfyUI loads a VAE by its keys; a file with taesd_encoder/taesd_decoder keys opens as TAESD. TAESD
is 64 channels wide, ~10x slower to train than this world needs. So the same sequence of layers
is trained slimmer (fewer channels, most Blocks left out), then every weight is zero-padded to
TAESD's shapes: the extra channels get zero weights and zero biases, stay exactly zero through
every ReLU and residual, a left-out Block is relu(x), and the padded network computes the same
pixels (tests check it through ComfyUI's own VAE loader).
"""
from __future__ import annotations

import time

import torch
from torch import nn

LATENT_CHANNELS = 4


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def _block(n: int, on: bool) -> nn.Module:
    """A TAESD Block, or one left out: its weights stay zero, and a zero Block is relu(x)."""
    return Block(n) if on else nn.ReLU()


# Channels per resolution (64, 32, 16, 8 px) and Blocks trained per group of three: narrow where
# the image is large (that is where the time goes), wide near the latents.
WIDTHS = (16, 32, 48, 64)
BLOCKS = 1


def encoder(widths=WIDTHS, blocks=BLOCKS) -> nn.Sequential:
    """comfy.taesd.taesd.Encoder's layers, by index, at the given widths."""
    a, b, c, d = widths
    group = lambda n: [_block(n, i < blocks) for i in range(3)]  # noqa: E731
    return nn.Sequential(
        _conv(3, a), _block(a, False),
        _conv(a, b, stride=2, bias=False), *group(b),
        _conv(b, c, stride=2, bias=False), *group(c),
        _conv(c, d, stride=2, bias=False), *group(d),
        _conv(d, LATENT_CHANNELS))


def decoder(widths=WIDTHS, blocks=BLOCKS) -> nn.Sequential:
    """comfy.taesd.taesd.Decoder's layers, by index, at the given widths."""
    a, b, c, d = widths
    group = lambda n: [_block(n, i < blocks) for i in range(3)]  # noqa: E731
    up = nn.Upsample(scale_factor=2)
    return nn.Sequential(
        Clamp(), _conv(LATENT_CHANNELS, d), nn.ReLU(),
        *group(d), up, _conv(d, c, bias=False),
        *group(c), up, _conv(c, b, bias=False),
        *group(b), up, _conv(b, a, bias=False),
        _block(a, False), _conv(a, 3))


class SlimTAESD(nn.Module):
    def __init__(self, widths=WIDTHS, blocks=BLOCKS):
        super().__init__()
        self.taesd_encoder = encoder(widths, blocks)
        self.taesd_decoder = decoder(widths, blocks)


def padded_to_taesd(state: dict[str, torch.Tensor], taesd_shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Every TAESD weight (shapes from ComfyUI's own TAESD): zero, with the slim network's weights
    in its leading channels. Left-out Blocks stay all zero."""
    unknown = sorted(set(state) - set(taesd_shapes))
    if unknown:
        raise ValueError(f"not TAESD weights: {unknown[:5]}")
    out = {}
    for name, shape in taesd_shapes.items():
        padded = torch.zeros(shape)
        if name in state:
            padded[tuple(slice(0, n) for n in state[name].shape)] = state[name]
        out[name] = padded
    return out


def train_autoencoder(images: torch.Tensor, steps: int, batch: int, seed: int, log=print) -> SlimTAESD:
    """Fit on uint8 images [N, H, W, 3]: L1 pixels, latents pushed to zero mean and unit variance per
    channel (so the diffusion model sees unit-scale data), noise on the latents (so the decoder
    forgives a sampler's small errors)."""
    torch.manual_seed(seed)
    model = SlimTAESD()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    began = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx].permute(0, 3, 1, 2).float() / 255.0
        z = model.taesd_encoder(x)
        stats = z.mean((0, 2, 3)).pow(2).mean() + (z.std((0, 2, 3)) - 1).pow(2).mean()
        z = z + 0.1 * torch.randn(z.shape, generator=gen)
        y = model.taesd_decoder(z)
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + 0.02 * stats
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"autoencoder step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - began:.0f} s)")
    return model.eval()


def psnr(model: SlimTAESD, images: torch.Tensor) -> float:
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).float() / 255.0
        y = model.taesd_decoder(model.taesd_encoder(x)).clamp(0, 1)
        return float(10 * torch.log10(1 / (y - x).pow(2).mean()))
