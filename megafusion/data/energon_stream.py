"""Energon-prepared WebDataset datasets -> packed ``Sample``s (``data.kind: energon``).

``data.paths`` name Energon datasets (a folder of tar shards prepared by ``energon
prepare``) of image-caption pairs (``CaptioningSample``) or of interleaved text and images
(``InterleavedSample``: ``sequence``, a list of text pieces and images, mapped by a
``sample_loader`` in ``dataset.yaml``) and, optionally, indexed datasets
(``tools/preprocess_data.py``) to blend in by ``data.weights``.

- Reading: one ``megatron.energon`` savable loader per Energon path and data-parallel rank
  (``WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=data.num_workers)``). Its
  worker processes decode the PNG/JPEG, tokenize the text and encode the images with the
  run's representation (``megafusion.vision``: pixel / RAE / VAE) in ``encode_sample``
  (``SampleEncoder``), so the training process only packs.
- Documents: a caption pair is ``caption <boi> image <eoi> <eod>`` (generation) or, with
  probability ``1 - caption_first_prob``, ``<boi> image <eoi> caption <eod>`` (captioning),
  the order drawn from the sample's key; the ShapesWorld layout. An interleaved sample is
  its sequence in order, ``text <boi> image <eoi> text <boi> image <eoi> ... <eod>``: each
  image its own span, as the indexed path lays out documents with several images.
- Blending: document slot ``g`` of this rank is global slot ``g * dp_size + dp_rank`` of
  ``megafusion.data.mixture.BlendedIndex`` (Megatron's furthest-behind rule over
  ``data.weights``); an Energon source gives its next sample, an indexed source the
  document the index names (a seeded permutation per epoch).
- Packing: greedy next-fit; the document that does not fit opens the next sequence.
- Corrupt samples (an image that does not decode; for an interleaved sample, any of its
  images) are skipped and counted (``skipped``,
  logged as ``data_skipped_samples``); a run never stops for one bad file.
- Resume: the stream is sequential, not index-addressable, so its position is a state:
  every Energon loader's ``save_state_rank()``, the slot counter, the pending document and
  the skip count (``state_dict`` / ``load_state_dict``), stored in the checkpoint per
  data-parallel rank. A resumed run reads exactly the samples an uninterrupted one would.

Energon is imported only here, inside functions: other data kinds never import it.
"""

from __future__ import annotations

import io
import pickle
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from megafusion.config import ConfigError
from megafusion.data.energon_paths import energon_path_problems, is_energon_dataset
from megafusion.data.mixture import BlendedIndex
from megafusion.data.packing import Document, Segment, SequencePacker, document_length, truncate_document
from megafusion.data.sample import IMAGE, TEXT, Sample

_MAX_DOCS = 256  # per sequence; a guard, far above what fits
_STATE_VERSION = 1


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3]: RGB, centre square crop, bicubic resize.
    Raises on bytes that are not a decodable image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8).copy()


def to_frame(image, size: int) -> np.ndarray:
    """An image as a sample holds it -> uint8 [size, size, 3]: encoded bytes (decoded here) or
    a tensor a decoder already made ([C, H, W] in [0, 1], of the run's size). Raises on bytes
    that do not decode and on a tensor of another size."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), size)
    t = torch.as_tensor(image).float()
    frame = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if frame.shape[:2] != (size, size):
        raise ValueError(f"decoded image of shape {frame.shape} is not {size}x{size}")
    return frame


# Leading bytes of the image formats PIL reads that data sets hold (an interleaved sequence
# may carry its text as bytes too: bytes without one of these that are UTF-8 are text).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


def _is_image_bytes(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@dataclass
class SampleEncoder:
    """What the Energon workers run per sample: an Energon sample -> a document's parts (or a
    skip). ``caption`` reads a ``CaptioningSample``, ``interleaved`` an ``InterleavedSample``;
    both return a dict of plain values (it crosses the worker pipe): ``parts``, the document
    in reading order as ``(TEXT, token ids)`` / ``(IMAGE, latents [T, C])`` pairs (the stream
    appends ``<eod>``), or ``skipped`` with the reason."""

    seed: int
    tokenizer: object
    representation: object
    image_size: int
    caption_first_prob: float = 0.8

    def _tokens(self, text) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, (bytes, bytearray)) else str(text)
        return np.asarray(self.tokenizer.encode(text.strip()), dtype=np.int64)

    @torch.no_grad()
    def _latents(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [H, W, 3] frames -> normalised latents [T, C] each, by the run's representation."""
        images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
        rep = self.representation
        latents = rep.normalize(rep.encode(images)).float().numpy()
        return [np.ascontiguousarray(lat, dtype=np.float32) for lat in latents]

    def caption(self, key: str, image, caption) -> dict:
        """``caption <boi> image <eoi>`` or, with probability ``1 - caption_first_prob`` (drawn
        from the key), image first."""
        try:
            frame = to_frame(image, self.image_size)
        except Exception as err:  # corrupt or truncated image: skipped and counted
            return {"key": key, "skipped": f"{type(err).__name__}: {err}"}
        [latents] = self._latents([frame])
        rng = np.random.default_rng([self.seed, zlib.crc32(b"energon_caption_order"), zlib.crc32(key.encode())])
        text, img = (TEXT, self._tokens(caption)), (IMAGE, latents)
        return {"key": key, "parts": [text, img] if rng.random() < self.caption_first_prob else [img, text]}

    def interleaved(self, key: str, sequence) -> dict:
        """Text pieces and images in the sequence's order: ``text <boi> image <eoi> text ...``.
        A ``str`` is text; bytes are an encoded image (or UTF-8 text when they do not start
        like an image file); a tensor is a decoded image. A sample with an image that does not
        decode is skipped whole (a document with a hole in it would teach the hole)."""
        if not isinstance(sequence, (list, tuple)):
            return {"key": key, "skipped": f"sequence is a {type(sequence).__name__}, not a list of text and "
                                           "images (map it with a sample_loader in dataset.yaml)"}
        kinds, frames = [], []
        try:
            for n, item in enumerate(sequence):
                if isinstance(item, (bytes, bytearray, memoryview)) and not _is_image_bytes(bytes(item)):
                    try:
                        item = bytes(item).decode("utf-8")
                    except UnicodeDecodeError:
                        pass  # not text: decoded as an image below, skipped if it is not one
                if isinstance(item, str):
                    kinds.append((TEXT, self._tokens(item)))
                elif isinstance(item, (bytes, bytearray, memoryview, torch.Tensor, np.ndarray)):
                    frames.append(to_frame(item, self.image_size))
                    kinds.append((IMAGE, len(frames) - 1))
                else:
                    raise TypeError(f"item {n} is a {type(item).__name__}, neither text nor an image")
        except Exception as err:  # corrupt image, odd item: the sample is skipped and counted
            return {"key": key, "skipped": f"{type(err).__name__}: {err}"}
        latents = self._latents(frames) if frames else []
        parts = [(m, v) if m == TEXT else (m, latents[v]) for m, v in kinds if m != TEXT or len(v)]
        if not parts:
            return {"key": key, "skipped": "empty sequence: no text and no image"}
        return {"key": key, "parts": parts}

    def __call__(self, sample) -> dict:
        """An Energon sample (its type picks the layout) -> ``parts`` or ``skipped``."""
        key = str(sample.__key__)
        if hasattr(sample, "sequence"):
            return self.interleaved(key, sample.sequence)
        return self.caption(key, sample.image, sample.caption)


def _task_encoder(encode: SampleEncoder):
    """An Energon TaskEncoder that runs ``encode`` in the loader workers (raw bytes in: images
    are decoded by ``encode``, so a corrupt one is skipped and counted, not fatal)."""
    from megatron.energon import DefaultTaskEncoder

    class MegafusionSampleEncoder(DefaultTaskEncoder):
        decoder = None  # raw bytes; SampleEncoder decodes

        def encode_sample(self, sample):
            return encode(sample)

        def batch(self, samples):
            return samples

    return MegafusionSampleEncoder()


class _Unpickler(pickle.Unpickler):
    """Loads a saved stream state: Energon's state classes, numpy and torch storage only."""

    ALLOWED = ("megatron.energon.", "numpy", "torch._utils", "torch.storage", "torch", "collections", "builtins",
               "_codecs", "copyreg")

    def find_class(self, module, name):
        if module == "builtins" and name in ("eval", "exec", "open", "compile", "__import__", "getattr", "setattr"):
            raise pickle.UnpicklingError(f"data state refers to builtins.{name}")
        if not any(module == p.rstrip(".") or module.startswith(p) for p in self.ALLOWED):
            raise pickle.UnpicklingError(f"data state refers to {module}.{name}, which a stream state never holds")
        if module.startswith("torch") and module not in ("torch", "torch._utils", "torch.storage"):
            raise pickle.UnpicklingError(f"data state refers to {module}.{name}")
        return super().find_class(module, name)


@dataclass
class EnergonStream:
    """This data-parallel rank's packed samples, in order (``sample()`` gives the next one)."""

    seed: int
    seq_len: int
    tokenizer: object
    representation: object
    paths: list[str]
    weights: list[float]
    indexed: dict[int, object]  # source index -> IndexedDocuments (the indexed paths)
    image_size: int
    num_workers: int = 0
    caption_first_prob: float = 0.8
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    sequential = True  # not index-addressable: the trainer builds steps in order, in its own process

    def __post_init__(self):
        tok = self.tokenizer
        self.packer = SequencePacker(self.seq_len, self.latent_dim, tok.pad_id, tok.boi_id, tok.eoi_id)
        sizes = [len(self.indexed[s]) if s in self.indexed else 1 for s in range(len(self.paths))]
        self.blend = BlendedIndex(sizes, self.weights, self.seed)
        self.encoder = SampleEncoder(self.seed, tok, self.representation, self.image_size, self.caption_first_prob)
        self.slot = 0
        self.pending: Document | None = None
        self.rank: tuple[int, int] | None = None
        self._loaders: dict[int, object] = {}
        self._iters: dict[int, object] = {}
        self._restore: dict | None = None

    @classmethod
    def from_config(cls, cfg) -> "EnergonStream":
        from megafusion.data.indexed import IndexedDocuments
        from megafusion.data.loader import default_num_workers
        from megafusion.data.shapes_stream import load_tokenizer
        from megafusion.vision import representation_from_config

        d = cfg.data
        if not d.paths:
            raise ConfigError("data.kind = energon needs data.paths: Energon-prepared datasets (energon prepare)")
        problems = energon_path_problems(list(d.paths))
        if problems:
            raise ConfigError("; ".join(problems))
        weights = list(d.weights) or [1.0] * len(d.paths)
        if len(weights) != len(d.paths):
            raise ConfigError(f"data.weights = {weights}: give one weight per data.paths entry ({len(d.paths)})")
        rep = representation_from_config(cfg.vision)

        def normalize(latents: np.ndarray) -> np.ndarray:
            return rep.normalize(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))).float().numpy()

        indexed = {}
        for s, path in enumerate(d.paths):
            if not is_energon_dataset(path):
                try:
                    indexed[s] = IndexedDocuments(path, latent_transform=normalize)
                except FileNotFoundError as err:
                    raise ConfigError(f"data.paths: {err}") from None
                if indexed[s].latent_dim is not None and indexed[s].latent_dim != rep.latent_dim:
                    raise ConfigError(f"data.paths: {path} holds latents of width {indexed[s].latent_dim} but "
                                      f"vision.{cfg.vision.representation} makes {rep.latent_dim}")
        workers = default_num_workers("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu") \
            if d.num_workers is None else d.num_workers
        tokenizer = load_tokenizer(d.tokenizer, d.tokenizer_type)
        try:
            return cls(cfg.train.seed, cfg.model.seq_length, tokenizer, rep, list(d.paths), weights, indexed,
                       cfg.vision.image_size, workers)
        except ValueError as err:
            raise ConfigError(f"data.paths / data.weights ({list(d.paths)}, {weights}): {err}") from None

    @property
    def latent_dim(self) -> int:
        return self.representation.latent_dim

    @property
    def tokens_per_image(self) -> int:
        return self.representation.tokens_per_image

    # ------------------------------------------------------------------ loaders
    def bind(self, dp_rank: int, dp_size: int) -> None:
        """Opens this rank's Energon loaders (once; a restored state is applied here)."""
        if self.rank is not None:
            if self.rank != (dp_rank, dp_size):
                raise RuntimeError(f"EnergonStream bound to data-parallel rank {self.rank}, asked for "
                                   f"{(dp_rank, dp_size)}")
            return
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

        self.rank = (dp_rank, dp_size)
        restore = self._restore or {}
        for s, path in enumerate(self.paths):
            if s in self.indexed:
                continue
            wc = WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=self.num_workers, seed_offset=self.seed)
            dataset = get_train_dataset(path, worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                                        max_samples_per_sequence=None, task_encoder=_task_encoder(self.encoder))
            loader = get_savable_loader(dataset, watchdog_timeout_seconds=None)
            if s in restore.get("loaders", {}):
                loader.restore_state_rank(restore["loaders"][s])
            self._loaders[s] = loader
        self._restore = None

    def _next_energon(self, s: int) -> dict:
        it = self._iters.get(s)
        if it is None:
            it = self._iters[s] = iter(self._loaders[s])
        return next(it)

    def _document(self) -> Document | None:
        """The next document of this rank's blended stream (None: a skipped sample)."""
        dp_rank, dp_size = self.rank
        sources, index = self.blend.locate(np.array([self.slot * dp_size + dp_rank]))
        self.slot += 1
        s, k = int(sources[0]), int(index[0])
        if s in self.indexed:
            return self.indexed[s][k]
        item = self._next_energon(s)
        if "skipped" in item:
            self.skipped += 1
            if len(self.skipped_examples) < 8:
                self.skipped_examples.append(f"{self.paths[s]}:{item['key']} ({item['skipped']})")
            return None
        doc = [Segment(tokens=np.asarray(v, dtype=np.int64)) if m == TEXT else
               Segment(latents=np.asarray(v, dtype=np.float32), modality=IMAGE) for m, v in item["parts"]]
        return doc + [Segment(tokens=np.asarray([self.tokenizer.eod_id], dtype=np.int64))]

    def sample(self, i: int | None = None) -> Sample:
        """The next packed sequence of this rank (``i`` is unused: the stream is sequential)."""
        if self.rank is None:
            self.bind(0, 1)
        packer = self.packer
        packer.reset()
        for _ in range(_MAX_DOCS):
            doc, self.pending = self.pending, None
            if doc is None:
                doc = self._document()
                if doc is None:
                    continue
            if document_length(doc) > packer.seq_len:
                doc, _ = truncate_document(doc, packer.seq_len)
                packer.stats.truncated_documents += 1
            if not packer.fits(doc):
                self.pending = doc
                break
            if doc:
                packer.add(doc)
            if packer.full:
                break
        return packer.flush()

    # ------------------------------------------------------------------ position
    def state_dict(self) -> bytes:
        """This rank's position: Energon loader states, slot, pending document, skip count."""
        if self.rank is None:
            self.bind(0, 1)
        pending = None if self.pending is None else [
            (seg.tokens, seg.latents, seg.modality, seg.clean) for seg in self.pending]
        state = {"version": _STATE_VERSION, "rank": self.rank, "slot": self.slot, "pending": pending,
                 "skipped": self.skipped, "loaders": {s: ld.save_state_rank() for s, ld in self._loaders.items()}}
        return pickle.dumps(state)

    def load_state_dict(self, blob: bytes) -> None:
        """Restores ``state_dict``'s position (before the loaders are opened)."""
        if self._loaders:
            raise RuntimeError("EnergonStream.load_state_dict must come before the first sample")
        state = _Unpickler(io.BytesIO(blob)).load()
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"the checkpoint's energon data state has version {state.get('version')}; "
                              f"this megafusion reads {_STATE_VERSION}")
        self.slot, self.skipped = int(state["slot"]), int(state["skipped"])
        self.pending = None if state["pending"] is None else [
            Segment(tokens=t, latents=lat, modality=int(m), clean=bool(c)) for t, lat, m, c in state["pending"]]
        self._restore = state
        dp_rank, dp_size = state["rank"]
        self.bind(dp_rank, dp_size)
