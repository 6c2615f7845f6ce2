"""Training-time loading: weighted blending of document sources, packing, batching.

``Mixture`` blends sources the way Megatron's ``BlendedDataset`` does: document ``i`` of
the global stream comes from the source whose share is furthest behind its weight
(``argmax_s  w_s * max(i, 1) - count_s``), so proportions are exact up to one document at
every prefix of the stream. Inside a source, documents are drawn in a fresh seeded
permutation per epoch. Data-parallel rank ``r`` of ``W`` takes the global documents
``i = r, r + W, r + 2W, ...``; every rank packs its own share.

The state (global position and per-source counts) is a few integers: ``state_dict()``
goes into the checkpoint and ``load_state_dict()`` resumes the exact same stream.
``PackedStream`` and ``Loader`` extend that to packed samples and batches.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from megafusion.data.packing import Document, SequencePacker
from megafusion.data.sample import Sample


class DocumentSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Document: ...


class Mixture:
    """An endless, deterministic, DP-sharded stream of documents from weighted sources."""

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float] | None = None, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not sources:
            raise ValueError("a Mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        empty = [i for i, s in enumerate(sources) if len(s) == 0 and weights[i] > 0]
        if empty:
            raise ValueError(f"sources {empty} are empty but have a positive weight")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), rank, world_size, shuffle
        self.position = 0  # next global document index
        self.counts = np.zeros(len(sources), dtype=np.int64)  # documents drawn per source so far
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # -- the stream ------------------------------------------------------------------------
    def _choose(self) -> int:
        error = self.weights * max(self.position, 1) - self.counts
        return int(np.argmax(error))

    def _source_index(self, source: int, draw: int) -> int:
        n = len(self.sources[source])
        epoch, offset = divmod(draw, n)
        if not self.shuffle:
            return offset
        cached = self._perm_cache.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, source, epoch])
            cached = (epoch, rng.permutation(n))
            self._perm_cache[source] = cached
        return int(cached[1][offset])

    def next_index(self) -> tuple[int, int]:
        """Advances to this rank's next document; returns (source, index in source)."""
        while True:
            source = self._choose()
            draw = int(self.counts[source])
            self.counts[source] += 1
            mine = self.position % self.world_size == self.rank
            self.position += 1
            if mine:
                return source, self._source_index(source, draw)

    def __iter__(self):
        return self

    def __next__(self) -> Document:
        source, index = self.next_index()
        return self.sources[source][index]

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "counts": self.counts.tolist(), "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"mixture state was saved with {key}={state[key]}, this mixture has "
                                 f"{getattr(self, key)}; resume with the same data settings")
        if len(state["counts"]) != len(self.sources) or not np.allclose(state["weights"], self.weights):
            raise ValueError(f"mixture state was saved for weights {state['weights']}, this mixture has "
                             f"{self.weights.tolist()}; resume with the same sources and weights")
        self.position = int(state["position"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)


_WORKER_SOURCES: list = []


def _init_worker(sources) -> None:
    _WORKER_SOURCES[:] = sources


def _load_document(source: int, index: int) -> Document:
    return _WORKER_SOURCES[source][index]


class PackedStream:
    """Packed ``Sample``s from a ``Mixture``; resumable exactly through ``state_dict``.

    The state is the mixture's state before the first document not yet inside an
    emitted sample (and which of its pieces comes next, when long documents are split), so
    a restored stream re-reads that document and continues identically.

    ``num_workers`` > 0 reads documents (memory-mapped reads, decoding, ``latent_transform``)
    in that many processes, ``lookahead`` documents ahead, in the same order as without.
    """

    def __init__(self, mixture: Mixture, packer: SequencePacker, num_workers: int = 0, lookahead: int = 64):
        self.mixture, self.packer = mixture, packer
        self.num_workers, self.lookahead = num_workers, max(lookahead, 1)
        self._pool = None
        if num_workers > 0:
            import multiprocessing as mp

            self._pool = mp.get_context("fork").Pool(num_workers, _init_worker, (mixture.sources,))
        self._queue: deque = deque()  # (mixture state before the document, document or async result)
        # pieces of the current document not yet packed: (mixture state before it, piece number, piece)
        self._pieces: deque = deque()
        self._skip = 0  # pieces of the next document already packed before a resume

    def _fill(self) -> None:
        while len(self._queue) < (self.lookahead if self._pool is not None else 1):
            state = self.mixture.state_dict()
            source, index = self.mixture.next_index()
            item = (self._pool.apply_async(_load_document, (source, index)) if self._pool is not None
                    else self.mixture.sources[source][index])
            self._queue.append((state, item))

    def _next_document(self) -> tuple[dict, Document]:
        self._fill()
        state, item = self._queue.popleft()
        return state, item.get() if self._pool is not None else item

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        while True:
            if not self._pieces:
                state, doc = self._next_document()
                pieces = list(enumerate(self.packer.prepare(doc)))[self._skip:]
                self._pieces.extend((state, k, piece) for k, piece in pieces)
                self._skip = 0
                continue
            piece = self._pieces[0][2]
            if not self.packer.empty and not self.packer.fits(piece):
                return self.packer.flush()
            self.packer.add(piece)
            self._pieces.popleft()
            if self.packer.full:
                return self.packer.flush()

    def state_dict(self) -> dict:
        if not self.packer.empty:
            raise RuntimeError("state_dict() is taken between samples; a sample is half built")
        if self._pieces:
            state, piece, _ = self._pieces[0]
            return {"mixture": state, "piece": piece}
        if self._queue:
            return {"mixture": self._queue[0][0], "piece": 0}
        return {"mixture": self.mixture.state_dict(), "piece": 0}

    def load_state_dict(self, state: dict) -> None:
        self._queue.clear()  # documents read ahead are dropped (results of workers are ignored)
        self._pieces.clear()
        self.mixture.load_state_dict(state["mixture"])
        self.packer.reset()
        self._skip = int(state.get("piece", 0))

    def close(self) -> None:
        """Stops the worker processes."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __del__(self):
        self.close()


class Loader:
    """Batches of packed samples, built ahead by a background thread.

    ``state_dict()`` is the position after the last batch handed out (prefetched batches
    are not counted), so a checkpoint taken after step k resumes at batch k + 1. Batches
    are pinned when CUDA is available so the host-to-device copy can overlap compute.
    """

    def __init__(self, stream: PackedStream, batch_size: int, *, prefetch: int = 2, pin_memory: bool | None = None):
        self.stream, self.batch_size, self.prefetch = stream, batch_size, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._state = stream.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _produce(self):
        try:
            while not self._stop.is_set():
                batch = Sample.collate([next(self.stream) for _ in range(self.batch_size)])
                if self.pin_memory:
                    batch = Sample(**{k: v.pin_memory() for k, v in batch.__dict__.items()})
                item = (batch, self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # surfaces in the training thread
            self._queue.put(err)

    def _start(self):
        self._stop.clear()
        self._queue = queue.Queue(maxsize=max(self.prefetch, 1))
        self._thread = threading.Thread(target=self._produce, daemon=True, name="megafusion-loader")
        self._thread.start()

    def close(self):
        """Stops the prefetch thread and rewinds the stream to the last batch handed out."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.load_state_dict(self._state)

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def __del__(self):
        self.close()


def make_loader(prefixes: Sequence[str], weights: Sequence[float] | None, *, seq_len: int, batch_size: int,
                seed: int = 0, rank: int = 0, world_size: int = 1, latent_dim: int | None = None,
                latent_transform=None, prefetch: int = 2, num_workers: int = 0,
                long_documents: str = "truncate") -> Loader:
    """The training loader over preprocessed datasets (``tools/preprocess_data.py`` prefixes).

    Special token ids come from the datasets' ``meta.json`` (they must agree: one tokenizer);
    ``latent_dim`` defaults to the multimodal datasets' (they must agree: one encoder), or 1
    for text only. ``latent_transform`` maps each [T, C] float32 array on load (latent
    normalisation). ``num_workers`` processes read documents ahead (see ``PackedStream``).
    Resume with ``loader.load_state_dict(state)``.
    """
    from megafusion.data.indexed import IndexedDocuments

    sources = [IndexedDocuments(p, latent_transform=latent_transform) for p in prefixes]
    ids = {(s.meta.get("pad_id"), s.meta.get("boi_id"), s.meta.get("eoi_id")) for s in sources}
    ids.discard((None, None, None))
    if len(ids) != 1:
        raise ValueError(f"datasets {list(prefixes)} disagree on (or lack) special token ids {sorted(ids)}; "
                         "preprocess them with the same tokenizer")
    dims = {s.latent_dim for s in sources if s.multimodal}
    if latent_dim is None:
        if len(dims) > 1:
            raise ValueError(f"datasets have latent widths {sorted(dims)}; preprocess them with the same encoder")
        latent_dim = dims.pop() if dims else 1
    pad_id, boi_id, eoi_id = ids.pop()
    mixture = Mixture(sources, weights, seed=seed, rank=rank, world_size=world_size)
    packer = SequencePacker(seq_len, latent_dim, pad_id, boi_id, eoi_id, long_documents=long_documents)
    return Loader(PackedStream(mixture, packer, num_workers=num_workers), batch_size, prefetch=prefetch)
