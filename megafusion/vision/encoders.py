"""Frozen representation encoders for the RAE: HF DINOv2 / SigLIP / SigLIP 2 from a local
directory, or any ``nn.Module`` that returns tokens.

Every encoder here takes images float [B, 3, H, W] in [0, 1], resizes them (bicubic) to the
encoder's input size, applies the encoder's pixel mean/std and returns patch tokens
[B, num_tokens, dim] with class/register tokens removed. Nothing is ever downloaded:
HF weights load with ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# model_type in config.json -> family handled below
HF_FAMILIES = {
    "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
    "siglip": "siglip", "siglip_vision_model": "siglip",
    "siglip2": "siglip2", "siglip2_vision_model": "siglip2",
}

ENCODER_PATH_HELP = (
    "pass path=<a local directory with config.json and model.safetensors of a DINOv2, SigLIP or SigLIP 2 model "
    "(e.g. made with `huggingface-cli download google/siglip2-so400m-patch14-224 --local-dir DIR` on a machine "
    "with internet access)>, or path=<a directory written by rep.save()>, or encoder=<an nn.Module returning "
    "[B, tokens, dim]>")


class FrozenEncoder(nn.Module):
    """Shared resize + pixel normalisation; subclasses implement ``_tokens``."""

    def __init__(self, input_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._shape: tuple[int, int] | None = None

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, num_tokens, dim] (no gradient: the encoder is frozen)."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic",
                                   align_corners=False)
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        return self._tokens(pixels)

    def token_shape(self) -> tuple[int, int]:
        """(num_tokens, dim), measured once with a dummy forward."""
        if self._shape is None:
            p = next(iter(self.parameters()), None)
            dummy = torch.zeros(1, 3, self.input_size, self.input_size,
                                device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
            out = self(dummy)
            if out.ndim != 3:
                raise ValueError(f"encoder must return tokens [B, tokens, dim], got shape {tuple(out.shape)}")
            self._shape = (out.shape[1], out.shape[2])
        return self._shape

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen: never in training mode (dropout, etc.)


class ModuleEncoder(FrozenEncoder):
    """Any module mapping normalised pixels [B, 3, S, S] to tokens [B, tokens, dim]."""

    def __init__(self, module: nn.Module, input_size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> None:
        super().__init__(input_size, tuple(mean), tuple(std))
        self.module = module.eval().requires_grad_(False)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels)

    def describe(self) -> dict[str, Any]:
        return {"type": "module", "class": type(self.module).__qualname__, "input_size": self.input_size,
                "mean": self.pixel_mean.flatten().tolist(), "std": self.pixel_std.flatten().tolist()}


def _final_norm(model: nn.Module) -> nn.LayerNorm:
    for owner in (model, getattr(model, "vision_model", None)):
        for name in ("layernorm", "post_layernorm"):
            norm = getattr(owner, name, None) if owner is not None else None
            if isinstance(norm, nn.LayerNorm):
                return norm
    raise ValueError(f"cannot find the final LayerNorm of {type(model).__name__}")


class HFEncoder(FrozenEncoder):
    """A DINOv2 (with or without registers), SigLIP or SigLIP 2 vision tower from ``transformers``.

    ``final_norm_affine=False`` (the RAE recipe) keeps the final LayerNorm's normalisation but
    drops its learned scale/shift, done with a forward hook so the weights stay untouched
    and ``save_pretrained`` writes the original model.
    """

    def __init__(self, model: nn.Module, family: str, input_size: int, mean, std, final_norm_affine: bool = False,
                 source: str = "") -> None:
        super().__init__(input_size, tuple(mean), tuple(std))
        self.model = model.eval().requires_grad_(False)
        self.family = family
        self.final_norm_affine = bool(final_norm_affine)
        self.source = source
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        if input_size % self.patch_size:
            raise ValueError(f"encoder input size {input_size} is not divisible by its patch size {self.patch_size}")
        self.skip_tokens = 0
        if family == "dinov2":
            self.skip_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) if cfg.model_type ==
                                       "dinov2_with_registers" else 0)
        for owner in (self.model, getattr(self.model, "vision_model", None)):
            if hasattr(owner, "use_head"):
                owner.use_head = False  # SigLIP's pooling head: unused by the RAE, skip its compute
        if not self.final_norm_affine:
            norm = _final_norm(self.model)
            norm.register_forward_hook(
                lambda mod, args, out: F.layer_norm(args[0], mod.normalized_shape, None, None, mod.eps))

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.model.dtype)
        if self.family == "siglip2":
            from megafusion.vision.base import patchify

            b, grid = pixels.shape[0], self.input_size // self.patch_size
            out = self.model(pixel_values=patchify(pixels, self.patch_size),
                             pixel_attention_mask=torch.ones(b, grid * grid, dtype=torch.long, device=pixels.device),
                             spatial_shapes=torch.tensor([[grid, grid]] * b, device=pixels.device))
        elif self.family == "siglip":
            resized = self.input_size != self.model.config.image_size
            out = self.model(pixel_values=pixels, interpolate_pos_encoding=resized)
        else:  # DINOv2 interpolates its position embeddings itself
            out = self.model(pixel_values=pixels)
        return out.last_hidden_state[:, self.skip_tokens:]

    def describe(self) -> dict[str, Any]:
        return {"type": "hf", "family": self.family, "model_type": self.model.config.model_type,
                "input_size": self.input_size, "mean": self.pixel_mean.flatten().tolist(),
                "std": self.pixel_std.flatten().tolist(), "final_norm_affine": self.final_norm_affine,
                "source": self.source}


def _pixel_stats(path: Path, family: str) -> tuple[tuple, tuple]:
    pre = path / "preprocessor_config.json"
    if pre.exists():
        conf = json.loads(pre.read_text())
        if "image_mean" in conf and "image_std" in conf:
            return tuple(conf["image_mean"]), tuple(conf["image_std"])
    return (IMAGENET_MEAN, IMAGENET_STD) if family == "dinov2" else (SIGLIP_MEAN, SIGLIP_STD)


def load_hf_encoder(path: str | os.PathLike, input_size: int | None = None, final_norm_affine: bool = False,
                    mean=None, std=None, dtype: torch.dtype = torch.float32) -> HFEncoder:
    """Load a frozen DINOv2 / SigLIP / SigLIP 2 vision encoder from a local directory.

    ``input_size`` defaults to min(image_size, 224) for DINOv2 (its checkpoints say 518, RAE uses 224), the
    checkpoint's ``image_size`` for SigLIP and ``sqrt(num_patches) * patch`` for SigLIP 2.
    A full SigLIP / SigLIP 2 checkpoint (vision + text) is accepted: the vision tower is taken.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"RAE encoder directory '{path}' {what}; {ENCODER_PATH_HELP}")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the RAE's DINOv2/SigLIP encoders need the optional dependency `transformers`: "
                          "pip install transformers") from err
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    family = HF_FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"'{path / 'config.json'}' has model_type={config.model_type!r}; the RAE supports "
                         f"{sorted(HF_FAMILIES)} (or pass encoder=<nn.Module>)")
    vision_config = getattr(config, "vision_config", config)
    cls = {"dinov2": transformers.Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers"
           else transformers.Dinov2Model,
           "siglip": transformers.SiglipVisionModel, "siglip2": transformers.Siglip2VisionModel}[family]
    # an explicit dtype: transformers 5 otherwise keeps a bf16 checkpoint in bf16
    model = cls.from_pretrained(path, config=vision_config, local_files_only=True).to(dtype)
    if input_size is None:
        if family == "dinov2":
            size = min(int(vision_config.image_size), 224)
            input_size = size - size % vision_config.patch_size
        elif family == "siglip":
            input_size = vision_config.image_size
        else:
            input_size = int(round(vision_config.num_patches ** 0.5)) * vision_config.patch_size
    default_mean, default_std = _pixel_stats(path, family)
    return HFEncoder(model, family, int(input_size), mean or default_mean, std or default_std,
                     final_norm_affine=final_norm_affine, source=str(path))
