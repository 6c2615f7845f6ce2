"""A KL autoencoder (diffusers' ``AutoencoderKL``, an optional dependency) with its latents
patchified to tokens.

latent map [B, C, H/f, W/f] (f = 2^(len(block_out_channels)-1)) -> patchify by ``patch_size``
-> tokens [B, (H/(f*p))^2, C*p^2]. Encoding takes the posterior mean by default
(``sample_posterior=True`` draws from it). The VAE's own scaling/shift factors are not
applied: the representation's per-channel statistics take their place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megafusion.vision.base import Representation, check_images, patchify, unpatchify

VAE_PATH_HELP = (
    "pass path=<a local directory holding an AutoencoderKL config.json + weights (or a diffusers pipeline "
    "directory with a vae/ subfolder, e.g. made with `huggingface-cli download stabilityai/sd-vae-ft-ema "
    "--local-dir DIR` on a machine with internet access)>, or a directory written by rep.save(), or "
    "vae=<an AutoencoderKL>, or vae_config=<a dict of AutoencoderKL arguments> for a randomly initialised one")


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("the 'vae' representation needs the optional dependency `diffusers` "
                          "(pip install diffusers)") from err
    return diffusers


def load_autoencoder_kl(path: str | os.PathLike) -> nn.Module:
    """AutoencoderKL from a local directory (its own, or a pipeline's ``vae/`` subfolder); never downloads."""
    path = Path(path)
    sub = None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        sub = "vae"
    if not (path / "config.json").is_file() and sub is None:
        what = "does not exist" if not path.exists() else "has no config.json (nor vae/config.json)"
        raise FileNotFoundError(f"VAE directory '{path}' {what}; {VAE_PATH_HELP}")
    return _diffusers().AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)


class VAERepresentation(Representation):
    kind = "vae"

    def __init__(self, vae: nn.Module, image_size: int = 256, patch_size: int = 2, sample_posterior: bool = False
                 ) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        if image_size % (self.downsample * patch_size):
            raise ValueError(f"vae representation: image_size={image_size} must be divisible by "
                             f"downsample*patch_size = {self.downsample}*{patch_size}")
        self._image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.sample_posterior = bool(sample_posterior)

    def train(self, mode: bool = True) -> "VAERepresentation":
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def tokens_per_image(self) -> int:
        return (self._image_size // (self.downsample * self.patch_size)) ** 2

    @property
    def latent_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self._image_size)
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        z = posterior.sample() if self.sample_posterior else posterior.mean
        return patchify(z, self.patch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = unpatchify(latents, self.patch_size, self.latent_channels)
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def config(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "patch_size": self.patch_size,
                "sample_posterior": self.sample_posterior}

    def _save_weights(self, directory: Path) -> None:
        self.vae.save_pretrained(directory / "vae")

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any], **overrides: Any) -> "VAERepresentation":
        rep = cls(load_autoencoder_kl(directory / "vae"), **{**config, **overrides})
        rep.load_stats_from(directory)
        return rep


def build_vae(path: str | os.PathLike | None = None, vae: nn.Module | None = None,
              vae_config: dict[str, Any] | None = None, image_size: int = 256, patch_size: int = 2,
              sample_posterior: bool = False) -> VAERepresentation:
    if vae is None:
        if path is not None:
            vae = load_autoencoder_kl(path)
        elif vae_config is not None:
            vae = _diffusers().AutoencoderKL(**vae_config)
        else:
            raise ValueError(f"load_representation('vae') needs a VAE: {VAE_PATH_HELP}")
    return VAERepresentation(vae, image_size=image_size, patch_size=patch_size, sample_posterior=sample_posterior)
