"""The interface every visual representation implements, and the pieces they share.

A representation maps images to a sequence of continuous latent tokens and back:

    images  float [B, 3, H, W] in [0, 1]   (H = W = ``image_size``)
    latents float [B, tokens_per_image, latent_dim]

Per-channel latent statistics (mean/std over a dataset, computed by
``tools/compute_latent_stats.py``) live in the representation as float64 buffers and are
saved with it. ``normalize`` is applied before diffusion, ``denormalize`` after sampling.

A saved representation is a directory holding ``representation.json`` (kind + config),
``latent_stats.safetensors`` and whatever weights the kind needs.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

MANIFEST = "representation.json"
STATS_FILE = "latent_stats.safetensors"


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patch-internal order (py, px, c).

    The same order as MAE and SigLIP 2's NaFlex patches, so one helper serves pixels,
    VAE latents and the SigLIP 2 input.
    """
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image of size {h}x{w} is not divisible by patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, py, px, c
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p] (square grid by default)."""
    b, n, d = tokens.shape
    if d != patch * patch * channels:
        raise ValueError(f"token dim {d} != patch^2 * channels = {patch}^2 * {channels}")
    if grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, py, gw, px
    return x.reshape(b, channels, gh * patch, gw * patch)


def check_images(images: torch.Tensor, image_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"expected images of {image_size}x{image_size}, got {images.shape[-2]}x{images.shape[-1]}; "
            f"resize them first or build the representation with image_size={images.shape[-1]}"
        )


class Representation(nn.Module, ABC):
    """Base class: encode/decode plus the latent statistics shared by every kind.

    Subclasses set ``kind`` and implement ``encode``, ``decode``, the three size properties,
    ``config()`` (JSON-serialisable constructor arguments) and ``_save_weights`` /
    ``_from_saved`` for their own weights.
    """

    kind: str = ""

    def __init__(self) -> None:
        super().__init__()
        # Identity statistics until a dataset's are set; float64 so normalize/denormalize
        # invert to float64 precision.
        self.register_buffer("latent_mean", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("latent_std", torch.ones(0, dtype=torch.float64))

    # --- the interface -------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, image_size, image_size] in [0, 1] -> latents [B, tokens, dim] (unnormalised)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, tokens, dim] (unnormalised) -> images float [B, 3, image_size, image_size] in [0, 1]."""

    @property
    @abstractmethod
    def tokens_per_image(self) -> int: ...

    @property
    @abstractmethod
    def latent_dim(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this representation (weights aside)."""

    # --- statistics ----------------------------------------------------------------
    @property
    def has_stats(self) -> bool:
        return self.latent_mean.numel() > 0

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel statistics: mean/std of shape [latent_dim]; std must be > 0."""
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean.shape != (self.latent_dim,) or std.shape != (self.latent_dim,):
            raise ValueError(f"statistics must have shape [{self.latent_dim}] (latent_dim), "
                             f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("latent std must be > 0 in every channel; a constant channel needs a floor (eps)")
        device = self.latent_mean.device
        self.latent_mean = mean.to(device)
        self.latent_std = std.to(device)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """(latents - mean) / std per channel (last dim); identity while no statistics are set."""
        if not self.has_stats:
            return latents
        mean = self.latent_mean.to(device=latents.device, dtype=latents.dtype)
        std = self.latent_std.to(device=latents.device, dtype=latents.dtype)
        return (latents - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: latents * std + mean."""
        if not self.has_stats:
            return latents
        mean = self.latent_mean.to(device=latents.device, dtype=latents.dtype)
        std = self.latent_std.to(device=latents.device, dtype=latents.dtype)
        return latents * std + mean

    # --- persistence ---------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write manifest, statistics and weights into ``directory`` (created if needed)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._save_weights(out)
        self.save_stats(out)
        manifest = {"kind": self.kind, "config": self.config(),
                    "tokens_per_image": self.tokens_per_image, "latent_dim": self.latent_dim,
                    "image_size": self.image_size}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    def save_stats(self, directory: str | os.PathLike) -> None:
        """Write only the statistics file (removing a stale one when none are set)."""
        from safetensors.torch import save_file

        path = Path(directory) / STATS_FILE
        if self.has_stats:
            save_file({"mean": self.latent_mean.cpu().contiguous(), "std": self.latent_std.cpu().contiguous()},
                      str(path))
        elif path.exists():
            path.unlink()

    def _save_weights(self, directory: Path) -> None:
        """Save the kind's own weights into ``directory`` (nothing for weightless kinds)."""

    def load_stats_from(self, directory: str | os.PathLike) -> bool:
        """Load ``latent_stats.safetensors`` from ``directory`` if present; returns whether it was."""
        from safetensors.torch import load_file

        path = Path(directory) / STATS_FILE
        if not path.exists():
            return False
        stats = load_file(str(path))
        self.set_stats(stats["mean"], stats["std"])
        return True

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, image_size={self.image_size}, tokens_per_image={self.tokens_per_image}, "
                f"latent_dim={self.latent_dim}, stats={'set' if self.has_stats else 'identity'}")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``representation.json`` in ``directory``, or None if there is none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())
