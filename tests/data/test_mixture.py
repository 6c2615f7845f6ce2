"""Megatron-style blending (exact proportions, epoch permutations) and index-addressable packing."""

import numpy as np
import pytest

from megafusion.data.mixture import BlendedIndex, Mixture, PackedIndex, quotas
from megafusion.data.packing import Segment, SequencePacker
from megafusion.data.sample import IMAGE


class ListSource:
    """Source s, document i: tokens [s*1000 + i] * length (and sometimes an image of 3 latents)."""

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


def prefix_counts(sources: np.ndarray, n_sources: int) -> np.ndarray:
    """[N, S]: documents of each source among the first n + 1 slots."""
    onehot = np.zeros((len(sources), n_sources), dtype=np.int64)
    onehot[np.arange(len(sources)), sources] = 1
    return onehot.cumsum(0)


def reference_furthest_behind(weights: np.ndarray, n: int) -> np.ndarray:
    """The rule written plainly: slot g goes to argmax_s w_s (g + 1) - count_s."""
    counts = np.zeros(len(weights))
    out = []
    for g in range(n):
        s = int(np.argmax(weights * (g + 1) - counts))
        counts[s] += 1
        out.append(s)
    return np.array(out)


@pytest.mark.parametrize("block", [100, 1 << 16])
def test_proportions_are_exact_at_every_prefix(block):
    blend = BlendedIndex([50, 30, 7], [0.5, 0.3, 0.2], seed=3, block=block)
    sources, _ = blend.locate(np.arange(1000))  # 10 repetitions of the 100-slot pattern
    n = np.arange(1, 1001)[:, None]
    err = prefix_counts(sources, 3) - np.array([0.5, 0.3, 0.2]) * n
    assert np.abs(err).max() < 1.0


def test_pattern_is_the_furthest_behind_rule_and_blocks_hold_their_quota():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = int(rng.integers(1, 7))
        w = rng.random(s) + 0.05
        w[rng.random(s) < 0.3] = 0.0
        w[0] += 0.05
        blend = BlendedIndex([13] * s, w, seed=0, block=256)
        assert blend.quota.sum() == 256 and np.abs(blend.quota - w / w.sum() * 256).max() < 1
        sources, _ = blend.locate(np.arange(3 * 256))
        np.testing.assert_array_equal(sources[:256], reference_furthest_behind(blend.weights, 256))
        np.testing.assert_array_equal(np.bincount(sources[:256], minlength=s), blend.quota)
        assert not np.isin(sources, np.flatnonzero(w == 0)).any()  # weight 0: never read
        n = np.arange(1, 3 * 256 + 1)[:, None]
        assert np.abs(prefix_counts(sources, s) - blend.weights * n).max() < 2.0


def test_each_epoch_is_a_fresh_permutation_and_the_seed_decides():
    def draws(seed):
        sources, index = BlendedIndex([50, 30, 7], [0.5, 0.3, 0.2], seed=seed).locate(np.arange(1000))
        return index[sources == 2], index[sources == 0]

    small, large = draws(3)
    assert len(small) == 200
    epochs = [small[7 * e: 7 * e + 7] for e in range(len(small) // 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 20  # reshuffled per epoch
    assert sorted(large[:50]) == list(range(50))
    again_small, again_large = draws(3)
    other_small, _ = draws(4)
    assert (again_small == small).all() and (again_large == large).all()
    assert not (other_small == small).all()


def test_any_slot_is_located_on_its_own():
    full = BlendedIndex([50, 30, 7], [0.5, 0.3, 0.2], seed=1, block=100)
    want_s, want_i = full.locate(np.arange(2000))
    picks = np.random.default_rng(0).permutation(2000)[:300]
    fresh = BlendedIndex([50, 30, 7], [0.5, 0.3, 0.2], seed=1, block=100)
    got = [fresh.locate(np.array([g])) for g in picks]  # one at a time, out of order
    assert [int(s[0]) for s, _ in got] == want_s[picks].tolist()
    assert [int(i[0]) for _, i in got] == want_i[picks].tolist()


def test_bad_weights_and_sources_are_refused():
    with pytest.raises(ValueError, match="one weight per source"):
        BlendedIndex([3, 3], [1.0], seed=0)
    with pytest.raises(ValueError, match="positive sum"):
        BlendedIndex([3], [0.0], seed=0)
    with pytest.raises(ValueError, match="empty but have a positive weight"):
        BlendedIndex([3, 0], [1.0, 1.0], seed=0)
    with pytest.raises(ValueError, match="weigh less than"):
        quotas([1.0, 1e-9], 1 << 16)


def reference_next_fit(lengths: list[int], seq_len: int, max_docs: int) -> list[int]:
    """Sample boundaries of a plain sequential next-fit over clipped lengths."""
    starts, used, count = [0], 0, 0
    for g, n in enumerate(lengths):
        n = min(n, seq_len)
        if used + n > seq_len or count == max_docs:
            starts.append(g)
            used, count = 0, 0
        used += n
        count += 1
    return starts


@pytest.mark.parametrize("chunk", [5, 1 << 14])
def test_packing_is_greedy_next_fit_over_the_blended_stream(chunk):
    rng = np.random.default_rng(1)
    lengths = [rng.integers(0, 40, 60), rng.integers(0, 4, 25)]  # some longer than a sequence, some empty
    blend = BlendedIndex([60, 25], [0.7, 0.3], seed=2, block=100)
    packed = PackedIndex(blend, lengths, seq_len=32, max_docs=6, chunk=chunk)
    n_slots = 3000
    s, k = blend.locate(np.arange(n_slots))
    want = reference_next_fit([int(lengths[a][b]) for a, b in zip(s, k)], 32, 6)
    got = [packed.slots(i) for i in range(len(want) - 2)]
    assert [r.start for r in got] == want[:len(got)]
    assert all(r.stop == nxt.start for r, nxt in zip(got, got[1:]))  # every slot in exactly one sample


def test_samples_are_pure_functions_of_their_index():
    def mixture():
        sources = [ListSource(s, n) for s, n in enumerate((50, 30, 7))]
        packer = SequencePacker(seq_len=32, latent_dim=2, pad_id=0, boi_id=1, eoi_id=2)
        return Mixture(sources, [0.5, 0.3, 0.2], packer, seed=7)

    forward = mixture()
    reference = [forward.sample(i) for i in range(40)]
    backward = mixture()
    for i in reversed(range(40)):
        got = backward.sample(i)
        assert all(np.array_equal(getattr(got, f), getattr(reference[i], f)) for f in got.__dict__)
    # sample i holds exactly its slots' documents, in order (first token = source*1000 + index)
    for i in (0, 17, 39):
        s = reference[i]
        docs = forward.documents(i)
        starts = [int(s.tokens[(s.doc_ids == d).nonzero()[0][0]]) for d in range(len(docs))]
        assert starts == [src * 1000 + k for src, k in docs]
        assert (s.doc_ids == len(docs)).sum() == 32 - sum(forward.packed.lengths[a][b] for a, b in docs)


def test_wrong_document_lengths_are_caught():
    sources = [ListSource(0, 10)]
    packer = SequencePacker(seq_len=32, latent_dim=2, pad_id=0, boi_id=1, eoi_id=2)
    with pytest.raises(ValueError, match="sizes"):
        Mixture(sources, None, packer, seed=0, lengths=[np.ones(9, dtype=np.int64)])
    mix = Mixture(sources, None, packer, seed=0, lengths=[np.ones(10, dtype=np.int64)])  # claims 1 position each
    with pytest.raises(ValueError, match="does not fit"):
        mix.sample(0)
