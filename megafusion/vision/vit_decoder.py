"""A ViT decoder from encoder tokens back to pixels (the trained half of an RAE).

MAE-decoder shape: a linear projection of each token, fixed 2-D sin-cos positions, pre-norm
transformer blocks (torch's own ``nn.TransformerEncoderLayer``), a final norm and a linear
head to ``patch_size^2 * 3`` pixels per token, then un-patchify. Tokens sit on a square
``grid x grid`` lattice, so the output image is ``grid * patch_size`` pixels square.
Output pixels are in [-1, 1] space (unclamped while training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from megafusion.vision.base import unpatchify


@dataclass
class ViTDecoderConfig:
    latent_dim: int             # channels of the encoder tokens
    grid: int                   # tokens form a grid x grid lattice
    patch_size: int = 16        # pixels per token side in the output image
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViT decoder: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"ViT decoder: hidden_size={self.hidden_size} must be divisible by 4 "
                             "(2-D sin-cos position embedding)")

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, [grid*grid, dim] (row-major token order)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out_y = ys.flatten()[:, None] * omega[None]
    out_x = xs.flatten()[:, None] * omega[None]
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1).float()


class ViTDecoder(nn.Module):
    """tokens [B, grid^2, latent_dim] -> pixels [B, 3, grid*p, grid*p] in [-1, 1] space."""

    def __init__(self, cfg: ViTDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.register_buffer("pos", sincos_2d(cfg.grid, cfg.hidden_size)[None], persistent=False)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.num_heads, dim_feedforward=int(cfg.hidden_size * cfg.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.patch_size ** 2 * 3)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1:] != (self.cfg.grid ** 2, self.cfg.latent_dim):
            raise ValueError(f"ViT decoder expects tokens [B, {self.cfg.grid ** 2}, {self.cfg.latent_dim}], "
                             f"got {tuple(tokens.shape)}")
        h = self.embed(tokens) + self.pos.to(tokens.dtype)
        h = self.norm(self.blocks(h))
        return unpatchify(self.head(h), self.cfg.patch_size, 3)
