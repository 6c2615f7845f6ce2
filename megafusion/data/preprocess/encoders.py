"""Images/frames -> what the visual store holds: pixel patches (uint8) or encoder latents (float16).

Both encoders take a batch of uint8 ``[B, H, W, 3]`` images and return, per image, a
``[tokens, dim]`` array and its ``(grid_h, grid_w)`` patch grid. Pixel patches are in
``megafusion.vision``'s patchify order, so the pixel representation reads them back as is.
"""

from __future__ import annotations

import numpy as np

from megafusion.data.preprocess.config import PreprocessConfig, PreprocessError


class PixelEncoder:
    """Raw pixels: uint8 patches (normalised to [-1, 1] when read back)."""

    storage = "uint8"

    def __init__(self, patch_size: int):
        self.patch = patch_size
        self.dim = 3 * patch_size * patch_size

    def encode(self, images: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """[B, H, W, 3] uint8 -> per image ([T, C] uint8, (grid_h, grid_w)): patches in raster
        order, (row, col, channel) inside (``megafusion.vision.base.patchify``)."""
        import torch

        from megafusion.vision.base import patchify

        grid = (images.shape[1] // self.patch, images.shape[2] // self.patch)
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # np.array: a writable copy
        return [(patches, grid) for patches in patchify(x, self.patch).numpy()]


class RepresentationEncoder:
    """Latents from ``megafusion.vision`` (RAE or VAE), stored as float16."""

    storage = "float16"

    def __init__(self, kind: str, path: str | None, image_size: int):
        try:
            from megafusion.vision import load_representation
        except ImportError as err:
            raise PreprocessError(f"--encoder {kind} needs megafusion.vision.load_representation, which is not "
                                  f"available in this build ({err}); use --encoder pixel") from err
        import torch

        self.torch = torch
        self.rep = load_representation(kind, path)
        if getattr(self.rep, "image_size", image_size) != image_size:
            raise PreprocessError(f"the {kind} representation at {path} encodes {self.rep.image_size}px images; "
                                  f"pass --image-size {self.rep.image_size}")
        self.rep.eval()
        self.dim = getattr(self.rep, "latent_dim", None)

    def encode(self, images: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            z = self.rep.encode(x)  # [B, T, D]
        z = z.float().cpu().numpy()
        t = z.shape[1]
        side = int(round(t ** 0.5))
        grid = (side, side) if side * side == t else (t, 1)
        self.dim = z.shape[2]
        return [(zi, grid) for zi in z]


def make_encoder(cfg: PreprocessConfig):
    return PixelEncoder(cfg.patch_size) if cfg.encoder == "pixel" else RepresentationEncoder(cfg.encoder, cfg.encoder_path, cfg.image_size)
