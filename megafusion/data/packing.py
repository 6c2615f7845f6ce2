"""Pack documents (text + image/frame latent spans) into fixed-length ``Sample``s.

A *document* is a list of ``Segment``s in reading order: runs of text token ids and
visual spans (one image, or one video frame: latents ``[T, C]``). The packer writes each
visual span as ``<boi>`` + T latent positions + ``<eoi>``, so the stored token streams
never contain the latent positions themselves.

Packing is greedy and in order: a document that fits the space left in the current
sequence is appended; one that does not fit closes the sequence (the rest is padding)
and starts the next. A document longer than the whole sequence is truncated at a span
boundary (text may be cut between any two tokens; an image span is kept whole or dropped
with everything after it), or split there into several documents (``long_documents``),
and counted in ``PackingStats``. Image spans are never split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from megafusion.data.sample import IGNORE_INDEX, IMAGE, TEXT, VIDEO, Sample


@dataclass
class Segment:
    """One piece of a document: text tokens, or one visual span.

    - text: ``tokens`` [L] int ids, ``latents`` None.
    - visual: ``latents`` [T, C] float (clean, normalised), ``modality`` IMAGE or VIDEO,
      ``clean`` True when the span is conditioning only (no diffusion loss).
    """

    tokens: np.ndarray | None = None
    latents: np.ndarray | None = None
    modality: int = TEXT
    clean: bool = False

    def __post_init__(self):
        if (self.tokens is None) == (self.latents is None):
            raise ValueError("a Segment holds either text tokens or latents, not both/neither")
        if self.latents is not None:
            if self.modality not in (IMAGE, VIDEO):
                raise ValueError(f"a visual segment needs modality IMAGE or VIDEO, got {self.modality}")
            if self.latents.ndim != 2:
                raise ValueError(f"latents must be [T, C], got shape {tuple(self.latents.shape)}")

    @property
    def is_text(self) -> bool:
        return self.latents is None

    @property
    def length(self) -> int:
        """Positions the segment occupies once packed (a visual span adds <boi>, <eoi>)."""
        return len(self.tokens) if self.is_text else self.latents.shape[0] + 2


Document = list[Segment]


def document_length(doc: Document) -> int:
    return sum(seg.length for seg in doc)


def truncate_document(doc: Document, max_len: int) -> tuple[Document, int]:
    """Cuts ``doc`` to at most ``max_len`` positions at a span boundary; returns (doc, dropped)."""
    total = document_length(doc)
    out: Document = []
    used = 0
    for seg in doc:
        room = max_len - used
        if seg.length <= room:
            out.append(seg)
            used += seg.length
            continue
        if seg.is_text and room > 0:
            out.append(Segment(tokens=seg.tokens[:room]))
            used += room
        break  # a visual span that does not fit is dropped whole, and so is the rest
    return out, total - used


def split_document(doc: Document, max_len: int) -> tuple[list[Document], int]:
    """Cuts ``doc`` into pieces of at most ``max_len`` positions at span boundaries (text between
    any two tokens, a visual span only whole); returns (pieces, dropped positions): a visual span
    longer than ``max_len`` cannot be placed and is dropped. Each piece packs as a document."""
    pieces: list[Document] = []
    cur: Document = []
    used = dropped = 0
    for seg in doc:
        if not seg.is_text:
            if seg.length > max_len:
                dropped += seg.length
                continue
            if used + seg.length > max_len:
                pieces.append(cur)
                cur, used = [], 0
            cur.append(seg)
            used += seg.length
            continue
        tokens = seg.tokens
        while len(tokens):
            if used == max_len:
                pieces.append(cur)
                cur, used = [], 0
            room = max_len - used
            cur.append(Segment(tokens=tokens[:room]))
            used += min(room, len(tokens))
            tokens = tokens[room:]
    if cur:
        pieces.append(cur)
    return pieces, dropped


@dataclass
class PackingStats:
    documents: int = 0
    samples: int = 0
    truncated_documents: int = 0
    split_documents: int = 0
    dropped_positions: int = 0  # positions lost by truncation (or images too long to place)
    padding_positions: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SequencePacker:
    """Builds ``Sample``s of ``seq_len`` positions with latent width ``latent_dim``.

    ``long_documents``: what happens to a document longer than ``seq_len``: ``truncate``
    (keep its start, cut at a span boundary) or ``split`` (pack all of it as several
    documents, cut at span boundaries, as Megatron's GPT datasets do for text).
    """

    seq_len: int
    latent_dim: int
    pad_id: int
    boi_id: int
    eoi_id: int
    long_documents: str = "truncate"
    stats: PackingStats = field(default_factory=PackingStats)

    def __post_init__(self):
        if self.long_documents not in ("truncate", "split"):
            raise ValueError(f"long_documents must be 'truncate' or 'split', got {self.long_documents!r}")
        self._docs: list[Document] = []
        self._used = 0

    def prepare(self, doc: Document) -> list[Document]:
        """The document(s) to pack for ``doc``: itself, truncated, or split (counted in ``stats``)."""
        if document_length(doc) <= self.seq_len:
            return [doc] if doc else []
        if self.long_documents == "truncate":
            doc, dropped = truncate_document(doc, self.seq_len)
            self.stats.truncated_documents += 1
            self.stats.dropped_positions += dropped
            return [doc] if doc else []
        pieces, dropped = split_document(doc, self.seq_len)
        self.stats.split_documents += 1
        self.stats.dropped_positions += dropped
        return [p for p in pieces if p]

    # -- incremental interface (used by the resumable stream) --------------------------
    def fits(self, doc: Document) -> bool:
        return self._used + document_length(doc) <= self.seq_len

    @property
    def empty(self) -> bool:
        return not self._docs

    @property
    def full(self) -> bool:
        return self._used == self.seq_len

    def reset(self) -> None:
        """Drops a half-built sample (the stats keep counting)."""
        self._docs, self._used = [], 0

    def add(self, doc: Document) -> None:
        """Appends a document that ``fits`` (one from ``prepare``)."""
        length = document_length(doc)
        if length > self.seq_len - self._used:
            raise ValueError(f"a document of {length} positions does not fit the {self.seq_len - self._used} left; "
                             "flush() first, and pass documents through prepare()")
        for seg in doc:
            if not seg.is_text and seg.latents.shape[1] != self.latent_dim:
                raise ValueError(f"image latents have width {seg.latents.shape[1]}, the packer expects "
                                 f"{self.latent_dim}; all sources of a mixture need the same encoder")
        self._docs.append(doc)
        self._used += length
        self.stats.documents += 1

    def flush(self) -> Sample:
        sample = build_sample(self._docs, self.seq_len, self.latent_dim, self.pad_id, self.boi_id, self.eoi_id)
        self.stats.samples += 1
        self.stats.padding_positions += self.seq_len - self._used
        self._docs, self._used = [], 0
        return sample

    # -- one-shot interface --------------------------------------------------------------
    def pack(self, docs: Iterable[Document]) -> Iterator[Sample]:
        """Yields packed samples; the last, partly filled one too."""
        for whole in docs:
            for doc in self.prepare(whole):
                if not self.fits(doc) and not self.empty:
                    yield self.flush()
                self.add(doc)
        if not self.empty:
            yield self.flush()


def build_sample(docs: list[Document], seq_len: int, latent_dim: int, pad_id: int, boi_id: int,
                 eoi_id: int) -> Sample:
    """Lays documents out one after another and pads to ``seq_len`` (see ``Sample``)."""
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    latents = np.zeros((seq_len, latent_dim), dtype=np.float32)
    modality = np.full(seq_len, TEXT, dtype=np.int64)
    doc_ids = np.zeros(seq_len, dtype=np.int64)
    span_ids = np.full(seq_len, -1, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    clean = np.zeros(seq_len, dtype=bool)
    is_text = np.ones(seq_len, dtype=bool)

    pos, span = 0, 0
    for doc_index, doc in enumerate(docs):
        start = pos
        for seg in doc:
            if seg.is_text:
                n = len(seg.tokens)
                tokens[pos:pos + n] = seg.tokens
                pos += n
                continue
            t = seg.latents.shape[0]
            tokens[pos] = boi_id
            sl = slice(pos + 1, pos + 1 + t)
            latents[sl] = seg.latents
            modality[sl] = seg.modality
            span_ids[sl] = span
            clean[sl] = seg.clean
            is_text[sl] = False
            tokens[pos + 1 + t] = eoi_id
            pos += t + 2
            span += 1
        doc_ids[start:pos] = doc_index
        positions[start:pos] = np.arange(pos - start)
        if pos > seq_len:
            raise ValueError(f"documents take {pos} positions, more than seq_len={seq_len}")
    # padding is one more document of its own
    doc_ids[pos:] = len(docs)
    positions[pos:] = np.arange(seq_len - pos)

    # next-token targets only where the next position is text of the same (real) document
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    has_next = is_text[:-1] & is_text[1:] & (doc_ids[:-1] == doc_ids[1:])
    has_next[max(pos - 1, 0):] = False  # padding has no targets
    labels[:-1][has_next] = tokens[1:][has_next]

    latent_pos = ~is_text
    return Sample(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        latents=torch.from_numpy(latents),
        modality=torch.from_numpy(modality),
        doc_ids=torch.from_numpy(doc_ids),
        span_ids=torch.from_numpy(span_ids),
        positions=torch.from_numpy(positions),
        clean_spans=torch.from_numpy(clean & latent_pos),
        image_loss_mask=torch.from_numpy(latent_pos & ~clean),
    )


def pack_drawn_documents(packer: SequencePacker, draw: Callable[[int], Document], max_docs: int) -> Sample:
    """One sequence from documents ``draw(0), draw(1), ...``, until the next one does not fit.

    The index-addressable streams use this: ``draw(j)`` is a pure function of the
    sequence's index and ``j``, so the sequence is too. A document longer than the whole
    sequence keeps its start (it only fits an empty sequence); the rest is padding.
    """
    packer.reset()
    for j in range(max_docs):
        doc = draw(j)
        if document_length(doc) > packer.seq_len:
            doc, _ = truncate_document(doc, packer.seq_len)
        if not packer.fits(doc):
            break
        if doc:
            packer.add(doc)
        if packer.full:
            break
    return packer.flush()
