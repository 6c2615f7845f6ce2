"""Preprocessed indexed datasets -> packed ``Sample``s (``data.kind: indexed``).

The training-time reader of what ``tools/preprocess_data.py`` writes. Sources are blended
by ``data.weights`` the Megatron way (``megafusion.data.mixture``): exact proportions,
each source read in a seeded permutation per epoch, documents packed greedily. Packed
sequence ``i`` is a pure function of ``(seed, i)``, so any data-parallel layout and any
resume read the same data and the data position is simply the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megafusion.config import ConfigError
from megafusion.data.indexed import IndexedDocuments
from megafusion.data.mixture import Mixture
from megafusion.data.packing import SequencePacker
from megafusion.data.sample import Sample

_MAX_DOCS = 256  # per sequence; a guard, far above what fits


@dataclass
class IndexedStream:
    """Packed sample ``i`` of the blended sources, ``seq_len`` positions.

    ``representation``: the ``megafusion.vision`` representation the latents were made
    with; None for a text-only stream (``from_config(text_only=True)``, the text model),
    whose samples then have latents of width 0.
    """

    seed: int
    seq_len: int
    tokenizer: object
    representation: object
    sources: list[IndexedDocuments]
    weights: list[float]

    def __post_init__(self):
        tok = self.tokenizer
        packer = SequencePacker(self.seq_len, self.latent_dim, tok.pad_id, tok.boi_id, tok.eoi_id)
        self.mixture = Mixture(self.sources, self.weights, packer, seed=self.seed,
                               lengths=[packed_lengths(s) for s in self.sources], max_docs=_MAX_DOCS)

    @classmethod
    def from_config(cls, cfg, text_only: bool = False) -> "IndexedStream":
        """The stream of ``cfg.data``; ConfigError naming the path or setting that is wrong.

        ``text_only`` (the text model): no vision representation is built (``cfg.vision`` is
        not read) and a dataset holding images or video is refused, since the model has no
        way to read them; dropping them would teach it captions with a hole in the middle.
        """
        from megafusion.data.shapes_stream import load_tokenizer
        from megafusion.vision import representation_from_config

        d = cfg.data
        if not d.paths:
            raise ConfigError("data.kind = indexed needs data.paths: the output prefixes of tools/preprocess_data.py")
        if d.tokenizer is None:
            raise ConfigError("data.kind = indexed needs data.tokenizer: the tokenizer (a sentencepiece .model, or a "
                              "Hugging Face directory with data.tokenizer_type) the data was preprocessed with")
        weights = list(d.weights) or [1.0] * len(d.paths)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.weights = {weights} must be non-negative with a positive sum")
        rep = None if text_only else representation_from_config(cfg.vision)

        def normalize(latents: np.ndarray) -> np.ndarray:
            return rep.normalize(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))).float().numpy()

        sources = []
        for prefix in d.paths:
            try:
                source = IndexedDocuments(prefix, latent_transform=None if text_only else normalize)
            except FileNotFoundError as err:
                raise ConfigError(f"data.paths: {err}") from None
            if text_only:
                if source.multimodal:
                    raise ConfigError(
                        f"data.paths: {prefix} holds images or video ({source.meta.get('kind', 'multimodal')} "
                        "data); model.kind = text reads text only: preprocess with --kind text, or train "
                        "model.kind = transfusion")
                sources.append(source)
                continue
            if source.latent_dim is not None and source.latent_dim != rep.latent_dim:
                raise ConfigError(
                    f"data.paths: {prefix} holds latents of width {source.latent_dim} but vision."
                    f"{cfg.vision.representation} (image_size {cfg.vision.image_size}) makes {rep.latent_dim}; "
                    "preprocess with the same --encoder / --image-size / --patch-size as the vision section")
            sources.append(source)
        try:
            return cls(cfg.train.seed, cfg.model.seq_length, load_tokenizer(d.tokenizer, d.tokenizer_type), rep, sources, weights)
        except ValueError as err:  # an empty dataset with a weight, a weight too small to draw
            raise ConfigError(f"data.paths / data.weights ({list(d.paths)}, {weights}): {err}") from None

    @property
    def latent_dim(self) -> int:
        return 0 if self.representation is None else self.representation.latent_dim

    @property
    def tokens_per_image(self) -> int:
        return 0 if self.representation is None else self.representation.tokens_per_image

    def sample(self, i: int) -> Sample:
        """Packed sequence ``i``."""
        return self.mixture.sample(i)

    def truncation_notes(self, paths: list[str]) -> list[str]:
        """One line per source (``paths``: its prefix, in order) whose documents are longer than
        a sequence: the packer truncates them, so their tail is never trained on (Megatron
        would split them across sequences instead). Said at start, never silent."""
        notes = []
        for path, source in zip(paths, self.sources):
            lengths = packed_lengths(source)
            long = lengths > self.seq_len
            if long.any():
                lost = int((lengths[long] - self.seq_len).sum())
                notes.append(f"data: {int(long.sum())} of {len(lengths)} documents of {path} are longer than "
                             f"model.seq_length = {self.seq_len} and are truncated to it ({lost} of "
                             f"{int(lengths.sum())} positions, {100 * lost / lengths.sum():.1f}%, never trained on); "
                             "raise model.seq_length or split long documents before preprocessing")
        return notes


def packed_lengths(source: IndexedDocuments) -> np.ndarray:
    """[documents] int64: positions each document takes once packed, from the indexes alone.

    The token stream holds ``<boi> <eoi>`` for every image/frame; packing puts its ``T``
    latent positions between them.
    """
    lengths = np.asarray(source.tokens.sequence_lengths, dtype=np.int64).copy()
    if source.multimodal and len(source.layout):
        lengths += np.bincount(np.asarray(source.layout["doc"]), weights=np.asarray(source.layout["tokens"]),
                               minlength=len(lengths)).astype(np.int64)
    return lengths
