"""Weighted blending, DP sharding and exact resume of the document stream and packed batches."""

import numpy as np
import pytest

from megafusion.data.mixture import Loader, Mixture, PackedStream
from megafusion.data.packing import Segment, SequencePacker
from megafusion.data.sample import IMAGE


class ListSource:
    """Source s, document i: tokens [s*1000 + i] * length (and sometimes an image)."""

    def __init__(self, source: int, n: int, seed: int = 0):
        rng = np.random.default_rng(seed + source)
        self.lengths = rng.integers(1, 12, n)
        self.images = rng.random(n) < 0.3
        self.source = source

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        doc = [Segment(tokens=np.full(self.lengths[i], self.source * 1000 + i))]
        if self.images[i]:
            doc.append(Segment(latents=np.full((3, 2), float(self.source * 1000 + i), np.float32), modality=IMAGE))
        return doc


def ident(doc):
    return int(doc[0].tokens[0])


def make(weights=(0.5, 0.3, 0.2), sizes=(50, 30, 7), **kw):
    return Mixture([ListSource(s, n) for s, n in enumerate(sizes)], weights, **kw)


def test_proportions_follow_weights_at_every_prefix():
    mix = make(seed=3)
    sources = [ident(next(mix)) // 1000 for _ in range(1000)]
    for n in (10, 100, 1000):
        counts = np.bincount(sources[:n], minlength=3)
        np.testing.assert_allclose(counts, np.array([0.5, 0.3, 0.2]) * n, atol=1.0)
    # a source smaller than its share wraps into a new epoch: each epoch is a permutation
    draws = [i % 1000 for i in (np.array(sources) == 2).nonzero()[0]]
    mix = make(seed=3)
    ids = [ident(next(mix)) for _ in range(1000)]
    from2 = [i % 1000 for i in ids if i // 1000 == 2]
    assert len(draws) == len(from2) == 200
    for e in range(len(from2) // 7):
        assert sorted(from2[7 * e: 7 * e + 7]) == list(range(7))
    assert from2[:7] != from2[7:14]  # reshuffled per epoch


def test_deterministic_given_seed():
    m1, m2, m3 = make(seed=1), make(seed=1), make(seed=2)
    s1 = [ident(next(m1)) for _ in range(200)]
    assert s1 == [ident(next(m2)) for _ in range(200)]
    s3 = [ident(next(m3)) for _ in range(200)]
    assert s1 != s3 and sorted(i // 1000 for i in s1) == sorted(i // 1000 for i in s3)


def test_data_parallel_ranks_split_the_global_stream():
    world = 3
    glob = make(seed=5)
    global_stream = [ident(next(glob)) for _ in range(90)]
    for rank in range(world):
        mix = make(seed=5, rank=rank, world_size=world)
        assert [ident(next(mix)) for _ in range(30)] == global_stream[rank::world]


def test_mixture_resumes_exactly():
    mix = make(seed=7, rank=1, world_size=2)
    for _ in range(37):
        next(mix)
    state = mix.state_dict()
    expected = [ident(next(mix)) for _ in range(50)]
    fresh = make(seed=7, rank=1, world_size=2)
    fresh.load_state_dict(state)
    assert [ident(next(fresh)) for _ in range(50)] == expected
    with pytest.raises(ValueError, match="seed"):
        make(seed=8, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        make(weights=(1, 1, 1), seed=7, rank=1, world_size=2).load_state_dict(state)


def packed_stream(seed=0, **kw):
    return PackedStream(make(seed=seed), SequencePacker(seq_len=32, latent_dim=2, pad_id=0, boi_id=1, eoi_id=2), **kw)


def samples_equal(a, b):
    return all((getattr(a, k) == getattr(b, k)).all() for k in a.__dict__)


def test_packed_stream_and_loader_resume_equal_uninterrupted():
    ref = packed_stream()
    reference = [next(ref) for _ in range(30)]
    # PackedStream: checkpoint after 11 samples
    s = packed_stream()
    for _ in range(11):
        next(s)
    state = s.state_dict()
    resumed = packed_stream()
    resumed.load_state_dict(state)
    assert all(samples_equal(next(resumed), reference[11 + k]) for k in range(19))

    # Loader with a prefetch thread: state counts only batches handed out
    loader = Loader(packed_stream(), batch_size=3, prefetch=3)
    first = [next(loader) for _ in range(4)]
    state = loader.state_dict()
    loader.close()  # rewinds past the prefetched batches: iterating on continues at batch 4
    cont = next(loader)
    loader.close()
    for b, batch in enumerate(first):
        for j in range(3):
            assert samples_equal(type(batch)(**{k: v[j] for k, v in batch.__dict__.items()}), reference[3 * b + j])
    again = Loader(packed_stream(), batch_size=3)
    again.load_state_dict(state)
    nxt = next(again)
    again.close()
    assert samples_equal(nxt, cont)
    for j in range(3):
        assert samples_equal(type(nxt)(**{k: v[j] for k, v in nxt.__dict__.items()}), reference[12 + j])


def test_worker_processes_read_the_same_stream_and_resume():
    ref = packed_stream()
    reference = [next(ref) for _ in range(20)]
    s = packed_stream(num_workers=2, lookahead=8)
    try:
        assert all(samples_equal(next(s), want) for want in reference[:9])
        state = s.state_dict()
        s.load_state_dict(packed_stream().state_dict())  # back to the start, read-ahead dropped
        assert samples_equal(next(s), reference[0])
        s.load_state_dict(state)
        assert all(samples_equal(next(s), want) for want in reference[9:])
    finally:
        s.close()


def test_resume_inside_a_split_document():
    def stream():
        return PackedStream(make(seed=2), SequencePacker(seq_len=6, latent_dim=2, pad_id=0, boi_id=1, eoi_id=2,
                                                         long_documents="split"))

    ref = stream()
    reference = [next(ref) for _ in range(40)]
    assert ref.packer.stats.split_documents > 0
    mid_piece = 0
    for k in range(1, 40):
        s = stream()
        for _ in range(k):
            next(s)
        state = s.state_dict()
        mid_piece += state["piece"] > 0
        resumed = stream()
        resumed.load_state_dict(state)
        assert all(samples_equal(next(resumed), want) for want in reference[k:k + 3])
    assert mid_piece > 0  # some checkpoints fell inside a split document
