"""On-disk datasets: megatron-core indexed token streams plus a companion visual store.

A dataset at path prefix ``P`` is:

- ``P.bin`` / ``P.idx``: a megatron-core ``IndexedDataset`` (written with its
  ``IndexedDatasetBuilder``), one sequence per document: the document's token ids. Each
  image or video frame appears in it as the two adjacent tokens ``<boi> <eoi>``; its latent
  positions go between them when the document is packed. Text-only datasets are just this
  (and are what Megatron's own GPT datasets read).
- ``P.visual.bin`` / ``P.visual.idx`` (multimodal only): a second ``IndexedDataset``, one
  sequence per image/frame: its ``[T, C]`` array flattened. ``uint8`` for raw pixel
  patches, float16 bit patterns (stored as ``uint16``: megatron-core has no float16) for
  encoder latents.
- ``P.layout.npy`` (multimodal only): one ``LAYOUT_DTYPE`` record per image/frame, in
  the order of ``P.visual``: its document, the offset of its ``<boi>`` in the document's
  token stream, its shape, modality, frame number and whether it is clean conditioning.
- ``P.meta.json``: how the data was made (kind, encoder, image size, patch size, latent
  width, storage dtype, special token ids).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np

from megafusion.data.packing import Document, Segment
from megafusion.data.sample import IMAGE

LAYOUT_DTYPE = np.dtype([
    ("doc", "<i8"),       # document index in the dataset
    ("boi", "<i8"),       # offset of the <boi> token in the document's token stream
    ("tokens", "<i4"),    # T: latent positions of the span
    ("dim", "<i4"),       # C: latent width
    ("grid_h", "<i4"),    # patch grid (T == grid_h * grid_w)
    ("grid_w", "<i4"),
    ("modality", "i1"),   # IMAGE or VIDEO
    ("clean", "?"),       # conditioning only: no diffusion loss
    ("frame", "<i4"),     # frame number within its video, -1 for a still image
])

# storage dtype name in meta.json -> numpy dtype in the IndexedDataset
STORAGE_DTYPES = {"uint8": np.uint8, "float16": np.uint16}


def visual_prefix(prefix: str | os.PathLike) -> str:
    return f"{prefix}.visual"


def layout_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.layout.npy"


def meta_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.meta.json"


def dataset_files(prefix: str | os.PathLike, multimodal: bool) -> list[str]:
    files = [f"{prefix}.bin", f"{prefix}.idx"]
    if multimodal:
        files += [f"{visual_prefix(prefix)}.bin", f"{visual_prefix(prefix)}.idx", layout_path(prefix)]
    return files


def token_dtype(vocab_size: int):
    """Megatron's choice: uint16 ids for vocabularies below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def decode_visual(raw: np.ndarray, storage: str) -> np.ndarray:
    """Stored visual values -> float32: pixels to [-1, 1], float16 latents as they are."""
    if storage == "uint8":
        return raw.astype(np.float32) / 127.5 - 1.0
    if storage == "float16":
        return raw.view(np.float16).astype(np.float32)
    raise ValueError(f"unknown visual storage dtype {storage!r}; expected one of {sorted(STORAGE_DTYPES)}")


def encode_visual(array: np.ndarray, storage: str) -> np.ndarray:
    """[T, C] array -> the flat array written to the visual store."""
    if storage == "uint8":
        if array.dtype != np.uint8:
            raise TypeError(f"pixel patches must be uint8, got {array.dtype}")
        return array.reshape(-1)
    if storage == "float16":
        return np.ascontiguousarray(array, dtype=np.float16).view(np.uint16).reshape(-1)
    raise ValueError(f"unknown visual storage dtype {storage!r}")


@dataclass
class VisualItem:
    """One image or frame of a document being written."""

    array: np.ndarray  # [T, C]: uint8 pixel patches or float latents
    boi: int  # offset of its <boi> token in the document's token stream
    modality: int = IMAGE
    clean: bool = False
    frame: int = -1
    grid: tuple[int, int] | None = None


class DatasetWriter:
    """Writes one dataset (tokens, and visual store + layout when multimodal) at ``prefix``.

    Files appear under their final names only in ``finalize``; until then they are written
    to ``prefix`` + ``.tmp`` names, so a killed writer never leaves a dataset that looks valid.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, storage: str | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.tmp = f"{self.prefix}.tmp{os.getpid()}"
        self.storage = storage
        self.tokens = IndexedDatasetBuilder(f"{self.tmp}.bin", dtype=token_dtype(vocab_size))
        self.visual = None
        self.layout: list[tuple] = []
        if storage is not None:
            self.visual = IndexedDatasetBuilder(f"{visual_prefix(self.tmp)}.bin", dtype=STORAGE_DTYPES[storage])
        self.documents = 0

    def add_document(self, tokens, visuals: list[VisualItem] = ()) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        self.tokens.add_document(tokens, [len(tokens)])
        if visuals and self.visual is None:
            raise ValueError("this dataset was opened without a visual store")
        for item in visuals:
            t, c = item.array.shape
            gh, gw = item.grid if item.grid is not None else (t, 1)
            self.visual.add_document(encode_visual(item.array, self.storage), [t * c])
            self.layout.append((self.documents, item.boi, t, c, gh, gw, item.modality, item.clean, item.frame))
        self.documents += 1

    def finalize(self) -> list[str]:
        """Closes the files and moves them to their final names; returns those names."""
        self.tokens.finalize(f"{self.tmp}.idx")
        moves = [(f"{self.tmp}.bin", f"{self.prefix}.bin"), (f"{self.tmp}.idx", f"{self.prefix}.idx")]
        if self.visual is not None:
            self.visual.finalize(f"{visual_prefix(self.tmp)}.idx")
            np.save(f"{self.tmp}.layout.npy", np.array(self.layout, dtype=LAYOUT_DTYPE))
            moves += [(f"{visual_prefix(self.tmp)}.bin", f"{visual_prefix(self.prefix)}.bin"),
                      (f"{visual_prefix(self.tmp)}.idx", f"{visual_prefix(self.prefix)}.idx"),
                      (f"{self.tmp}.layout.npy", layout_path(self.prefix))]
        for src, dst in moves:
            os.replace(src, dst)
        return [dst for _, dst in moves]

    def abort(self) -> None:
        for path in Path(self.tmp).parent.glob(Path(self.tmp).name + "*"):
            path.unlink(missing_ok=True)


def merge_datasets(parts: list[str], prefix: str | os.PathLike, vocab_size: int, storage: str | None) -> None:
    """Concatenates datasets ``parts`` into one at ``prefix`` with the builder's ``add_index``.

    Streams file to file (memory holds only the index arrays); the layout's document
    numbers are shifted by the documents before each part.
    """
    import megatron.core.datasets.indexed_dataset as megatron_indexed
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    # add_index runs a full gc.collect() per part: ~0.6 s each with torch loaded, hours for
    # thousands of shards. Its index arrays are freed by reference counting anyway.
    no_gc = SimpleNamespace(collect=lambda *args: 0)
    try:
        with mock.patch.object(megatron_indexed, "gc", no_gc):
            _merge(parts, prefix, tmp, vocab_size, storage, IndexedDatasetBuilder, _IndexReader)
    finally:
        for path in Path(tmp).parent.glob(Path(tmp).name + "*"):
            path.unlink(missing_ok=True)


def _merge(parts, prefix, tmp, vocab_size, storage, IndexedDatasetBuilder, _IndexReader) -> None:
    tokens = IndexedDatasetBuilder(f"{tmp}.bin", dtype=token_dtype(vocab_size))
    for part in parts:
        tokens.add_index(part)
    tokens.finalize(f"{tmp}.idx")
    moves = [(f"{tmp}.bin", f"{prefix}.bin"), (f"{tmp}.idx", f"{prefix}.idx")]
    if storage is not None:
        visual = IndexedDatasetBuilder(f"{visual_prefix(tmp)}.bin", dtype=STORAGE_DTYPES[storage])
        for part in parts:
            visual.add_index(visual_prefix(part))
        visual.finalize(f"{visual_prefix(tmp)}.idx")
        # layouts: one part open at a time (thousands of shards must not exhaust file handles)
        rows = [len(np.load(layout_path(p), mmap_mode="r")) for p in parts]
        out = np.lib.format.open_memmap(f"{tmp}.layout.npy", mode="w+", dtype=LAYOUT_DTYPE, shape=(sum(rows),))
        row, doc_offset = 0, 0
        for part, n in zip(parts, rows):
            layout = np.load(layout_path(part))
            layout["doc"] += doc_offset
            out[row:row + n] = layout
            row += n
            doc_offset += len(_IndexReader(f"{part}.idx", multimodal=False))
        out.flush()
        del out
        moves += [(f"{visual_prefix(tmp)}.bin", f"{visual_prefix(prefix)}.bin"),
                  (f"{visual_prefix(tmp)}.idx", f"{visual_prefix(prefix)}.idx"),
                  (f"{tmp}.layout.npy", layout_path(prefix))]
    for src, dst in moves:
        os.replace(src, dst)


class IndexedDocuments:
    """A preprocessed dataset as a sequence of ``Document``s (the ``Mixture`` source type).

    ``latent_transform`` (optional) maps each float32 ``[T, C]`` array after decoding, e.g.
    the latent normalisation with dataset statistics.
    """

    def __init__(self, prefix: str | os.PathLike, latent_transform=None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        if not IndexedDataset.exists(self.prefix):
            raise FileNotFoundError(f"no indexed dataset at {self.prefix}(.bin/.idx); "
                                    "make one with tools/preprocess_data.py")
        self.tokens = IndexedDataset(self.prefix)
        self.meta = json.loads(Path(meta_path(self.prefix)).read_text()) if Path(meta_path(self.prefix)).is_file() else {}
        self.latent_transform = latent_transform
        self.multimodal = Path(layout_path(self.prefix)).is_file()
        if self.multimodal:
            self.visual = IndexedDataset(visual_prefix(self.prefix))
            self.layout = np.load(layout_path(self.prefix), mmap_mode="r")
            self.storage = self.meta.get("storage")
            if self.storage not in STORAGE_DTYPES:
                raise ValueError(f"{meta_path(self.prefix)} names no valid visual storage dtype ({self.storage!r})")
            if len(self.layout) != len(self.visual):
                raise ValueError(f"{self.prefix}: layout has {len(self.layout)} rows, visual store "
                                 f"{len(self.visual)} items; the dataset is damaged, preprocess it again")
            self.boi_id, self.eoi_id = self.meta["boi_id"], self.meta["eoi_id"]

    def __getstate__(self):  # reopen the memory maps in another process instead of copying them
        return {"prefix": self.prefix, "latent_transform": self.latent_transform}

    def __setstate__(self, state):
        self.__init__(state["prefix"], state["latent_transform"])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def latent_dim(self) -> int | None:
        return self.meta.get("latent_dim")

    def visual_rows(self, index: int) -> tuple[int, int]:
        """[start, stop) of the layout rows (= visual items) of document ``index``."""
        docs = self.layout["doc"]
        return int(np.searchsorted(docs, index, "left")), int(np.searchsorted(docs, index, "right"))

    def __getitem__(self, index: int) -> Document:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range for {self.prefix} ({len(self)} documents)")
        tokens = np.asarray(self.tokens[index], dtype=np.int64)
        if not self.multimodal:
            return [Segment(tokens=tokens)]
        start, stop = self.visual_rows(index)
        doc: Document = []
        cursor = 0
        for row in range(start, stop):
            rec = self.layout[row]
            boi = int(rec["boi"])
            if boi + 1 >= len(tokens) or tokens[boi] != self.boi_id or tokens[boi + 1] != self.eoi_id:
                raise ValueError(f"{self.prefix}: document {index} has no <boi><eoi> at offset {boi} "
                                 "where its layout puts an image; the dataset is damaged")
            if boi > cursor:
                doc.append(Segment(tokens=tokens[cursor:boi]))
            raw = np.asarray(self.visual[row])
            latents = decode_visual(raw, self.storage).reshape(int(rec["tokens"]), int(rec["dim"]))
            if self.latent_transform is not None:
                latents = self.latent_transform(latents)
            doc.append(Segment(latents=latents, modality=int(rec["modality"]), clean=bool(rec["clean"])))
            cursor = boi + 2
        if cursor < len(tokens):
            doc.append(Segment(tokens=tokens[cursor:]))
        return doc
