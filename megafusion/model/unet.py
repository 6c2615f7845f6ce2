"""U-Net down/up patch adapters (``model.patch_adapter: unet``), Transfusion's alternative
to the linear patch embedding.

The latent tokens of one image or frame ``[T, p*p*c]`` are first laid back out as a map
``[c, g*p, g*p]`` (``unpatchify``; g*g = T, p = the representation's patch size). The
down path runs time-conditioned residual conv blocks and halves the resolution
log2(p) times, down to one vector per token ``[hidden, g, g]``; the up path mirrors it
from the transformer's output back to ``[c, g*p, g*p]`` and patchifies again. There are
no long skip connections: the down path lives on the first pipeline stage and the up path
on the last. For RAE latents (p = 1) both paths are a single residual block at token
resolution.

Conv weights are redrawn by ``megafusion.model.init`` (by checkpoint key) like every other
matrix; norms and biases start at their defaults (ones/zeros), so every layout starts equal.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from megafusion.model.embeddings import TimestepEmbedding
from megafusion.vision.base import patchify, unpatchify


def _zero_bias(module: nn.Module) -> nn.Module:
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, + time, GroupNorm-SiLU-Conv3x3, plus a (1x1) skip.

    [n, c_in, H, W] and time features [n, time_dim] -> [n, c_out, H, W].
    """

    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = _zero_bias(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.time = _zero_bias(nn.Linear(time_dim, c_out))
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = _zero_bias(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = _zero_bias(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(time)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _levels(patch_size: int) -> int:
    levels = int(math.log2(patch_size)) if patch_size >= 1 else -1
    if levels < 0 or 2 ** levels != patch_size:
        raise ValueError(f"the U-Net patch adapter halves the resolution per level and needs a power-of-two "
                         f"patch size; the representation has patch size {patch_size}")
    return levels


class UNetDown(nn.Module):
    """Latent tokens of n images [n, T, p*p*c] + timesteps [n] -> transformer inputs [n, T, hidden]."""

    def __init__(self, channels: int, patch_size: int, hidden_size: int, base_channels: int = 32) -> None:
        super().__init__()
        self.channels, self.patch_size = channels, patch_size
        self.time_embed = TimestepEmbedding(base_channels)
        self.conv_in = _zero_bias(nn.Conv2d(channels, base_channels, 3, padding=1))
        self.blocks = nn.ModuleList(ResBlock(base_channels, base_channels, base_channels)
                                    for _ in range(_levels(patch_size) + 1))
        self.downs = nn.ModuleList(_zero_bias(nn.Conv2d(base_channels, base_channels, 3, stride=2, padding=1))
                                   for _ in range(_levels(patch_size)))
        self.proj = _zero_bias(nn.Conv2d(base_channels, hidden_size, 1))

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, T, _ = latents.shape
        time = self.time_embed(t)
        x = self.conv_in(unpatchify(latents, self.patch_size, self.channels))
        for k, block in enumerate(self.blocks):
            x = block(x, time)
            if k < len(self.downs):
                x = self.downs[k](x)
        return self.proj(x).flatten(2).transpose(1, 2)  # [n, g*g, hidden], row-major like patchify


class UNetUp(nn.Module):
    """Transformer outputs [n, T, hidden] + timesteps [n] -> latent predictions [n, T, p*p*c]."""

    def __init__(self, channels: int, patch_size: int, hidden_size: int, base_channels: int = 32) -> None:
        super().__init__()
        self.channels, self.patch_size = channels, patch_size
        self.time_embed = TimestepEmbedding(base_channels)
        self.proj = _zero_bias(nn.Conv2d(hidden_size, base_channels, 1))
        self.ups = nn.ModuleList(_zero_bias(nn.Conv2d(base_channels, base_channels, 3, padding=1))
                                 for _ in range(_levels(patch_size)))
        self.blocks = nn.ModuleList(ResBlock(base_channels, base_channels, base_channels)
                                    for _ in range(_levels(patch_size) + 1))
        self.norm_out = nn.GroupNorm(_groups(base_channels), base_channels)
        self.conv_out = _zero_bias(nn.Conv2d(base_channels, channels, 3, padding=1))

    def forward(self, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, T, h = hidden.shape
        g = math.isqrt(T)
        time = self.time_embed(t)
        x = self.proj(hidden.transpose(1, 2).reshape(n, h, g, g))
        for k, block in enumerate(self.blocks):
            x = block(x, time)
            if k < len(self.ups):
                x = self.ups[k](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.conv_out(F.silu(self.norm_out(x)))
        return patchify(x, self.patch_size)


def latent_layout(representation) -> tuple[int, int]:
    """(channels, patch size) of a representation's tokens: pixel (3, p), vae (c, p), rae (C, 1)."""
    patch = int(getattr(representation, "patch_size", 1)) if representation.kind in ("pixel", "vae") else 1
    channels = representation.latent_dim // (patch * patch)
    if channels * patch * patch != representation.latent_dim:
        raise ValueError(f"latent_dim {representation.latent_dim} is not channels * {patch}^2")
    return channels, patch
