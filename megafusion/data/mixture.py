"""Megatron-style blending of document sources, index-addressable.

Everything here is a pure function of ``(source sizes, weights, seed)`` and an index, so
any process, data-parallel layout or resumed run computes the same data with no shared
state, and the data position of a run is just its step.

- ``BlendedIndex``: global document slot ``g`` -> (source, index in source). Slot ``g``
  goes to the source that is furthest behind its weight, ``argmax_s w_s * (g + 1) - c_s``
  (``c_s``: earlier slots of ``s``), the rule of Megatron's ``BlendedDataset``. The
  pattern is computed once for a block of ``2**16`` slots and repeated: weights are
  rounded to multiples of ``2**-16`` so that a block holds exactly its quota, and every
  prefix of the stream stays within about one document of its weights (within 1 for up
  to three sources in practice, < 2 in general). The ``k``-th document drawn from a source of
  ``n`` documents is ``perm_e[k % n]`` with ``e = k // n``: a fresh seeded permutation per
  epoch (Megatron's shuffled document index).
- ``PackedIndex``: packed sample ``i`` -> a contiguous run of slots. Greedy next-fit over
  the documents' packed lengths (a document longer than the sequence counts as the whole
  sequence: it is truncated): sample ``i`` takes slots from where sample ``i - 1`` stopped
  while they fit. Every document of the blended stream lands in exactly one sample.
- ``Mixture``: both, over the sources themselves: ``sample(i)`` is packed sample ``i``.

Megatron's C++ ``build_blending_indices`` is not used: it weighs ``max(g, 1)`` instead of
``g + 1``, which can draw a weight-0 source and overshoots a quota by one.
"""

from __future__ import annotations

import zlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from megafusion.data.packing import Document, SequencePacker, document_length, truncate_document
from megafusion.data.sample import Sample

BLOCK = 1 << 16  # slots per repetition of the blending pattern (weights resolve to 1/BLOCK)
_TAG = zlib.crc32(b"megafusion.mixture")


class DocumentSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Document: ...


def quotas(weights: Sequence[float], block: int) -> np.ndarray:
    """Documents per source in one block: ``weights`` normalised to sum ``block`` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be finite, >= 0, with a positive sum; got {list(weights)}")
    raw = w / w.sum() * block
    q = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - q), kind="stable")
    q[order[: block - int(q.sum())]] += 1
    tiny = [s for s in range(len(w)) if w[s] > 0 and q[s] == 0]
    if tiny:
        raise ValueError(f"mixture weights {list(weights)}: sources {tiny} weigh less than 1/{block} of the "
                         "total and would never be read; raise their weights or drop them")
    return q


def blending_pattern(quota: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The furthest-behind rule over one block: (source of each slot, its draw number in the block)."""
    block, n = int(quota.sum()), len(quota)
    w = [int(x) / block for x in quota]  # exact in float64: no platform can round differently
    counts = [0] * n
    sources = array("h")
    draws = array("q")
    order = range(n)
    for g in range(block):
        t = g + 1
        s = max(order, key=lambda k: w[k] * t - counts[k])  # ties: the lowest source index
        sources.append(s)
        draws.append(counts[s])
        counts[s] += 1
    return np.frombuffer(sources, dtype=np.int16).copy(), np.frombuffer(draws, dtype=np.int64).copy()


class BlendedIndex:
    """Global document slot -> (source, index in source); see the module docstring."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, block: int = BLOCK):
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights; give one weight per source")
        self.sizes = [int(n) for n in sizes]
        self.quota = quotas(weights, block)
        empty = [s for s, n in enumerate(self.sizes) if n == 0 and self.quota[s] > 0]
        if empty:
            raise ValueError(f"sources {empty} are empty but have a positive weight")
        self.seed, self.block = int(seed), block
        self.pattern, self.draw_in_block = blending_pattern(self.quota)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def weights(self) -> np.ndarray:
        """The weights actually used (the given ones rounded to multiples of 1/block)."""
        return self.quota / self.block

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """Order of ``source``'s documents in ``epoch``."""
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, _TAG, source, epoch])
            perm = rng.permutation(self.sizes[source])
            self._perms[key] = perm
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.popitem(last=False)
        return perm

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots [K] int -> (source [K], index in source [K])."""
        slots = np.asarray(slots, dtype=np.int64)
        blocks, within = np.divmod(slots, self.block)
        sources = self.pattern[within].astype(np.int64)
        draws = blocks * self.quota[sources] + self.draw_in_block[within]  # k-th document of its source
        index = np.empty_like(slots)
        for s in range(len(self.sizes)):
            sel = sources == s
            if not sel.any():
                continue
            epochs, offsets = np.divmod(draws[sel], self.sizes[s])
            first, last = int(epochs.min()), int(epochs.max())
            if first == last:
                index[sel] = self.permutation(s, first)[offsets]
                continue
            out = np.empty_like(offsets)
            span = range(first, last + 1) if last - first < len(epochs) else np.unique(epochs).tolist()
            for e in span:
                at = epochs == e
                if at.any():
                    out[at] = self.permutation(s, e)[offsets[at]]
            index[sel] = out
        return sources, index


class PackedIndex:
    """Packed sample -> its slots ``range(start, stop)``, greedy next-fit (module docstring).

    ``lengths[s][k]``: positions document ``k`` of source ``s`` takes once packed. Sample
    boundaries are found ``chunk`` slots at a time and kept (8 bytes per sample), so reaching
    sample ``i`` the first time costs time linear in ``i`` (vectorised: about a second per
    million samples); later look-ups are O(1).
    """

    def __init__(self, blend: BlendedIndex, lengths: Sequence[np.ndarray], seq_len: int, max_docs: int = 256,
                 chunk: int = 1 << 14):
        if [len(x) for x in lengths] != blend.sizes:
            raise ValueError(f"document lengths for sources of sizes {[len(x) for x in lengths]}, "
                             f"the blend has {blend.sizes}")
        self.blend, self.seq_len, self.max_docs, self.chunk = blend, int(seq_len), int(max_docs), int(chunk)
        self.lengths = [np.minimum(np.asarray(x, dtype=np.int64), self.seq_len) for x in lengths]
        self._starts = array("q", [0])

    def slot_lengths(self, slots: np.ndarray) -> np.ndarray:
        sources, index = self.blend.locate(slots)
        out = np.empty(len(slots), dtype=np.int64)
        for s in range(len(self.lengths)):
            sel = sources == s
            out[sel] = self.lengths[s][index[sel]]
        return out

    def _extend(self) -> None:
        """Appends the boundaries of at least one more sample."""
        start, size = self._starts[-1], self.chunk
        while True:
            cum = np.zeros(size + 1, dtype=np.int64)
            np.cumsum(self.slot_lengths(np.arange(start, start + size)), out=cum[1:])
            # stop[a]: the first slot that no longer fits a sample starting at slot a
            stop = np.searchsorted(cum, cum[:-1] + self.seq_len, side="right") - 1
            stop = np.minimum(stop, np.arange(size) + self.max_docs).tolist()
            found, a = [], 0
            while stop[a] < size:  # == size: the chunk ended first; undecided
                a = stop[a]
                found.append(start + a)
            if found:
                self._starts.extend(found)
                return
            size *= 2  # one sample spans more slots than the chunk (many tiny documents)

    def slots(self, i: int) -> range:
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        while len(self._starts) <= i + 1:
            self._extend()
        return range(self._starts[i], self._starts[i + 1])


class Mixture:
    """Packed samples from weighted document sources: ``sample(i)`` is a pure function of ``(seed, i)``.

    ``lengths`` (optional): per source, the packed length of every document (see
    ``PackedIndex``); computed by reading every document when not given, which only small
    sources should rely on.
    """

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float] | None, packer: SequencePacker,
                 *, seed: int, lengths: Sequence[np.ndarray] | None = None, max_docs: int = 256, block: int = BLOCK):
        if not sources:
            raise ValueError("a Mixture needs at least one source")
        if packer.long_documents != "truncate":
            raise ValueError("the index-addressable mixture truncates documents longer than a sequence; "
                             "use a packer with long_documents='truncate'")
        self.sources = list(sources)
        weights = [1.0] * len(sources) if weights is None else list(weights)
        self.blend = BlendedIndex([len(s) for s in sources], weights, seed, block)
        if lengths is None:
            lengths = [np.array([document_length(src[k]) for k in range(len(src))], dtype=np.int64)
                       for src in self.sources]
        self.packed = PackedIndex(self.blend, lengths, packer.seq_len, max_docs)
        self.packer = packer

    def slots(self, i: int) -> range:
        return self.packed.slots(i)

    def documents(self, i: int) -> list[tuple[int, int]]:
        """(source, index in source) of the documents of packed sample ``i``, in order."""
        s = self.slots(i)
        sources, index = self.blend.locate(np.arange(s.start, s.stop))
        return list(zip(sources.tolist(), index.tolist()))

    def sample(self, i: int) -> Sample:
        """Packed sample ``i``."""
        packer = self.packer
        packer.reset()
        for s, k in self.documents(i):
            doc = self.sources[s][k]
            if document_length(doc) > packer.seq_len:
                doc, _ = truncate_document(doc, packer.seq_len)
                packer.stats.truncated_documents += 1
            if doc:
                packer.add(doc)  # fits by construction; raises if the lengths given were wrong
        return packer.flush()
