"""Reading the inputs: cutting them into shards and a shard into items.

Inputs are JSONL files (one item per line), webdataset-style ``.tar`` files and folders of
samples (``KEY.jpg`` + ``KEY.txt``, ``KEY.mp4`` [+ ``KEY.txt``]). A JSONL file is cut into
shards of ``shard_size`` lines by byte offset (never read whole), a folder by sample keys, and
a tar is one shard. ``iter_items`` yields a shard's items as dicts shaped like a JSONL line
(a tar or folder sample becomes ``{"image"/"video": ..., "text": caption}``), or the
``ItemError`` that makes one unusable, with its 1-based line/sample number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megafusion.data.preprocess.config import ItemError
from megafusion.vision.images import IMAGE_SUFFIXES

IMAGE_EXTS = (*IMAGE_SUFFIXES, ".gif")  # megafusion.vision's image files, and GIFs (PIL reads the first frame)
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
