"""Raw corpora -> indexed datasets (the logic and CLI behind ``tools/preprocess_data.py``).

Input: JSONL files, one item per line; for image-text also webdataset-style ``.tar`` files
and folders (``KEY.jpg`` + ``KEY.txt``), for video folders (``KEY.mp4`` [+ ``KEY.txt``]).
By ``kind``:

- ``text``: ``{"text": ...}`` (the fields named by ``json_keys``; one dataset per key,
  named ``<prefix>_<key>_document`` as Megatron's tool does).
- ``image-text``: ``{"image": "<path relative to the JSONL file>", "text": caption}``.
- ``video``: ``{"video": "<path>"}`` or ``{"frames": [png paths]}``, optional ``"text"``.
- ``action-video``: as video plus ``"actions": [one per transition]`` and optionally
  ``"context_frames": 4`` (the first frames, clean conditioning).

Multimodal kinds write one dataset at ``<prefix>`` (see ``megafusion.data.indexed``).
Document token streams: image-text ``caption <boi><eoi>`` (or image first); video
``[caption] <boi><eoi> <frame> <boi><eoi> ...``; action-video puts each transition's
action tokens after its first frame: ``<boi><eoi> a0 <frame> <boi><eoi> a1 <frame> ...``.

The input is cut into shards of ``shard_size`` lines by byte offset (never read whole;
a tar is one shard, a folder is cut by sample keys);
workers tokenize/encode a shard each and write it under ``<prefix>.shards/`` to temporary
names, renamed when complete, with a ``.done.json`` marker written last. When all are done
they are merged with the indexed-dataset builder's ``add_index``. Bad items (malformed JSON,
missing fields, missing or unreadable images/videos) are skipped and reported with their
file, line and reason, or raise with ``strict``.

Re-runs are content-addressed. Each shard has a key: a blake2b hash of

- the settings: every flag that changes the output, the tokenizer model's bytes (not its
  path) and, for ``rae``/``vae``, the bytes of every file under ``--encoder-path``;
- where the shard starts (input path as given, first line: line numbers are in the error
  list and seed ``--image-first``);
- its content: the bytes of its JSONL lines, of its tar, or of its folder samples' files, and
  for a JSONL every image/video/frame file its lines name (a missing file hashes as
  "missing", so one that appears later changes the key).

A shard whose key matches a finished shard in ``<prefix>.shards/`` (a stopped or killed run)
or a shard of the last complete output (recorded in ``<prefix>.summary.json``) is reused:
its documents are copied as stored, not tokenized or encoded again. Only shards whose key
changed are made again, and when every key matches, the run says "nothing to do".

Cost: every input byte and every referenced media file is read once per run to hash it
(each file once, however many lines name it; with ``workers`` > 1, once per worker that
meets it), at disk speed: far less than decoding and encoding, but a re-run of a large
image corpus still reads all of it. A file changed while a run hashes or reads it is not
detected by that run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from megafusion.data.indexed import (DatasetWriter, VisualItem, dataset_files, layout_path, merge_datasets, meta_path,
                                     visual_prefix)
from megafusion.data.sample import IMAGE, VIDEO

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
        check_tokenizer(self.tokenizer_model)
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

    def settings(self) -> dict:
        """Everything besides the inputs that the output depends on, by content: part of every
        shard's key. (``video_backend`` is left out, as it always was: switching decoders is
        meant to change speed, not frames; delete the output to decode again.)"""
        keys = ("kind", "json_keys", "append_eod", "encoder", "image_size", "patch_size", "image_first",
                "max_frames", "frame_stride", "fps", "context_frames", "strict")
        out = {k: getattr(self, k) for k in keys}
        out["json_keys"] = list(self.json_keys)
        out["tokenizer"] = file_digest(self.tokenizer_model)
        if self.encoder != "pixel":  # the pixel encoder is fixed by image_size and patch_size
            out["encoder_files"] = tree_digest(self.encoder_path) if self.encoder_path else None
        return out


def check_tokenizer(path: str) -> None:
    """Refuses, before anything is written, a tokenizer path that is not a usable model."""
    from megafusion.data.tokenizer import Tokenizer

    fix = "pass the .model file that tools/train_tokenizer.py wrote"
    if Path(path).is_dir():
        raise PreprocessError(f"--tokenizer-model {path} is a directory; {fix}")
    if not Path(path).is_file():
        raise PreprocessError(f"--tokenizer-model {path} not found; {fix} (or train one with that tool)")
    try:
        Tokenizer(path)
    except ValueError as err:  # a sentencepiece model without megafusion's special tokens; says the fix
        raise PreprocessError(f"--tokenizer-model: {err}") from None
    except Exception as err:  # sentencepiece raises RuntimeError (or OSError) for a file it cannot parse
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PreprocessError(f"--tokenizer-model {path} is not a sentencepiece model ({reason}); {fix}") from None


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


# ----------------------------------------------------------------------------- content digests
_DIGESTS: dict[str, str] = {}  # absolute path -> digest, for one run (cleared at its start)


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 16):  # streamed: any file in 64 KiB of memory
            h.update(block)
    return h.hexdigest()


def file_digest(path) -> str:
    """blake2b of a file's bytes, once per run per file. A file that cannot be read gets a
    digest naming why ("missing"), so it becoming readable changes every key that covers it."""
    path = os.path.abspath(path)
    if path not in _DIGESTS:
        try:
            _DIGESTS[path] = _hash_file(path)
        except FileNotFoundError:
            _DIGESTS[path] = "missing"
        except OSError as err:
            _DIGESTS[path] = f"unreadable ({type(err).__name__})"
    return _DIGESTS[path]


def tree_digest(path) -> str:
    """A file's digest, or for a directory one over its files' relative names and digests."""
    root = Path(path)
    if not root.is_dir():
        return file_digest(root)
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root)}={file_digest(p)}\n".encode())
    return h.hexdigest()


def _media_paths(line: bytes) -> list[str]:
    """The image/video/frame paths a JSONL line names (none for a line that does not parse:
    its bytes are hashed anyway, and it is reported when processed)."""
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    if not isinstance(item, dict):
        return []
    frames = item.get("frames")
    paths = [item.get("image"), item.get("video")] + (frames if isinstance(frames, list) else [])
    return [p for p in paths if isinstance(p, str)]


def shard_key(settings_digest: str, multimodal: bool, spec: "ShardSpec") -> str:
    """The shard's content key (see the module docstring for what it covers)."""
    h = hashlib.blake2b(settings_digest.encode(), digest_size=16)
    h.update(json.dumps([spec.path, spec.fmt, spec.first_line]).encode())
    if spec.fmt == "tar":
        h.update(file_digest(spec.path).encode())
    elif spec.fmt == "dir":
        for key, files in spec.samples:
            for ext, path in sorted(files.items()):
                h.update(f"{key}{ext}={file_digest(path)}\n".encode())
    else:
        base = Path(spec.path).parent
        with open(spec.path, "rb") as f:
            f.seek(spec.start)
            while f.tell() < spec.end:
                line = f.readline()
                h.update(line)
                for media in _media_paths(line) if multimodal else ():  # text lines name no files
                    h.update(f"\0{media}={file_digest(base / media)}\n".encode())
    return h.hexdigest()


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")
CAPTION_EXTS = (".txt", ".caption", ".json")


@dataclass
class ShardSpec:
    """A unit of work: whole lines [start, end) of a JSONL file, one tar, or keys of a folder."""

    index: int
    path: str
    start: int = 0  # byte offsets of whole lines (jsonl)
    end: int = 0
    first_line: int = 1  # 1-based number of the first line / sample
    fmt: str = "jsonl"  # jsonl | tar | dir
    samples: list[tuple[str, dict[str, str]]] | None = None  # dir: (key, {extension: path})


def input_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "dir"
    return "tar" if p.name.endswith((".tar", ".tar.gz", ".tgz")) else "jsonl"


def _folder_samples(folder: Path) -> list[tuple[str, dict[str, str]]]:
    """A folder's samples, sorted by key: (relative path up to the file name's first dot,
    {extension: file path}); one listing of the folder."""
    samples: dict[str, dict[str, str]] = {}
    for p in folder.rglob("*"):
        if p.is_file():
            stem, dot, ext = p.name.partition(".")
            key = str(p.parent.relative_to(folder) / stem)
            samples.setdefault(key, {})["." + ext if dot else ""] = str(p.resolve())
    return sorted(samples.items())


def iter_shards(inputs: list[str], shard_size: int) -> Iterator[ShardSpec]:
    """Cuts the inputs into shards: ``shard_size`` lines of a JSONL file (read line by line,
    never whole), ``shard_size`` samples of a folder, or one whole webdataset tar each."""
    index = 0
    for path in inputs:
        fmt = input_format(path)
        if fmt == "tar":
            yield ShardSpec(index, path, fmt="tar")
            index += 1
            continue
        if fmt == "dir":
            samples = _folder_samples(Path(path))
            for k in range(0, len(samples), shard_size):
                yield ShardSpec(index, path, first_line=k + 1, fmt="dir", samples=samples[k:k + shard_size])
                index += 1
            continue
        with open(path, "rb") as f:
            start = offset = 0
            lines, first = 0, 1
            for line in f:
                offset += len(line)
                lines += 1
                if lines == shard_size:
                    yield ShardSpec(index, path, start, offset, first)
                    index += 1
                    start, first, lines = offset, first + shard_size, 0
            if lines:
                yield ShardSpec(index, path, start, offset, first)
                index += 1


def _caption(name: str, data: bytes) -> str:
    text = data.decode("utf-8")
    if name.endswith(".json"):
        obj = json.loads(text)
        for key in ("text", "caption", "txt"):
            if isinstance(obj, dict) and isinstance(obj.get(key), str):
                return obj[key]
        raise ItemError(f"{name}: no 'text' or 'caption' string in the JSON", name)
    return text.strip()


def _sample_item(key: str, files: dict[str, object], read, where: str) -> dict:
    """A folder/tar sample (files by extension) -> an item like a JSONL line's."""
    item: dict = {}
    for ext, ref in files.items():
        if ext in CAPTION_EXTS and "text" not in item:
            try:
                item["text"] = _caption(ext, read(ref))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ItemError(f"unreadable caption ({err})", f"{where}:{key}{ext}") from err
        elif ext in IMAGE_EXTS and "image" not in item:
            item["image"] = ref if isinstance(ref, str) else None
            item["image_bytes"] = None if isinstance(ref, str) else read(ref)
            item["image_name"] = f"{where}:{key}{ext}"
        elif ext in VIDEO_EXTS and "video" not in item:
            if not isinstance(ref, str):
                raise ItemError("videos inside tar files are not supported; list them in a JSONL file", where)
            item["video"] = ref
    return item


def iter_items(spec: ShardSpec) -> Iterator[tuple[int, dict | ItemError]]:
    """(1-based line/sample number, item or the reason it is unusable) for one shard."""
    number = spec.first_line
    if spec.fmt == "jsonl":
        with open(spec.path, "rb") as f:
            f.seek(spec.start)
            while f.tell() < spec.end:
                raw = f.readline()
                try:
                    item = json.loads(raw)
                    if not isinstance(item, dict):
                        raise ItemError(f"a line must be a JSON object, got {type(item).__name__}")
                    yield number, item
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    yield number, ItemError(f"malformed JSON ({err})")
                except ItemError as err:
                    yield number, err
                number += 1
        return
    if spec.fmt == "dir":
        for key, files in spec.samples:
            try:
                yield number, _sample_item(key, files, lambda p: Path(p).read_bytes(), spec.path)
            except ItemError as err:
                yield number, err
            number += 1
        return
    # webdataset tar: members of one sample are consecutive and share the key (name up to the first dot)
    import tarfile

    def flush(key, files):
        try:
            return _sample_item(key, files, lambda data: data, spec.path)
        except ItemError as err:
            return err

    key, files = None, {}
    try:
        with tarfile.open(spec.path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, _ = member.name.rpartition("/")
                stem, dot, ext = Path(member.name).name.partition(".")
                member_key = f"{base}/{stem}" if base else stem
                if member_key != key and key is not None:
                    yield number, flush(key, files)
                    number, files = number + 1, {}
                key = member_key
                files["." + ext if dot else ""] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        if key is not None:
            yield number, flush(key, files)
            number += 1
        yield number, ItemError(f"unreadable tar ({type(err).__name__}: {err}); the rest of it is skipped", spec.path)
        return
    if key is not None:
        yield number, flush(key, files)


# ----------------------------------------------------------------------------- encoders
def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, 3] -> [(H/p)*(W/p), p*p*3], patches in raster order, (row, col, channel) inside."""
    h, w, c = image.shape
    gh, gw = h // patch, w // patch
    x = image[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch, c)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(gh * gw, patch * patch * c))


def unpatchify(patches: np.ndarray, grid_h: int, grid_w: int, patch: int) -> np.ndarray:
    """Inverse of ``patchify``: [grid_h*grid_w, p*p*3] -> [grid_h*p, grid_w*p, 3]."""
    c = patches.shape[-1] // (patch * patch)
    x = patches.reshape(grid_h, grid_w, patch, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(grid_h * patch, grid_w * patch, c)


class PixelEncoder:
    """Raw pixels: uint8 patches (normalised to [-1, 1] when read back)."""

    storage = "uint8"

    def __init__(self, patch_size: int):
        self.patch = patch_size
        self.dim = 3 * patch_size * patch_size

    def encode(self, images: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """[B, H, W, 3] uint8 -> per image ([T, C] uint8, (grid_h, grid_w))."""
        grid = (images.shape[1] // self.patch, images.shape[2] // self.patch)
        return [(patchify(img, self.patch), grid) for img in images]


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


# ----------------------------------------------------------------------------- items
def load_image(path, size: int, name: str | None = None) -> np.ndarray:
    """Reads an image (a path or a file object) as RGB, resizes its shorter side to ``size`` and
    center-crops: [size, size, 3] uint8. ``name`` labels a file object in errors."""
    from PIL import Image

    name = name or str(path)

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as err:
        raise ItemError("image file not found", name) from err
    except Exception as err:  # PIL raises many types for corrupt files
        raise ItemError(f"unreadable image ({type(err).__name__}: {err}); replace the file", name) from err


class ItemProcessor:
    """Turns one parsed JSONL item into documents (token ids + visual items) per output suffix."""

    def __init__(self, cfg: PreprocessConfig):
        from megafusion.data.tokenizer import Tokenizer

        self.cfg = cfg
        self.tok = Tokenizer(cfg.tokenizer_model)
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


def _unit_hash(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same on every run and in every worker."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2 ** 64


# ----------------------------------------------------------------------------- shards
_PROCESSOR: dict[str, ItemProcessor] = {}  # one per worker process


def _processor(cfg: PreprocessConfig) -> ItemProcessor:
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    if key not in _PROCESSOR:
        _PROCESSOR.clear()
        _PROCESSOR[key] = ItemProcessor(cfg)
    return _PROCESSOR[key]


def _done_path(cfg: PreprocessConfig, index: int) -> Path:
    return cfg.shard_dir / f"{index:06d}.done.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _storage(cfg: PreprocessConfig) -> str | None:
    """How visuals are stored: raw pixel patches as uint8, encoder latents as float16."""
    if not cfg.multimodal:
        return None
    return "uint8" if cfg.encoder == "pixel" else "float16"


@contextlib.contextmanager
def _shard_writers(cfg: PreprocessConfig, index: int, vocab_size: int):
    """One writer per output suffix for shard ``index``: finalized when the block ends, aborted
    (no files left under final names) when it raises."""
    writers = {s: DatasetWriter(cfg.shard_dir / f"{index:06d}{s}", vocab_size, _storage(cfg)) for s in cfg.suffixes}
    try:
        yield writers
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def process_shard(cfg: PreprocessConfig, spec: ShardSpec, key: str, previous: tuple[int, dict] | None = None,
                  on_item=None) -> dict:
    """Writes shard ``spec.index`` (unless a finished one with the same ``key`` is there);
    returns its stats, with ``skipped`` when nothing was tokenized or encoded.

    ``previous``: (first document, stats) of the shard with this key in the last complete
    output; its documents are copied from there. ``on_item()`` (in-process runs) is called
    after each item, for the progress bar."""
    done = _done_path(cfg, spec.index)
    if done.is_file():
        stats = json.loads(done.read_text())
        if stats.get("key") == key:
            return {**stats, "skipped": True}
        done.unlink()  # made from other content or settings: made again below
    if previous is not None:
        from megafusion.data.tokenizer import Tokenizer

        first, old = previous
        with _shard_writers(cfg, spec.index, Tokenizer(cfg.tokenizer_model).vocab_size) as writers:
            _copy_documents(cfg, first, old["documents"], writers)
        stats = {**old, "index": spec.index}
    else:
        stats = _build_shard(cfg, spec, on_item)
    stats["key"] = key
    _write_json(done, stats)
    return {**stats, "skipped": previous is not None}


def _build_shard(cfg: PreprocessConfig, spec: ShardSpec, on_item) -> dict:
    """Tokenizes/encodes the shard's items into its files; returns its stats."""
    proc = _processor(cfg)
    base = Path(spec.path).parent
    errors, items, documents, visuals = [], 0, 0, 0
    with _shard_writers(cfg, spec.index, proc.tok.vocab_size) as writers:
        for line_no, item in iter_items(spec):
            items += 1
            if on_item is not None:
                on_item()
            try:
                if isinstance(item, ItemError):
                    raise item
                docs = proc.process(item, base, f"{Path(spec.path).name}:{line_no}")
            except ItemError as err:
                record = {"path": err.path or spec.path, "line": line_no, "input": spec.path, "reason": err.reason}
                if cfg.strict:
                    raise PreprocessError(f"{spec.path}:{line_no}: {err.reason}"
                                          + (f" ({err.path})" if err.path else "")
                                          + "; rerun without --strict to skip bad items") from err
                errors.append(record)
                continue
            for suffix, (tokens, vis) in docs.items():
                writers[suffix].add_document(tokens, vis)
            documents += 1
            visuals += sum(len(v) for _, v in docs.values())
    enc = proc.encoder
    return {"index": spec.index, "input": spec.path, "first_line": spec.first_line, "items": items,
            "documents": documents, "visuals": visuals, "errors": errors,
            "latent_dim": enc.dim if enc is not None else None}


def _copy_documents(cfg: PreprocessConfig, first: int, count: int, writers: dict) -> None:
    """Copies documents [first, first + count) of the existing output into ``writers`` exactly
    as stored (token ids, visual values and layout), so a reused shard is what a fresh run makes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix, writer in writers.items():
        prefix = f"{cfg.output_prefix}{suffix}"
        tokens = IndexedDataset(prefix)
        if cfg.multimodal:
            visual = IndexedDataset(visual_prefix(prefix))
            layout = np.load(layout_path(prefix), mmap_mode="r")
            row = int(np.searchsorted(layout["doc"], first))  # the layout is sorted by document
        for doc in range(first, first + count):
            items = []
            while cfg.multimodal and row < len(layout) and layout[row]["doc"] == doc:
                rec = layout[row]
                array = np.asarray(visual[row]).reshape(int(rec["tokens"]), int(rec["dim"]))
                if writer.storage == "float16":  # stored as the bits of float16 in uint16
                    array = array.view(np.float16)
                items.append(VisualItem(array, int(rec["boi"]), int(rec["modality"]), bool(rec["clean"]),
                                        int(rec["frame"]), (int(rec["grid_h"]), int(rec["grid_w"]))))
                row += 1
            writer.add_document(np.array(tokens[doc]), items)


# ----------------------------------------------------------------------------- driver
@dataclass
class PreprocessSummary:
    complete: bool
    items: int = 0
    documents: int = 0
    visuals: int = 0
    skipped_items: int = 0
    shards: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # first 100; all in <prefix>.errors.jsonl

    def format(self) -> str:
        rate = self.items / self.seconds if self.seconds else 0.0
        lines = [f"{'done' if self.complete else 'stopped early (re-run to continue)'}: {self.items} items "
                 f"-> {self.documents} documents, {self.visuals} images/frames; {self.skipped_items} skipped; "
                 f"{self.shards} shards ({self.shards_reused} reused); {self.seconds:.1f} s ({rate:.1f} items/s)"]
        for e in self.errors[:20]:
            lines.append(f"  skipped {e['input']}:{e['line']}: {e['reason']}"
                         + (f" [{e['path']}]" if e['path'] != e['input'] else ""))
        if self.skipped_items > 20:
            lines.append(f"  ... {self.skipped_items - 20} more skipped items listed in the errors file")
        if self.skipped_items:
            lines.append("  (skipped items are not in the dataset: fix their files and re-run to add them; "
                         "only the shards whose files changed are made again)")
        lines += [f"  wrote {o}" for o in self.outputs]
        return "\n".join(lines)


def _clean_stale(cfg: PreprocessConfig) -> None:
    """Removes temporary files and shards without a done marker (from a killed run)."""
    out = Path(cfg.output_prefix)
    for p in out.parent.glob(out.name + "*.tmp*"):  # a merge killed half way
        if p.is_file():
            p.unlink()
    done = {p.name.split(".")[0] for p in cfg.shard_dir.glob("*.done.json")}
    for p in cfg.shard_dir.iterdir():
        if ".tmp" in p.name or p.name.split(".")[0].split("_")[0] not in done:
            p.unlink()


def _plan(cfg: PreprocessConfig) -> tuple[list[ShardSpec], bool]:
    """The shards of this run, and whether they are all of the input (not cut by ``max_shards``)."""
    specs = []
    for spec in iter_shards(cfg.inputs, cfg.shard_size):
        if cfg.max_shards is not None and spec.index >= cfg.max_shards:
            return specs, False
        specs.append(spec)
    return specs, True


def _output_sizes(cfg: PreprocessConfig) -> dict[str, int | None]:
    files = [f for s in cfg.suffixes for f in dataset_files(f"{cfg.output_prefix}{s}", cfg.multimodal)]
    return {f: Path(f).stat().st_size if Path(f).is_file() else None for f in files}


def _previous_output(cfg: PreprocessConfig, summary_file: Path) -> tuple[dict | None, dict[str, tuple[int, dict]]]:
    """The last complete run's summary and, by shard key, (first document, stats) of each of its
    shards; (None, {}) unless its output files are still there with the sizes it wrote."""
    try:
        previous = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    if not previous.get("complete") or "shard_stats" not in previous:  # stopped early, or an older format
        return None, {}
    if previous.get("output_sizes") != _output_sizes(cfg):  # deleted, or written by something else since
        return None, {}
    by_key, first = {}, 0
    for stats in previous["shard_stats"]:
        by_key[stats["key"]] = (first, stats)
        first += stats["documents"]
    return previous, by_key


def run_preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    # per-run caches: a file may have changed since an earlier run in this process
    _DIGESTS.clear()
    _PROCESSOR.clear()
    cfg.validate()
    prepare_output(cfg)
    from tqdm import tqdm

    t0 = time.time()
    settings = cfg.settings()
    settings_digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()
    specs, complete = _plan(cfg)
    key_of = functools.partial(shard_key, settings_digest, cfg.multimodal)
    # hashing has its own pool: it needs no megatron, whose slow import the shard workers share
    with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else contextlib.nullcontext() as pool:
        keys = list(tqdm(pool.map(key_of, specs) if pool else map(key_of, specs), total=len(specs), unit="shard",
                         desc="hash inputs", disable=not cfg.progress))
    summary_file = Path(f"{cfg.output_prefix}.summary.json")
    previous, reusable = _previous_output(cfg, summary_file)
    if complete and previous is not None and [s["key"] for s in previous["shard_stats"]] == keys:
        print(f"{cfg.output_prefix}: already complete (see {summary_file}); nothing to do")
        return PreprocessSummary(**{f.name: previous[f.name] for f in fields(PreprocessSummary)})
    results = _process_shards(cfg, specs, keys, reusable)

    stats = [results[i] for i in sorted(results)]
    errors_file = Path(f"{cfg.output_prefix}.errors.jsonl")
    all_errors = [e for s in stats for e in s["errors"]]
    summary = PreprocessSummary(
        complete=complete, items=sum(s["items"] for s in stats), documents=sum(s["documents"] for s in stats),
        visuals=sum(s["visuals"] for s in stats), skipped_items=len(all_errors), shards=len(stats),
        shards_reused=sum(1 for s in stats if s.get("skipped")), errors=all_errors[:100])
    if complete:
        with open(errors_file, "w") as f:
            for e in all_errors:
                f.write(json.dumps(e) + "\n")
        if summary.documents == 0:
            raise PreprocessError(f"no documents: {summary.items} items read, {summary.skipped_items} skipped "
                                  f"(reasons in {errors_file}); megatron cannot open an empty dataset")
        # from here the old output is replaced: its summary no longer describes it
        summary_file.unlink(missing_ok=True)
        summary.outputs = _merge(cfg, stats)
        if not cfg.keep_shards:
            shutil.rmtree(cfg.shard_dir)
    summary.seconds = time.time() - t0
    if complete:
        shard_stats = [{k: v for k, v in s.items() if k != "skipped"} for s in stats]
        _write_json(summary_file, {**asdict(summary), "settings": settings, "shard_stats": shard_stats,
                                   "output_sizes": _output_sizes(cfg)})
    return summary


def _process_shards(cfg: PreprocessConfig, specs: list[ShardSpec], keys: list[str],
                    reusable: dict[str, tuple[int, dict]]) -> dict[int, dict]:
    """Runs ``process_shard`` on every shard (in ``workers`` processes); stats by shard index.
    ``reusable``: by key, where a shard's documents are in the previous output."""
    from tqdm import tqdm

    cfg.shard_dir.mkdir(exist_ok=True)
    _clean_stale(cfg)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow import: once, before workers fork)

    results: dict[int, dict] = {}
    bar = tqdm(unit="item", desc="preprocess", disable=not cfg.progress, smoothing=0.1)
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    in_flight: deque = deque()

    def collect(stats: dict, counted: int = 0):
        results[stats["index"]] = stats
        bar.update(stats["items"] - counted)
        bar.set_postfix(skipped=sum(len(r["errors"]) for r in results.values()), shards=len(results))

    try:
        for spec, key in zip(specs, keys):
            previous = reusable.get(key)
            if pool is None:
                counted = [0]

                def tick():
                    counted[0] += 1
                    if counted[0] % 64 == 0:
                        bar.update(64)

                stats = process_shard(cfg, spec, key, previous, tick)
                collect(stats, counted[0] - counted[0] % 64)
                continue
            in_flight.append(pool.submit(process_shard, cfg, spec, key, previous))
            while len(in_flight) >= 2 * cfg.workers:  # bounded: the input is never read ahead much
                collect(in_flight.popleft().result())
        while in_flight:
            collect(in_flight.popleft().result())
    except BaseException:
        for fut in in_flight:
            fut.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results


def _merge(cfg: PreprocessConfig, stats: list[dict]) -> list[str]:
    from megafusion.data.tokenizer import Tokenizer

    tok = Tokenizer(cfg.tokenizer_model)
    storage = _storage(cfg)
    latent_dim = next((s["latent_dim"] for s in stats if s["latent_dim"]), None)
    outputs = []
    for suffix in cfg.suffixes:
        prefix = f"{cfg.output_prefix}{suffix}"
        parts = [str(cfg.shard_dir / f"{s['index']:06d}{suffix}") for s in stats]
        merge_datasets(parts, prefix, tok.vocab_size, storage)
        meta = {"kind": cfg.kind, "encoder": cfg.encoder if cfg.multimodal else None, "storage": storage,
                "image_size": cfg.image_size, "patch_size": cfg.patch_size if cfg.encoder == "pixel" else None,
                "latent_dim": latent_dim, "tokenizer_model": str(Path(cfg.tokenizer_model).resolve()),
                "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "boi_id": tok.boi_id, "eoi_id": tok.eoi_id,
                "frame_id": tok.frame_id, "eod_id": tok.eod_id, "append_eod": cfg.append_eod}
        _write_json(Path(meta_path(prefix)), meta)
        outputs.append(prefix)
    return outputs


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Preprocess JSONL corpora, webdataset tars or folders into megatron-core indexed datasets "
                    "(+ a visual store). Examples: tools/preprocess_data.py; format: megafusion/data/indexed.py.")
    g = p.add_argument_group("input/output")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), one item per line; or webdataset .tar files / folders of "
                        "KEY.{jpg,png,...}+KEY.txt (image-text) or KEY.{mp4,webm,...}[+KEY.txt] (video)")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output dataset(s)")
    g.add_argument("--kind", choices=KINDS, default="text")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="text: fields to tokenize, one dataset each; image-text: fields joined into the "
                        "image's text (e.g. question answer)")
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model from tools/train_tokenizer.py")
    g.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    g = p.add_argument_group("images and video")
    g.add_argument("--encoder", choices=ENCODERS, default="pixel",
                   help="pixel: raw resized pixels as patches; rae/vae: latents from megafusion.vision")
    g.add_argument("--encoder-path", default=None, help="rae/vae checkpoint or config")
    g.add_argument("--image-size", type=int, default=64, help="resize (shorter side) + center crop to this")
    g.add_argument("--patch-size", type=int, default=8, help="pixel encoder patch size")
    g.add_argument("--image-first", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                   help="image-text: put the image before its text (captioning/VQA) for this fraction of "
                        "items, chosen per item by a hash of file and line (no value: all)")
    g.add_argument("--max-frames", type=int, default=None, help="video clip length (first frames)")
    g.add_argument("--frame-stride", type=int, default=1)
    g.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate")
    g.add_argument("--context-frames", type=int, default=4, help="action-video: clean conditioning frames")
    g.add_argument("--video-backend", default="auto", help="auto|pyav|dali-cpu|dali-gpu")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--shard-size", type=int, default=10000, help="input lines per shard")
    g.add_argument("--strict", action="store_true", help="fail on the first bad item instead of skipping it")
    g.add_argument("--max-shards", type=int, default=None, help="stop after N shards without merging")
    g.add_argument("--keep-shards", action="store_true", help="keep OUT.shards/ after merging")
    g.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model, kind=a.kind,
        json_keys=tuple(a.json_keys), append_eod=a.append_eod, encoder=a.encoder, encoder_path=a.encoder_path,
        image_size=a.image_size, patch_size=a.patch_size, image_first=a.image_first, max_frames=a.max_frames,
        frame_stride=a.frame_stride, fps=a.fps, context_frames=a.context_frames, video_backend=a.video_backend,
        workers=a.workers, shard_size=a.shard_size, strict=a.strict, max_shards=a.max_shards,
        keep_shards=a.keep_shards, progress=not a.no_progress)
    try:
        summary = run_preprocess(cfg)
    except PreprocessError as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 2  # a usage error, as argparse's
    print(summary.format())
    return 0
