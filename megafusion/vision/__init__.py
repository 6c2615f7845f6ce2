"""Visual representations: images <-> continuous latent tokens for the Transfusion model.

    rep = load_representation("pixel" | "rae" | "vae", path=None, **kw)
    latents = rep.encode(images)          # images float [B, 3, S, S] in [0, 1], S = rep.image_size
                                          # -> [B, rep.tokens_per_image, rep.latent_dim]
    z = rep.normalize(latents)            # dataset statistics, before diffusion
    images = rep.decode(rep.denormalize(z))
    rep.save(dir); load_representation("auto", dir)

Kinds and their keyword arguments:
- ``pixel``: image_size, patch_size.
- ``rae``: path (HF DINOv2/SigLIP/SigLIP 2 directory) or encoder (nn.Module), image_size,
  decoder (ViT decoder fields), encoder_input_size, final_norm_affine, mean, std.
- ``vae``: path (AutoencoderKL directory) or vae / vae_config, image_size, patch_size,
  sample_posterior.

``path`` may also be a directory written by ``rep.save`` (or a ``megafusion train-decoder``
run directory, whose ``representation/`` is used); then kw only overrides saved settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megafusion.vision.base import MANIFEST, Representation, read_manifest


@dataclass(frozen=True)
class RepresentationKind:
    build: Callable[..., Representation]        # build(path, **kw): a fresh one
    from_saved: Callable[..., Representation]   # from_saved(directory, config, **kw): a saved one


def _pixel_build(path=None, **kw):
    from megafusion.vision.pixel import PixelRepresentation

    if path is not None:
        raise ValueError(f"'{path}' is not a saved pixel representation (no representation.json); the pixel "
                         "representation has no weights: pass path=None with image_size= and patch_size=")
    return PixelRepresentation(**kw)


def _pixel_saved(directory, config, **kw):
    from megafusion.vision.pixel import PixelRepresentation

    return PixelRepresentation.from_saved(directory, config, **kw)


def _rae_build(path=None, **kw):
    from megafusion.vision.rae import build_rae

    return build_rae(path, **kw)


def _rae_saved(directory, config, **kw):
    from megafusion.vision.rae import RAERepresentation

    return RAERepresentation.from_saved(directory, config, **kw)


def _vae_build(path=None, **kw):
    from megafusion.vision.vae import build_vae

    return build_vae(path, **kw)


def _vae_saved(directory, config, **kw):
    from megafusion.vision.vae import VAERepresentation

    return VAERepresentation.from_saved(directory, config, **kw)


REGISTRY: dict[str, RepresentationKind] = {
    "pixel": RepresentationKind(_pixel_build, _pixel_saved),
    "rae": RepresentationKind(_rae_build, _rae_saved),
    "vae": RepresentationKind(_vae_build, _vae_saved),
}


def register_representation(name: str, build: Callable[..., Representation],
                            from_saved: Callable[..., Representation]) -> None:
    """Add a representation kind (its class must set ``kind = name`` so saved copies load back)."""
    REGISTRY[name] = RepresentationKind(build, from_saved)


def load_representation(kind: str, path: str | os.PathLike | None = None, **kw: Any) -> Representation:
    """Build or load a representation; ``kind="auto"`` takes the kind from a saved directory."""
    if kind != "auto" and kind not in REGISTRY:
        raise ValueError(f"unknown representation kind {kind!r}; choose one of {sorted(REGISTRY)} (or 'auto' "
                         "with the path of a saved representation)")
    if path is not None:
        directory = Path(path)
        if not directory.exists():
            raise FileNotFoundError(f"representation path '{directory}' does not exist; pass the directory of a "
                                    f"saved representation (with {MANIFEST}) or, for 'rae'/'vae', of the "
                                    "pretrained encoder/VAE weights")
        if read_manifest(directory) is None and read_manifest(directory / "representation") is not None:
            directory = directory / "representation"   # a train-decoder run directory
        manifest = read_manifest(directory)
        if manifest is not None:
            if kind not in ("auto", manifest["kind"]):
                raise ValueError(f"'{directory / MANIFEST}' holds a {manifest['kind']!r} representation, "
                                 f"not {kind!r}; pass kind={manifest['kind']!r} or 'auto'")
            return REGISTRY[manifest["kind"]].from_saved(directory, manifest["config"], **kw)
    if kind == "auto":
        raise FileNotFoundError(f"kind='auto' needs the path of a saved representation (a directory with "
                                f"{MANIFEST}); got {path!r}")
    return REGISTRY[kind].build(path, **kw)


__all__ = ["Representation", "RepresentationKind", "REGISTRY", "load_representation",
           "register_representation"]


def representation_from_config(vision) -> Representation:
    """The representation a run's ``vision:`` section names (``megafusion.config.VisionConfig``)."""
    kw: dict[str, Any] = {"image_size": vision.image_size}
    if vision.representation in ("pixel", "vae"):
        kw["patch_size"] = vision.patch_size
    return load_representation(vision.representation, vision.path, **kw)
