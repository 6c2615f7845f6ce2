"""Preprocessed indexed datasets -> packed ``Sample``s (``data.kind: indexed``).

The training-time reader of what ``tools/preprocess_data.py`` writes. Like the in-process
ShapesWorld stream, packed sequence ``i`` is a pure function of ``(seed, i)``: its ``j``-th
document is drawn with a generator keyed on ``(seed, i, j)`` (a source by
``data.weights``, then a document of that source, with replacement), so any
data-parallel layout and any resume read the same data and the data position is simply
the step. Sources are blended by weight in expectation (Megatron-style blending, sampled).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from megafusion.config import ConfigError
from megafusion.data.indexed import IndexedDocuments
from megafusion.data.packing import Document, SequencePacker, pack_drawn_documents
from megafusion.data.sample import Sample

_MAX_DOCS = 256  # per sequence; a guard, far above what fits


@dataclass
class IndexedStream:
    seed: int
    seq_len: int
    tokenizer: object
    representation: object
    sources: list[IndexedDocuments]
    weights: list[float]

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        self._probs = w / w.sum()
        tok = self.tokenizer
        self.packer = SequencePacker(self.seq_len, self.latent_dim, tok.pad_id, tok.boi_id, tok.eoi_id)

    @classmethod
    def from_config(cls, cfg) -> "IndexedStream":
        from megafusion.data.shapes_stream import load_tokenizer
        from megafusion.vision import representation_from_config

        d = cfg.data
        if not d.paths:
            raise ConfigError("data.kind = indexed needs data.paths: the output prefixes of tools/preprocess_data.py")
        if d.tokenizer is None:
            raise ConfigError("data.kind = indexed needs data.tokenizer: the sentencepiece .model the data was "
                              "preprocessed with")
        weights = list(d.weights) or [1.0] * len(d.paths)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.weights = {weights} must be non-negative with a positive sum")
        rep = representation_from_config(cfg.vision)

        def normalize(latents: np.ndarray) -> np.ndarray:
            return rep.normalize(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))).float().numpy()

        sources = []
        for prefix in d.paths:
            try:
                source = IndexedDocuments(prefix, latent_transform=normalize)
            except FileNotFoundError as err:
                raise ConfigError(f"data.paths: {err}") from None
            if source.latent_dim is not None and source.latent_dim != rep.latent_dim:
                raise ConfigError(
                    f"data.paths: {prefix} holds latents of width {source.latent_dim} but vision."
                    f"{cfg.vision.representation} (image_size {cfg.vision.image_size}) makes {rep.latent_dim}; "
                    "preprocess with the same --encoder / --image-size / --patch-size as the vision section")
            sources.append(source)
        return cls(cfg.train.seed, cfg.model.seq_length, load_tokenizer(d.tokenizer), rep, sources, weights)

    @property
    def latent_dim(self) -> int:
        return self.representation.latent_dim

    @property
    def tokens_per_image(self) -> int:
        return self.representation.tokens_per_image

    def document(self, i: int, j: int) -> Document:
        """Document ``j`` of packed sequence ``i``: a source by weight, then one of its documents."""
        rng = np.random.default_rng([self.seed, zlib.crc32(b"indexed_stream"), int(i), j])
        source = self.sources[int(rng.choice(len(self.sources), p=self._probs))]
        return source[int(rng.integers(len(source)))]

    def sample(self, i: int) -> Sample:
        """Packed sequence ``i``."""
        return pack_drawn_documents(self.packer, lambda j: self.document(i, j), _MAX_DOCS)
