"""One item -> its documents: token ids plus the visual items (latents) placed among them.

By ``kind``:

- ``text``: ``{"text": ...}`` (the fields named by ``json_keys``; one dataset per key,
  named ``<prefix>_<key>_document`` as Megatron's tool does).
- ``image-text``: ``{"image": "<path relative to the JSONL file>", "text": caption}``.
- ``video``: ``{"video": "<path>"}`` or ``{"frames": [png paths]}``, optional ``"text"``.
- ``action-video``: as video plus ``"actions": [one per transition]`` and optionally
  ``"context_frames": 4`` (the first frames, clean conditioning).

Document token streams: image-text ``caption <boi><eoi>`` (or image first); video
``[caption] <boi><eoi> <frame> <boi><eoi> ...``; action-video puts each transition's
action tokens after its first frame: ``<boi><eoi> a0 <frame> <boi><eoi> a1 <frame> ...``.
An item that cannot be used raises ``ItemError`` naming why and the offending file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from megafusion.data.indexed import VisualItem
from megafusion.data.preprocess.config import ItemError, PreprocessConfig
from megafusion.data.preprocess.encoders import make_encoder
from megafusion.data.sample import IMAGE, VIDEO
from megafusion.vision import images as vision_images


def load_image(path, size: int, name: str | None = None) -> np.ndarray:
    """Reads an image (a path or a file object) as RGB, resizes its shorter side to ``size`` and
    center-crops: [size, size, 3] uint8 (``megafusion.vision.images.load_image``). ``name``
    labels a file object in errors."""
    name = name or str(path)
    try:
        return vision_images.load_image(path, size)
    except FileNotFoundError as err:
        raise ItemError("image file not found", name) from err
    except Exception as err:  # PIL raises many types for corrupt files
        raise ItemError(f"unreadable image ({type(err).__name__}: {err}); replace the file", name) from err


def _unit_hash(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same on every run and in every worker."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2 ** 64


class ItemProcessor:
    """Turns one parsed JSONL item into documents (token ids + visual items) per output suffix."""

    def __init__(self, cfg: PreprocessConfig):
        from megafusion.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tok = load_tokenizer(cfg.tokenizer_model, cfg.tokenizer_type)
        self.encoder = make_encoder(cfg) if cfg.multimodal else None

    def _field(self, item: dict, key: str, types, required=True):
        if key not in item:
            if required:
                raise ItemError(f"missing field '{key}'")
            return None
        value = item[key]
        if not isinstance(value, types):
            raise ItemError(f"field '{key}' has type {type(value).__name__}")
        return value

    def _text(self, item: dict, key: str, required=True) -> list[int]:
        text = self._field(item, key, str, required)
        return [] if text is None else self.tok.encode(text)

    def _eod(self) -> list[int]:
        return [self.tok.eod_id] if self.cfg.append_eod else []

    def process(self, item: dict, base: Path, key: str = "") -> dict[str, tuple[list[int], list[VisualItem]]]:
        """Documents per output suffix; ``key`` (file:line) seeds per-item choices deterministically."""
        cfg = self.cfg
        if cfg.kind == "text":
            out = {}
            for key, suffix in zip(cfg.json_keys, cfg.suffixes):
                ids = self._text(item, key)
                if not ids:
                    raise ItemError(f"field '{key}' is empty")
                out[suffix] = (ids + self._eod(), [])
            return out
        if cfg.kind == "image-text":
            caption = [t for k in cfg.json_keys for t in self._text(item, k)]  # e.g. question + answer
            if item.get("image_bytes") is not None:  # from a tar
                image = load_image(io.BytesIO(item["image_bytes"]), cfg.image_size, item["image_name"])
            else:
                image = load_image(base / self._field(item, "image", str), cfg.image_size)
            (latents, grid), = self.encoder.encode(image[None])
            marker = [self.tok.boi_id, self.tok.eoi_id]
            if cfg.image_first >= 1 or (cfg.image_first > 0 and _unit_hash(key) < cfg.image_first):
                tokens, boi = marker + caption, 0
            else:
                tokens, boi = caption + marker, len(caption)
            return {"": (tokens + self._eod(), [VisualItem(latents, boi, IMAGE, False, -1, grid)])}
        return self._video(item, base)

    def _frames(self, item: dict, base: Path) -> tuple[np.ndarray, str]:
        cfg = self.cfg
        if "frames" in item:
            paths = self._field(item, "frames", list)
            if not paths or not all(isinstance(p, str) for p in paths):
                raise ItemError("field 'frames' must be a non-empty list of paths")
            paths = paths[::cfg.frame_stride][:cfg.max_frames]
            return np.stack([load_image(base / p, cfg.image_size) for p in paths]), str(base / paths[0])
        path = base / self._field(item, "video", str)
        from megafusion.data.video import VideoDecodeError, read_video

        if not path.is_file():
            raise ItemError("video file not found", str(path))
        try:
            frames = read_video(path, backend=cfg.video_backend, num_frames=cfg.max_frames,
                                stride=cfg.frame_stride, fps=cfg.fps, size=cfg.image_size)
        except VideoDecodeError as err:
            raise ItemError(f"unreadable video ({err})", str(path)) from err
        if len(frames) == 0:
            raise ItemError("video has no frames", str(path))
        return np.asarray(frames), str(path)

    def _video(self, item: dict, base: Path):
        cfg = self.cfg
        action_video = cfg.kind == "action-video"
        tokens = self._text(item, "text", required=False)
        frames, where = self._frames(item, base)
        n = len(frames)
        actions, context = [], 0
        if action_video:
            actions = self._field(item, "actions", list)
            if "frames" in item and len(actions) != len(item["frames"]) - 1:
                raise ItemError(f"{len(actions)} actions for {len(item['frames'])} frames; "
                                "need one action per transition (frames - 1)", where)
            if len(actions) < n - 1:
                raise ItemError(f"{len(actions)} actions for {n} frames; need one per transition", where)
            context = item.get("context_frames", cfg.context_frames)
            if not isinstance(context, int) or context < 0:
                raise ItemError(f"field 'context_frames' must be an int >= 0, got {context!r}")
        encoded = self.encoder.encode(frames)
        visuals = []
        for f, (latents, grid) in enumerate(encoded):
            if f > 0:
                tokens.append(self.tok.frame_id)
            visuals.append(VisualItem(latents, len(tokens), VIDEO, f < context, f, grid))
            tokens += [self.tok.boi_id, self.tok.eoi_id]
            if action_video and f < n - 1:
                try:
                    tokens += self.tok.encode_action(actions[f])
                except (TypeError, ValueError) as err:
                    raise ItemError(f"action {f}: {err}") from err
        return {"": (tokens + self._eod(), visuals)}
