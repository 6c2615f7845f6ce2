"""Small input/output adapters of the Transfusion model: latent patches in and out, and
the diffusion timestep embedding.

They are replicated across tensor-parallel ranks (plain ``nn.Linear``) and applied to the
*whole* sequence: ``PatchIn``/``TimestepEmbedding`` before the sequence-parallel scatter,
``PatchOut`` after the gather, so every TP rank computes identical gradients for them and
no extra all-reduce is needed. Biases start at zero so that every parallel layout starts
from the same model (``megafusion.model.init`` redraws the matrices by checkpoint key).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _zero_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class PatchIn(nn.Module):
    """Linear patch embedding: latents [..., C] -> [..., hidden]."""

    def __init__(self, latent_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = _zero_bias(nn.Linear(latent_dim, hidden_size))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents)


class PatchOut(nn.Module):
    """Linear latent head: hidden [..., hidden] -> [..., C] (the flow-matching prediction)."""

    def __init__(self, hidden_size: int, latent_dim: int) -> None:
        super().__init__()
        self.proj = _zero_bias(nn.Linear(hidden_size, latent_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
                         ) -> torch.Tensor:
    """[...] timesteps in [0, 1] -> [..., dim] float32 (DiT's frequency embedding of ``scale * t``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """t [...] in [0, 1] -> [..., hidden]: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            _zero_bias(nn.Linear(frequency_dim, hidden_size)),
            nn.SiLU(),
            _zero_bias(nn.Linear(hidden_size, hidden_size)),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def rope_coordinates(positions: torch.Tensor, span_ids: torch.Tensor, grid_width: int) -> torch.Tensor:
    """2-D RoPE coordinates (``model.image_positions: 2d``), M-RoPE style: [3, b, s] int64.

    The three axes are (time, row, column). A text position uses its 1-D position on every
    axis, so text rotates exactly as with 1-D RoPE. Patch k of an image/frame span whose
    first patch sits at 1-D position p0 gets (p0, p0 + k // grid_width, p0 + k % grid_width):
    patches of one row share a row coordinate, one column a column coordinate, and every
    frame of a video has its own time p0. ``positions``/``span_ids``: [b, s] (``Sample``);
    spans are contiguous and laid out row-major (``megafusion.vision`` patchify order).
    """
    b, s = positions.shape
    index = torch.arange(s, device=positions.device).expand(b, s)
    is_latent = span_ids >= 0
    previous = torch.cat([torch.full_like(span_ids[:, :1], -1), span_ids[:, :-1]], dim=1)
    starts = is_latent & (span_ids != previous)
    start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    k = index - start_index
    p0 = positions.gather(1, start_index)
    time = torch.where(is_latent, p0, positions)
    row = torch.where(is_latent, p0 + k // grid_width, positions)
    col = torch.where(is_latent, p0 + k % grid_width, positions)
    return torch.stack([time, row, col])
