"""Image sources for decoder training and latent statistics: a folder of images, ShapesWorld
scenes, or simple synthetic shapes. Every source yields float [3, S, S] tensors in [0, 1].

``open_image_source(spec, image_size, seed)`` takes ``spec`` = a directory path,
``"shapes"`` (megafusion.data.shapes, 32 or 64 px) or ``"synthetic"`` (random coloured
rectangles and discs on a random background, any size, no dependencies).

``save_grid`` writes sample grids (PNG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def synthetic_shapes(rng: np.random.Generator, image_size: int, max_shapes: int = 4) -> np.ndarray:
    """[S, S, 3] uint8: 1..max_shapes random rectangles/discs in random colours on a random flat colour."""
    s = image_size
    image = np.empty((s, s, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0:s, 0:s]
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        color = rng.integers(0, 256, size=3)
        cx, cy = rng.uniform(0, s, size=2)
        r = rng.uniform(s / 10, s / 3)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            rx, ry = rng.uniform(s / 10, s / 3, size=2)
            mask = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        image[mask] = color
    return image


def load_image(source, image_size: int) -> np.ndarray:
    """An image file (a path or a binary file object) as RGB uint8 [S, S, 3]: the shorter side
    resized to S (bicubic), then centre-cropped. PIL's errors for missing or corrupt files pass through."""
    from PIL import Image

    with Image.open(source) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        return np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [S, S, 3] -> float [3, S, S] in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # np.array: a writable copy


class GeneratedImages(Dataset):
    """``length`` images drawn deterministically from ``seed`` (item i uses seed (seed, i))."""

    def __init__(self, kind: str, image_size: int, length: int, seed: int = 0) -> None:
        if kind == "shapes":
            try:
                from megafusion.data.shapes.scene import render_scene, sample_scene
            except ImportError as err:
                raise ImportError("data 'shapes' needs megafusion.data.shapes (ShapesWorld); use 'synthetic' or "
                                  "a folder of images") from err
            self._draw = lambda rng: render_scene(sample_scene(rng, image_size))
        elif kind == "synthetic":
            self._draw = lambda rng: synthetic_shapes(rng, image_size)
        else:
            raise ValueError(f"unknown generated image kind {kind!r}; use 'shapes' or 'synthetic'")
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(self._draw(np.random.default_rng((self.seed, i))))


class ImageFolder(Dataset):
    """Images under ``root`` (recursive, sorted), resized on the short side and centre-cropped to S x S."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist; pass a directory of "
                                    f"{'/'.join(IMAGE_SUFFIXES)} files, 'shapes' or 'synthetic'")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under '{self.root}'")
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(load_image(self.files[i], self.image_size))


def open_image_source(spec: str, image_size: int, length: int = 10_000, seed: int = 0) -> Dataset:
    """A dataset for ``spec`` (folder path, 'shapes' or 'synthetic'); ``length``/``seed`` apply to generated data."""
    if spec in ("shapes", "synthetic"):
        return GeneratedImages(spec, image_size, length, seed)
    return ImageFolder(spec, image_size)


# ----------------------------------------------------------------------------- grids


def as_uint8(image) -> np.ndarray:
    """An [H, W, 3] image as uint8 (floats are read as [0, 1])."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_grid(images: Sequence[np.ndarray], path: str | Path, ncols: int | None = None, pad: int = 2,
              scale: int = 4) -> Path:
    """Saves [H, W, 3] images (uint8 or float in [0, 1]) as one PNG grid, upscaled ``scale``x
    by pixel repetition so small renders stay crisp; grey padding between tiles."""
    if not len(images):
        raise ValueError("save_grid: no images")
    tiles = [np.repeat(np.repeat(as_uint8(im), scale, 0), scale, 1) for im in images]
    h, w = tiles[0].shape[:2]
    ncols = ncols or int(np.ceil(np.sqrt(len(tiles))))
    nrows = int(np.ceil(len(tiles) / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = t
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from megafusion.data.shapes.export import save_png  # numpy/PIL only

    save_png(grid, path)
    return path
