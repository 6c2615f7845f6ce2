"""The checks of :func:`megafusion.config.validate` that read the files a config names.

They run before any process group exists and read metadata only: whether a file is there,
a tokenizer's vocabulary size (sentencepiece loads its small ``.model`` file), an indexed
dataset's ``P.meta.json`` and whether it has a ``P.layout.npy`` (images or video), a saved
representation's ``representation.json``. Nothing is built: no model, no representation,
no data stream. Each problem is one line naming the config key it comes from; the
recipes build their streams from the same files once validate has accepted them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- cheap reads


def load_configured_tokenizer(path: str | None, type: str = "SentencePieceTokenizer"):
    """The tokenizer of ``data.tokenizer`` / ``data.tokenizer_type`` (None: the byte tokenizer).
    FileNotFoundError when the file is missing, ValueError (or the library's error) when it is no
    tokenizer."""
    from megafusion.data.tokenizer import load_tokenizer

    return load_tokenizer(path, type)


def tokenizer_vocab_size(path: str | None, type: str = "SentencePieceTokenizer") -> int:
    """The vocabulary size of ``data.tokenizer``, added special tokens included."""
    return load_configured_tokenizer(path, type).vocab_size


def dataset_tokenizer_map(prefix: str) -> dict[str, Any] | None:
    """The tokenizer mapping stored beside an indexed dataset (``P.tokenizer_map.json``, or the
    ``tokenizer`` entry of ``P.meta.json``); None for data preprocessed before it was stored."""
    from megafusion.data.indexed import meta_path

    path = Path(f"{prefix}.tokenizer_map.json")
    if path.is_file():
        return json.loads(path.read_text())
    meta = Path(meta_path(prefix))
    return (json.loads(meta.read_text()) if meta.is_file() else {}).get("tokenizer")


def is_remote(prefix: str) -> bool:
    """An object-storage prefix (``s3://...``): megatron-core reads it; nothing to look at here."""
    return "://" in str(prefix)


def dataset_missing(prefix: str) -> bool:
    """Whether the indexed dataset ``prefix`` lacks its ``.bin`` or ``.idx`` file."""
    return not is_remote(prefix) and not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file())


def dataset_meta(prefix: str) -> dict[str, Any]:
    """The dataset's ``P.meta.json`` ({} without one, as ``IndexedDocuments`` reads it)."""
    from megafusion.data.indexed import meta_path

    path = Path(meta_path(prefix))
    return json.loads(path.read_text()) if path.is_file() else {}


def dataset_is_multimodal(prefix: str) -> bool:
    """Whether the dataset holds images or video (it has a ``P.layout.npy``)."""
    from megafusion.data.indexed import layout_path

    return Path(layout_path(prefix)).is_file()


def representation_manifest(path: str) -> dict[str, Any] | None:
    """The ``representation.json`` of a saved representation at ``path`` (or in its
    ``representation/``, a train-decoder run directory); None for pretrained weights."""
    from megafusion.vision.base import read_manifest

    return read_manifest(path) or read_manifest(Path(path) / "representation")


def tokens_per_image(vision) -> int | None:
    """Latent tokens per image of the ``vision`` section's representation, where the config
    and a saved manifest tell it without building anything; None where only the built
    representation knows (pretrained RAE/VAE weights: their grids are square by construction)."""
    if vision.representation == "pixel":
        if vision.image_size % vision.patch_size:
            return None  # refused on its own
        return (vision.image_size // vision.patch_size) ** 2
    if vision.path is None or not Path(vision.path).exists():
        return None
    manifest = representation_manifest(vision.path)
    if manifest is None or "tokens_per_image" not in manifest:
        return None
    saved = manifest.get("config", {})
    if vision.representation == "rae":  # the encoder's token grid, whatever the image size
        return int(manifest["tokens_per_image"])
    same_size = manifest.get("image_size") == vision.image_size and saved.get("patch_size") == vision.patch_size
    return int(manifest["tokens_per_image"]) if same_size else None


def square_grid_width(tokens: int) -> int | None:
    """Patches per row of a square grid of ``tokens`` patches; None when it is not square."""
    width = math.isqrt(tokens)
    return width if width * width == tokens else None


# --------------------------------------------------------------------------- the checks


def square_grid_problem(tokens: int, what: str, hint: str = "") -> str | None:
    """The refusal of a setting (``what``) that needs square patch grids, None if it has one."""
    if square_grid_width(tokens) is not None:
        return None
    return f"{what} needs square patch grids; the representation has {tokens} tokens per image{hint}"


def file_problems(cfg, ok=lambda *keys: True) -> list[str]:
    """What the files a config names say against it: missing files (named by their key),
    a tokenizer or dataset vocabulary past ``model.vocab_size`` (an id past the embedding
    table would crash the step, on a GPU as a device assert), images in the text model's
    data, and settings that need square patch grids. ``ok(*keys)``: whether those keys'
    values were accepted (a check reading a refused value is skipped)."""
    m, d = cfg.model, cfg.data
    problems: list[str] = []
    tokenizer_read = d.kind == "indexed" or (d.kind == "shapes" and m.kind == "transfusion")
    tokenizer = None  # the configured tokenizer, once read
    if tokenizer_read and ok("data.tokenizer") and not (d.kind == "indexed" and d.tokenizer is None):
        try:
            tokenizer = load_configured_tokenizer(d.tokenizer, d.tokenizer_type)
            vocab = tokenizer.vocab_size
        except FileNotFoundError:
            problems.append(f"data.tokenizer = {d.tokenizer}: no such file; train one with tools/train_tokenizer.py "
                            "(the sentencepiece .model the data was preprocessed with) or, with data.tokenizer_type = "
                            "HuggingFaceTokenizer, give a Hugging Face tokenizer directory")
        except (ValueError, OSError, RuntimeError) as err:
            problems.append(f"data.tokenizer = {d.tokenizer}: {err}")
        else:
            if ok("model.vocab_size") and vocab > m.vocab_size:
                which = d.tokenizer if d.tokenizer is not None else "the byte tokenizer of data.tokenizer = null"
                from megafusion.data.tokenizer import padded_vocab_size

                problems.append(f"model.vocab_size = {m.vocab_size} is smaller than the tokenizer's {vocab} tokens "
                                f"({which}, added special tokens included); set model.vocab_size >= {vocab} and "
                                f"divisible by parallel.tp, e.g. {padded_vocab_size(vocab, 128, cfg.parallel.tp)} "
                                "(megatron's padding to a multiple of 128 * tp)")
    if d.kind == "indexed" and ok("data.paths"):
        for prefix in d.paths:
            if is_remote(prefix):
                continue
            if dataset_missing(prefix):
                problems.append(f"data.paths: no indexed dataset at {prefix}(.bin/.idx); make one with "
                                "tools/preprocess_data.py")
                continue
            meta = dataset_meta(prefix)
            made_with = meta.get("vocab_size")
            if made_with is not None and ok("model.vocab_size") and made_with > m.vocab_size:
                problems.append(f"data.paths: {prefix} was preprocessed with a {made_with}-token tokenizer "
                                f"({meta.get('tokenizer_model')}), more than model.vocab_size = {m.vocab_size}; "
                                "preprocess it with data.tokenizer or raise model.vocab_size")
            stored = dataset_tokenizer_map(prefix)
            if stored is not None and tokenizer is not None and ok("data.tokenizer", "data.tokenizer_type"):
                from megafusion.data.tokenizer import mapping_problem

                problem = mapping_problem(stored, tokenizer, f"data.paths: {prefix}",
                                          f"data.tokenizer = {d.tokenizer}")
                if problem:
                    problems.append(problem)
            if m.kind == "text" and dataset_is_multimodal(prefix):
                problems.append(f"data.paths: {prefix} holds images or video ({meta.get('kind', 'multimodal')} "
                                "data); model.kind = text reads text only: preprocess with --kind text, or train "
                                "model.kind = transfusion")
    if m.kind == "transfusion":
        problems += _vision_problems(cfg, ok)
    return problems


def _vision_problems(cfg, ok) -> list[str]:
    m, v = cfg.model, cfg.vision
    problems: list[str] = []
    if not ok("vision.representation", "vision.path", "vision.image_size", "vision.patch_size"):
        return problems
    if v.path is not None and not Path(v.path).exists():
        problems.append(f"vision.path = {v.path}: no such directory; give a saved representation (megafusion "
                        "train-decoder) or, for rae / vae, the pretrained encoder / VAE weights")
        return problems
    if v.representation == "pixel" and v.image_size % v.patch_size:
        problems.append(f"vision.image_size = {v.image_size} is not divisible by vision.patch_size = "
                        f"{v.patch_size} (pixel patches tile the image)")
    tokens = tokens_per_image(v)
    if tokens is None:
        return problems
    # 2d and 3d share the (time, row, column) coordinates of rope_coordinates, whose rows
    # and columns are those of a square grid; window reads the 3x3 patches around a place.
    if ok("model.image_positions") and m.image_positions in ("2d", "3d"):
        problems.append(square_grid_problem(tokens, f"model.image_positions = {m.image_positions}"))
    if ok("model.frame_conditioning") and m.frame_conditioning == "window":
        problems.append(square_grid_problem(tokens, "model.frame_conditioning = window", " (use previous)"))
    return [p for p in problems if p is not None]
