"""Training-time reading of preprocessed datasets: ShapesWorld files -> tools -> packed samples."""

import pytest
import torch

from megafusion.config import ConfigError, load_config
from megafusion.data.indexed_stream import IndexedStream
from megafusion.data.sample import IGNORE_INDEX, TEXT
from megafusion.quickstart import SCALES, prepare_data, train_overrides


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    tokenizer, prefixes = prepare_data(out, SCALES["quick"], seed=0)
    return tokenizer, prefixes


def _cfg(prepared, *extra):
    tokenizer, prefixes = prepared
    return load_config(None, [*train_overrides(tokenizer, prefixes, steps=3, device="cpu"),
                              "model.seq_length=128", *extra])


def test_samples_are_deterministic_and_well_formed(prepared):
    stream = IndexedStream.from_config(_cfg(prepared))
    tok = stream.tokenizer
    for i in range(6):
        a, b = stream.sample(i), stream.sample(i)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents, b.latents)
        for span in a.span_ids.unique().tolist():
            if span < 0:
                continue
            where = (a.span_ids == span).nonzero().flatten()
            assert len(where) == stream.representation.tokens_per_image
            assert where.max() - where.min() + 1 == len(where)  # contiguous
            assert a.tokens[where.min() - 1] == tok.boi_id and a.tokens[where.max() + 1] == tok.eoi_id
        latents = a.latents[a.modality != TEXT]
        assert latents.numel() == 0 or latents.abs().max() <= 1.0 + 1e-6  # pixels in [-1, 1]
        assert (a.latents[a.modality == TEXT] == 0).all()
        text = a.labels != IGNORE_INDEX
        assert (a.modality[text] == TEXT).all()
    assert not torch.equal(stream.sample(0).tokens, stream.sample(1).tokens)


def test_sources_are_blended(prepared):
    """Every source shows up: images, video frames and plain text across 40 packs."""
    stream = IndexedStream.from_config(_cfg(prepared))
    seen = torch.cat([stream.sample(i).modality for i in range(40)]).unique().tolist()
    assert seen == [0, 1, 2]


def test_latent_width_mismatch_names_the_dataset(prepared):
    with pytest.raises(ConfigError, match="holds latents of width 192 .* makes 48"):
        IndexedStream.from_config(_cfg(prepared, "vision.patch_size=4"))


def test_missing_dataset_says_how_to_make_one(prepared, tmp_path):
    cfg = _cfg(prepared, f"data.paths=[{tmp_path / 'nothing'}]", "data.weights=[1.0]")
    with pytest.raises(ConfigError, match="make one with tools/preprocess_data.py"):
        IndexedStream.from_config(cfg)


def test_document_lengths_from_the_indexes_match_the_documents(prepared):
    """The packing index is built from .idx/layout lengths alone: they must equal the real ones."""
    from megafusion.data.indexed_stream import packed_lengths
    from megafusion.data.packing import document_length

    stream = IndexedStream.from_config(_cfg(prepared))
    for source in stream.sources:
        lengths = packed_lengths(source)
        assert lengths.tolist() == [document_length(source[k]) for k in range(len(source))]


def test_packs_read_the_sources_in_exact_proportions(prepared):
    """The documents of packs 0..n-1 are a prefix of the blended stream: every source within one
    document of its weight, each source's documents without repeats inside an epoch."""
    import numpy as np

    stream = IndexedStream.from_config(_cfg(prepared))
    docs = [d for i in range(30) for d in stream.mixture.documents(i)]
    weights = np.asarray(stream.weights, dtype=np.float64) / sum(stream.weights)
    counts = np.zeros(len(weights))
    for n, (s, _) in enumerate(docs, start=1):
        counts[s] += 1
        assert np.abs(counts - weights * n).max() < 1.0
    for s, source in enumerate(stream.sources):
        first_epoch = [k for src, k in docs if src == s][:len(source)]
        assert len(set(first_epoch)) == len(first_epoch)
    # pack 7 holds those documents: its text positions carry their tokens in order
    sample = stream.sample(7)
    first = [int(sample.tokens[(sample.doc_ids == d).nonzero()[0][0]]) for d in range(len(stream.mixture.documents(7)))]
    want = []
    for s, k in stream.mixture.documents(7):
        seg = stream.sources[s][k][0]
        want.append(int(seg.tokens[0]) if seg.is_text else stream.tokenizer.boi_id)
    assert first == want
