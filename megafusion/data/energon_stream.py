"""Energon-prepared WebDataset datasets -> packed ``Sample``s (``data.kind: energon``).

``data.paths`` name Energon datasets of image-caption pairs (``CaptioningSample``: a folder
of tar shards prepared by ``energon prepare``) and, optionally, indexed datasets
(``tools/preprocess_data.py``) to blend in by ``data.weights``.

- Reading: one ``megatron.energon`` savable loader per Energon path and data-parallel rank
  (``WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=data.num_workers)``). Its
  worker processes decode the PNG/JPEG, tokenize the caption and encode the image with the
  run's representation (``megafusion.vision``: pixel / RAE / VAE) in ``encode_sample``, so
  the training process only packs.
- Documents: ``caption <boi> image <eoi> <eod>`` (generation) or, with probability
  ``1 - caption_first_prob``, ``<boi> image <eoi> caption <eod>`` (captioning), the order
  drawn from the sample's key; the ShapesWorld layout.
- Blending: document slot ``g`` of this rank is global slot ``g * dp_size + dp_rank`` of
  ``megafusion.data.mixture.BlendedIndex`` (Megatron's furthest-behind rule over
  ``data.weights``); an Energon source gives its next sample, an indexed source the
  document the index names (a seeded permutation per epoch).
- Packing: greedy next-fit; the document that does not fit opens the next sequence.
- Corrupt samples (an image that does not decode) are skipped and counted (``skipped``,
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
from megafusion.data.sample import IMAGE, Sample

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


@dataclass
class CaptionEncoder:
    """What the Energon workers run per sample: image + caption -> a document (or a skip)."""

    seed: int
    tokenizer: object
    representation: object
    image_size: int
    caption_first_prob: float = 0.8

    @torch.no_grad()
    def __call__(self, key: str, image, caption) -> dict:
        """A dict of plain values (it crosses the worker pipe): ``tokens`` (caption ids),
        ``latents`` [T, C], ``caption_first``; or ``skipped`` with the reason."""
        try:
            if isinstance(image, (bytes, bytearray, memoryview)):
                frame = decode_image(bytes(image), self.image_size)
            else:  # a decoder already made a tensor [C, H, W] in [0, 1]
                t = torch.as_tensor(image).float()
                frame = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                if frame.shape[:2] != (self.image_size, self.image_size):
                    raise ValueError(f"decoded image of shape {frame.shape} is not {self.image_size}x{self.image_size}")
        except Exception as err:  # corrupt or truncated image: skipped and counted
            return {"key": key, "skipped": f"{type(err).__name__}: {err}"}
        text = caption.decode("utf-8", errors="replace") if isinstance(caption, (bytes, bytearray)) else str(caption)
        images = torch.from_numpy(frame[None]).permute(0, 3, 1, 2).float() / 255.0
        rep = self.representation
        latents = rep.normalize(rep.encode(images)).float()[0].numpy()
        rng = np.random.default_rng([self.seed, zlib.crc32(b"energon_caption_order"), zlib.crc32(key.encode())])
        return {"key": key, "tokens": np.asarray(self.tokenizer.encode(text.strip()), dtype=np.int64),
                "latents": np.ascontiguousarray(latents, dtype=np.float32),
                "caption_first": bool(rng.random() < self.caption_first_prob)}


def _task_encoder(encode: CaptionEncoder):
    """An Energon TaskEncoder that runs ``encode`` in the loader workers (raw bytes in: the
    image is decoded by ``encode``, so a corrupt one is skipped and counted, not fatal)."""
    from megatron.energon import DefaultTaskEncoder

    class MegafusionCaptionEncoder(DefaultTaskEncoder):
        decoder = None  # raw bytes; CaptionEncoder decodes

        def encode_sample(self, sample):
            return encode(str(sample.__key__), sample.image, sample.caption)

        def batch(self, samples):
            return samples

    return MegafusionCaptionEncoder()


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
        self.encoder = CaptionEncoder(self.seed, tok, self.representation, self.image_size, self.caption_first_prob)
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
        tokenizer = load_tokenizer(d.tokenizer, getattr(d, "tokenizer_type", "SentencePieceTokenizer"))
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
        caption = Segment(tokens=np.asarray(item["tokens"], dtype=np.int64))
        image = Segment(latents=np.asarray(item["latents"], dtype=np.float32), modality=IMAGE)
        eod = Segment(tokens=np.asarray([self.tokenizer.eod_id], dtype=np.int64))
        return [caption, image, eod] if item["caption_first"] else [image, caption, eod]

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
