"""Representation Autoencoder: a frozen representation encoder + a ViT decoder we train.

Latents are the encoder's patch tokens [B, tokens, encoder_dim]; the decoder maps them back
to ``image_size`` pixels. The encoder may run at its own input size (e.g. SigLIP 2 at 224 px
with patch 14 -> 16x16 tokens) while the decoder paints ``image_size = grid * decoder_patch``
pixels (e.g. 256 with patch 16), as in the RAE paper. Encoding resizes input images to the
encoder's size, so ``encode`` takes images of ``image_size``.

Saved layout (``rep.save(dir)``): ``representation.json``, ``decoder.safetensors``,
``latent_stats.safetensors`` and ``encoder/`` (``save_pretrained`` of an HF encoder) or
``encoder.safetensors`` (state dict of a module encoder; loading needs the module again).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megafusion.vision.base import Representation, check_images
from megafusion.vision.encoders import (ENCODER_PATH_HELP, FrozenEncoder, HFEncoder, ModuleEncoder,
                                        load_hf_encoder)
from megafusion.vision.vit_decoder import ViTDecoder, ViTDecoderConfig

DECODER_FILE = "decoder.safetensors"


def noise_augment(latents: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """RAE decoder-training augmentation: latents + N(0, sigma^2), sigma ~ |N(0, tau^2)| per sample.

    Makes the decoder robust to the imperfect latents a diffusion model samples.
    """
    if tau <= 0:
        return latents
    shape = (latents.shape[0],) + (1,) * (latents.ndim - 1)
    sigma = (torch.randn(shape, generator=generator, device=latents.device, dtype=latents.dtype) * tau).abs()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + sigma * noise


class RAERepresentation(Representation):
    kind = "rae"

    def __init__(self, encoder: FrozenEncoder, image_size: int | None = None, decoder: dict[str, Any] | None = None
                 ) -> None:
        """``decoder``: ViTDecoderConfig fields (hidden_size, depth, num_heads, mlp_ratio); patch size and grid
        follow from the encoder's token count and ``image_size`` (default: the encoder's input size)."""
        super().__init__()
        self.encoder = encoder
        num_tokens, dim = encoder.token_shape()
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"the encoder returns {num_tokens} tokens, not a square grid; the ViT decoder needs one")
        image_size = int(image_size or encoder.input_size)
        if image_size % grid:
            raise ValueError(f"RAE image_size={image_size} must be a multiple of the encoder's token grid ({grid})")
        fields = dict(decoder or {})
        fields.pop("latent_dim", None), fields.pop("grid", None)
        fields["patch_size"] = image_size // grid
        self.decoder = ViTDecoder(ViTDecoderConfig(latent_dim=dim, grid=grid, **fields))

    @property
    def image_size(self) -> int:
        return self.decoder.cfg.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.decoder.cfg.grid ** 2

    @property
    def latent_dim(self) -> int:
        return self.decoder.cfg.latent_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_size)
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder output in [-1, 1] pixel space, unclamped (the training target space)."""
        return self.decoder(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.decoder(latents) + 1) / 2).clamp(0, 1)

    def config(self) -> dict[str, Any]:
        dec = self.decoder.cfg.to_dict()
        return {"image_size": self.image_size, "encoder": self.encoder.describe(),
                "decoder": {k: dec[k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio")}}

    # --- persistence ---------------------------------------------------------------
    def _save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.decoder.state_dict().items()},
                  str(directory / DECODER_FILE))
        if isinstance(self.encoder, HFEncoder):
            if Path(self.encoder.source).resolve() != (directory / "encoder").resolve():
                self.encoder.model.save_pretrained(directory / "encoder")
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.encoder.module.state_dict().items()},
                      str(directory / "encoder.safetensors"))

    def load_decoder_weights(self, path: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        self.decoder.load_state_dict(load_file(str(path)))

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any], encoder: nn.Module | None = None,
                   **overrides: Any) -> "RAERepresentation":
        enc_conf = config["encoder"]
        if enc_conf["type"] == "hf":
            frozen = load_hf_encoder(directory / "encoder", input_size=enc_conf["input_size"],
                                     final_norm_affine=enc_conf["final_norm_affine"],
                                     mean=enc_conf["mean"], std=enc_conf["std"])
        else:
            if encoder is None:
                raise ValueError(f"'{directory}' holds an RAE whose encoder is a plain module "
                                 f"({enc_conf.get('class')}); pass encoder=<that nn.Module> to load it "
                                 "(its weights are restored from encoder.safetensors)")
            from safetensors.torch import load_file

            module = encoder.module if isinstance(encoder, ModuleEncoder) else encoder
            module.load_state_dict(load_file(str(directory / "encoder.safetensors")))
            frozen = ModuleEncoder(module, enc_conf["input_size"], enc_conf["mean"], enc_conf["std"])
        image_size = overrides.pop("image_size", None) or config["image_size"]
        if image_size != config["image_size"] or overrides.pop("decoder", None):
            raise ValueError(f"the RAE saved in '{directory}' decodes {config['image_size']}px images with its "
                             "trained decoder; image_size/decoder cannot change (train a new decoder instead)")
        if overrides:
            raise TypeError(f"unexpected arguments for a saved RAE: {sorted(overrides)} (patch_size applies to "
                            "pixel/vae; an RAE's token grid comes from its encoder)")
        rep = cls(frozen, image_size=image_size, decoder=config["decoder"])
        rep.load_decoder_weights(directory / DECODER_FILE)
        rep.load_stats_from(directory)
        return rep


def build_rae(path: str | os.PathLike | None = None, encoder: nn.Module | None = None, image_size: int | None = None,
              decoder: dict[str, Any] | None = None, encoder_input_size: int | None = None,
              final_norm_affine: bool = False, mean=None, std=None) -> RAERepresentation:
    """A fresh RAE (untrained decoder) on an HF encoder directory ``path`` or a module ``encoder``.

    For a module encoder, ``encoder_input_size`` defaults to ``image_size`` and mean/std to
    identity (the module sees images in [0, 1]).
    """
    if encoder is not None:
        if not isinstance(encoder, FrozenEncoder):
            size = encoder_input_size or image_size
            if size is None:
                raise ValueError("an RAE on a module encoder needs image_size= (or encoder_input_size=)")
            encoder = ModuleEncoder(encoder, size, mean or (0.0, 0.0, 0.0), std or (1.0, 1.0, 1.0))
        return RAERepresentation(encoder, image_size=image_size, decoder=decoder)
    if path is None:
        raise ValueError(f"load_representation('rae') needs an encoder: {ENCODER_PATH_HELP}")
    frozen = load_hf_encoder(path, input_size=encoder_input_size, final_norm_affine=final_norm_affine,
                             mean=mean, std=std)
    return RAERepresentation(frozen, image_size=image_size, decoder=decoder)
