"""Raw pixels patchified: the baseline representation with no learned encoder.

latents = patchify(2 * images - 1, p): tokens = (image_size / p)^2, dim = 3 * p^2, values
in [-1, 1] (the usual range for pixel-space diffusion; dataset statistics refine it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megafusion.vision.base import Representation, check_images, patchify, unpatchify


class PixelRepresentation(Representation):
    kind = "pixel"

    def __init__(self, image_size: int = 64, patch_size: int = 8) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"pixel representation: image_size={image_size} must be divisible by "
                             f"patch_size={patch_size}")
        self._image_size = int(image_size)
        self.patch_size = int(patch_size)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def tokens_per_image(self) -> int:
        return (self._image_size // self.patch_size) ** 2

    @property
    def latent_dim(self) -> int:
        return 3 * self.patch_size ** 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self._image_size)
        return patchify(images * 2 - 1, self.patch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = unpatchify(latents, self.patch_size, 3)
        return ((images + 1) / 2).clamp(0, 1)

    def config(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "patch_size": self.patch_size}

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any], **overrides: Any) -> "PixelRepresentation":
        rep = cls(**{**config, **overrides})
        rep.load_stats_from(directory)
        return rep
