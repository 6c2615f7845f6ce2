"""The settings of a preprocessing run, the checks made before anything is written, and the errors.

``PreprocessConfig`` is what the command line fills in (``cli.py``); ``validate`` and
``prepare_output`` refuse bad settings, a bad tokenizer and a bad output prefix up front, so
that a mistake is one line (exit 2) and leaves no files behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megafusion.data.preprocess.digests import tree_digest

KINDS = ("text", "image-text", "video", "action-video")
ENCODERS = ("pixel", "rae", "vae")


class PreprocessError(RuntimeError):
    """A bad input item under ``strict``, or inconsistent settings/shards."""


class ItemError(Exception):
    """One input item cannot be used; ``path`` is the offending file (JSONL or media)."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.reason, self.path = reason, path


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    kind: str = "text"
    tokenizer_type: str = "SentencePieceTokenizer"  # or HuggingFaceTokenizer (a local directory)
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    encoder: str = "pixel"
    encoder_path: str | None = None  # checkpoint/config for rae/vae
    image_size: int = 64  # images/frames are resized (shorter side) and center-cropped to this
    patch_size: int = 8  # pixel encoder patch
    image_first: float = 0.0  # image-text: fraction of items with the image before its text (captioning)
    max_frames: int | None = None  # video clip length (first frames)
    frame_stride: int = 1
    fps: float | None = None  # resample videos to this frame rate (video kind only)
    context_frames: int = 4  # action-video default when an item does not say
    video_backend: str = "auto"
    workers: int = 1
    shard_size: int = 10000
    strict: bool = False
    max_shards: int | None = None  # stop after this many shards (no merge); a re-run continues
    keep_shards: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise PreprocessError(f"--kind must be one of {KINDS}, got {self.kind!r}")
        if self.encoder not in ENCODERS:
            raise PreprocessError(f"--encoder must be one of {ENCODERS}, got {self.encoder!r}")
        missing = [p for p in self.inputs if not Path(p).exists()]
        if not self.inputs or missing:
            raise PreprocessError(f"input files not found: {missing or '(none given)'}")
        check_tokenizer(self.tokenizer_model, self.tokenizer_type)
        if self.encoder == "pixel" and self.image_size % self.patch_size:
            raise PreprocessError(f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}")
        if self.kind == "action-video" and (self.frame_stride != 1 or self.fps is not None):
            raise PreprocessError("action-video keeps every frame (one action per transition): "
                                  "drop --frame-stride/--fps")
        if self.shard_size < 1 or self.workers < 1:
            raise PreprocessError("--shard-size and --workers must be >= 1")

    @property
    def multimodal(self) -> bool:
        return self.kind != "text"

    @property
    def suffixes(self) -> list[str]:
        """Output dataset suffix per stream: ``_<key>_document`` per text key, or ``""``."""
        return [f"_{k}_document" for k in self.json_keys] if self.kind == "text" else [""]

    @property
    def shard_dir(self) -> Path:
        return Path(f"{self.output_prefix}.shards")

    @property
    def storage(self) -> str | None:
        """How visuals are stored: raw pixel patches as uint8, encoder latents as float16."""
        if not self.multimodal:
            return None
        return "uint8" if self.encoder == "pixel" else "float16"

    def settings(self) -> dict:
        """Everything besides the inputs that the output depends on, by content: part of every
        shard's key. (``video_backend`` is left out, as it always was: switching decoders is
        meant to change speed, not frames; delete the output to decode again.)"""
        keys = ("kind", "json_keys", "append_eod", "encoder", "image_size", "patch_size", "image_first",
                "max_frames", "frame_stride", "fps", "context_frames", "strict")
        out = {k: getattr(self, k) for k in keys}
        out["json_keys"] = list(self.json_keys)
        out["tokenizer"] = tree_digest(self.tokenizer_model)  # a file, or a Hugging Face directory
        if self.tokenizer_type != "SentencePieceTokenizer":  # (keys of earlier runs stay valid)
            out["tokenizer_type"] = self.tokenizer_type
        if self.encoder != "pixel":  # the pixel encoder is fixed by image_size and patch_size
            out["encoder_files"] = tree_digest(self.encoder_path) if self.encoder_path else None
        return out


def check_tokenizer(path: str, type: str = "SentencePieceTokenizer") -> None:
    """Refuses, before anything is written, a tokenizer path that is not a usable tokenizer of ``type``."""
    from megafusion.data.tokenizer import HUGGINGFACE, SENTENCEPIECE, TOKENIZER_TYPES, load_tokenizer

    if type not in TOKENIZER_TYPES:
        raise PreprocessError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {type!r}")
    if type == SENTENCEPIECE:
        fix = "pass a sentencepiece .model file (e.g. from tools/train_tokenizer.py)"
        if Path(path).is_dir():
            raise PreprocessError(f"--tokenizer-model {path} is a directory; {fix}, or pass --tokenizer-type "
                                  f"{HUGGINGFACE} for a Hugging Face tokenizer directory")
    else:
        fix = "pass a local Hugging Face tokenizer directory (with tokenizer.json)"
    if not Path(path).exists():
        raise PreprocessError(f"--tokenizer-model {path} not found; {fix}")
    try:
        load_tokenizer(path, type)
    except Exception as err:  # sentencepiece raises RuntimeError (or OSError) for a file it cannot parse
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PreprocessError(f"--tokenizer-model {path} is not a usable {type} ({reason}); {fix}") from None


def prepare_output(cfg: PreprocessConfig) -> None:
    """Creates the output prefix's directory, or refuses (before anything is written) a prefix
    that names a directory or lies under a file."""
    prefix = Path(cfg.output_prefix)
    if cfg.output_prefix.endswith(os.sep) or prefix.is_dir():
        raise PreprocessError(f"--output-prefix {cfg.output_prefix} is a directory; give a path prefix "
                              f"inside it, e.g. {prefix / 'data'}")
    nearest = next(p for p in (prefix.parent, *prefix.parent.parents) if p.exists())  # "." or "/" at worst
    if not nearest.is_dir():
        raise PreprocessError(f"--output-prefix {cfg.output_prefix} lies under {nearest}, which is a file; "
                              "pass an --output-prefix in a directory")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreprocessError(f"cannot create the output directory {prefix.parent} ({err.strerror}); "
                              "pass an --output-prefix in a writable directory") from None
    if not os.access(prefix.parent, os.W_OK | os.X_OK):
        raise PreprocessError(f"the output directory {prefix.parent} is not writable; "
                              "pass an --output-prefix in a writable directory")
    if cfg.shard_dir.exists() and not cfg.shard_dir.is_dir():
        raise PreprocessError(f"{cfg.shard_dir} (where shards are written) is a file; move it away "
                              "or pass another --output-prefix")
