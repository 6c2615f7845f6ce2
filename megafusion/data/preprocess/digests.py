"""Content addressing: what makes a shard the same shard on a re-run.

Each shard has a key: a blake2b hash of

- the settings: every flag that changes the output, the tokenizer model's bytes (not its
  path) and, for ``rae``/``vae``, the bytes of every file under ``--encoder-path``
  (``PreprocessConfig.settings``);
- where the shard starts (input path as given, first line: line numbers are in the error
  list and seed ``--image-first``);
- its content: the bytes of its JSONL lines, of its tar, or of its folder samples' files, and
  for a JSONL every image/video/frame file its lines name (a missing file hashes as
  "missing", so one that appears later changes the key).

A shard whose key matches a finished shard in ``<prefix>.shards/`` (a stopped or killed run)
or a shard of the last complete output (recorded in ``<prefix>.summary.json``) is reused:
its documents are copied as stored, not tokenized or encoded again (``shards.py``). Only
shards whose key changed are made again, and when every key matches, the run says "nothing
to do" (``run.py``).

Cost: every input byte and every referenced media file is read once per run to hash it
(each file once, however many lines name it; with ``workers`` > 1, once per worker that
meets it; one changed in the last ``RACY_NS`` at each use), at disk speed: far less than
decoding and encoding, but a re-run of a large image corpus still reads all of it. The cache
keys on a file's path and stat (``file_digest``), so a file changed after the run hashed it
is hashed again where the run next meets it; one changed between being hashed and being read
for its shard is not detected by that run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

# A file whose last change (ctime) is this close to the moment it is hashed is hashed again at
# every use instead of cached: a same-size rewrite within the file system's timestamp tick
# (a jiffy, at most 10 ms, on local file systems) would otherwise keep its stat key.
RACY_NS = 100_000_000


def clear_digests() -> None:
    """Forgets the digests of earlier runs in this process (each run starts with this; the
    stat key already tells a changed file apart, so this only bounds the memory)."""
    _cached_digest.cache_clear()


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 16):  # streamed: any file in 64 KiB of memory
            h.update(block)
    return h.hexdigest()


def _read_digest(path: str) -> str:
    try:
        return _hash_file(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({type(err).__name__})"


@functools.cache
def _cached_digest(path: str, stat_key: tuple) -> str:
    """``stat_key`` (device, inode, size, mtime, ctime) is part of the key: a file rewritten,
    replaced, truncated, chmod-ed or given back an old mtime has a new ctime, so a new key."""
    return _read_digest(path)


def file_digest(path) -> str:
    """blake2b of a file's bytes, once per run per unchanged file (keyed on its path and stat,
    so a file that changed is hashed again). A file that cannot be read gets a digest naming
    why ("missing"), so it becoming readable changes every key that covers it."""
    path = os.path.abspath(path)
    now = time.time_ns()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({type(err).__name__})"
    if now - max(st.st_ctime_ns, st.st_mtime_ns) < RACY_NS:  # changed just now (or stamped in the future)
        return _read_digest(path)
    return _cached_digest(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


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


def digest_settings(settings: dict) -> str:
    """The digest of ``PreprocessConfig.settings()``: the part of every shard key that the flags make."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def shard_key(settings_digest: str, multimodal: bool, spec) -> str:
    """The content key of ``spec``, a ``readers.ShardSpec`` (see the module docstring for what
    it covers). Not imported, even for typing: readers imports config, which imports this."""
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
