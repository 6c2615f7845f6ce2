"""Packing documents into Samples, checked against a per-position reference written separately."""

import numpy as np
import pytest

from megafusion.data.packing import Segment, SequencePacker, document_length, split_document, truncate_document
from megafusion.data.sample import IGNORE_INDEX, IMAGE, TEXT, VIDEO, Sample

PAD, BOI, EOI = 0, 1, 2
C = 3


def random_doc(rng, max_images=3):
    doc = []
    for _ in range(rng.integers(1, 4)):
        doc.append(Segment(tokens=rng.integers(10, 100, rng.integers(1, 6))))
        if rng.random() < 0.7 and sum(not s.is_text for s in doc) < max_images:
            doc.append(Segment(latents=rng.standard_normal((int(rng.integers(1, 5)), C)).astype(np.float32),
                               modality=int(rng.choice([IMAGE, VIDEO])), clean=bool(rng.random() < 0.3)))
    return doc


def reference(docs, seq_len):
    """Flat per-position records, then each field from the definitions in sample.py."""
    pos = []  # (token, latent or None, modality, doc, span, clean)
    span = 0
    for d, doc in enumerate(docs):
        for seg in doc:
            if seg.is_text:
                pos += [(int(t), None, TEXT, d, -1, False) for t in seg.tokens]
            else:
                pos.append((BOI, None, TEXT, d, -1, False))
                pos += [(PAD, row, seg.modality, d, span, seg.clean) for row in seg.latents]
                pos.append((EOI, None, TEXT, d, -1, False))
                span += 1
    n_real = len(pos)
    pos += [(PAD, None, TEXT, len(docs), -1, False)] * (seq_len - n_real)
    out = {k: [] for k in ("tokens", "labels", "modality", "doc_ids", "span_ids", "positions", "clean", "loss")}
    latents = np.zeros((seq_len, C), np.float32)
    for i, (tok, lat, mod, doc, sp, clean) in enumerate(pos):
        out["tokens"].append(tok)
        nxt = pos[i + 1] if i + 1 < n_real else None
        ok = lat is None and i < n_real and nxt is not None and nxt[1] is None and nxt[3] == doc
        out["labels"].append(nxt[0] if ok else IGNORE_INDEX)
        out["modality"].append(mod)
        out["doc_ids"].append(doc)
        out["span_ids"].append(sp)
        out["positions"].append(sum(1 for p in pos[:i] if p[3] == doc))
        out["clean"].append(lat is not None and clean)
        out["loss"].append(lat is not None and not clean)
        if lat is not None:
            latents[i] = lat
    return out, latents


def check_sample(s: Sample, docs, seq_len):
    ref, latents = reference(docs, seq_len)
    assert s.tokens.tolist() == ref["tokens"]
    assert s.labels.tolist() == ref["labels"]
    assert s.modality.tolist() == ref["modality"]
    assert s.doc_ids.tolist() == ref["doc_ids"]
    assert s.span_ids.tolist() == ref["span_ids"]
    assert s.positions.tolist() == ref["positions"]
    assert s.clean_spans.tolist() == ref["clean"]
    assert s.image_loss_mask.tolist() == ref["loss"]
    np.testing.assert_array_equal(s.latents.numpy(), latents)


def test_pack_matches_reference_and_keeps_documents_whole():
    rng = np.random.default_rng(0)
    docs = [random_doc(rng) for _ in range(40)]
    seq_len = 48
    packer = SequencePacker(seq_len, C, PAD, BOI, EOI)
    samples = list(packer.pack(docs))
    # replay the greedy rule to know which documents went where
    groups, cur, used = [], [], 0
    for doc in docs:
        n = document_length(doc)
        assert n <= seq_len  # (this test has no truncation)
        if used + n > seq_len:
            groups.append(cur)
            cur, used = [], 0
        cur.append(doc)
        used += n
    groups.append(cur)
    assert len(samples) == len(groups) == packer.stats.samples
    for s, g in zip(samples, groups):
        assert s.tokens.shape == (seq_len,) and s.latents.shape == (seq_len, C)
        check_sample(s, g, seq_len)
    assert packer.stats.documents == 40 and packer.stats.truncated_documents == 0
    assert packer.stats.padding_positions == seq_len * len(samples) - sum(map(document_length, docs))
    batch = Sample.collate(samples)
    assert batch.tokens.shape == (len(samples), seq_len)


def test_long_documents_truncate_at_span_boundaries():
    img = np.ones((6, C), np.float32)
    doc = [Segment(tokens=np.arange(10, 15)), Segment(latents=img, modality=IMAGE),
           Segment(tokens=np.arange(20, 30))]  # 5 + 8 + 10 = 23 positions
    # room for the image: text after it is cut mid-segment
    cut, dropped = truncate_document(doc, 16)
    assert [s.length for s in cut] == [5, 8, 3] and dropped == 7
    # no room for the whole image: it is dropped, never split, and so is all that follows
    cut, dropped = truncate_document(doc, 10)
    assert [s.length for s in cut] == [5] and dropped == 18
    packer = SequencePacker(10, C, PAD, BOI, EOI)
    short = [Segment(tokens=np.array([50, 51]))]
    samples = list(packer.pack([short, doc, short]))
    assert len(samples) == 1  # truncated first, so the cut document (5 positions) fits after the short one
    check_sample(samples[0], [short, cut, short], 10)
    assert (samples[0].span_ids == -1).all()
    assert packer.stats.truncated_documents == 1 and packer.stats.dropped_positions == 18


def test_document_boundaries_have_no_targets_and_padding_is_its_own_document():
    a = [Segment(tokens=np.array([11, 12, 13]))]
    b = [Segment(latents=np.zeros((2, C), np.float32), modality=IMAGE, clean=True), Segment(tokens=np.array([14]))]
    s = next(SequencePacker(12, C, PAD, BOI, EOI).pack([a, b]))
    assert s.labels.tolist()[:3] == [12, 13, IGNORE_INDEX]  # 13 is the last token of doc a
    # b: <boi> (next is a latent: no target), 2 latents, <eoi> -> 14, 14 is last
    assert s.labels.tolist()[3:8] == [IGNORE_INDEX] * 3 + [14, IGNORE_INDEX]
    assert s.doc_ids.tolist() == [0] * 3 + [1] * 5 + [2] * 4
    assert s.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert s.clean_spans.tolist()[4:6] == [True, True] and not s.image_loss_mask.any()
    assert (s.labels[8:] == IGNORE_INDEX).all() and (s.tokens[8:] == PAD).all()


def test_latent_width_mismatch_is_refused():
    packer = SequencePacker(16, C, PAD, BOI, EOI)
    with pytest.raises(ValueError, match="width 5"):
        packer.add([Segment(latents=np.zeros((2, 5), np.float32), modality=IMAGE)])
    with pytest.raises(ValueError, match="either text tokens or latents"):
        Segment()


def test_split_mode_packs_every_position_of_long_documents():
    img = np.ones((6, C), np.float32)
    doc = [Segment(tokens=np.arange(10, 15)), Segment(latents=img, modality=IMAGE), Segment(tokens=np.arange(20, 30))]
    pieces, dropped = split_document(doc, 10)
    assert dropped == 0 and [[s.length for s in p] for p in pieces] == [[5], [8, 2], [8]]
    assert np.concatenate([s.tokens for p in pieces for s in p if s.is_text]).tolist() == \
        list(range(10, 15)) + list(range(20, 30))
    # an image longer than the sequence cannot be placed: dropped and counted, the text is kept
    pieces, dropped = split_document([Segment(latents=np.ones((12, C), np.float32), modality=IMAGE),
                                      Segment(tokens=np.arange(3))], 10)
    assert dropped == 14 and [[s.length for s in p] for p in pieces] == [[3]]
    packer = SequencePacker(10, C, PAD, BOI, EOI, long_documents="split")
    samples = list(packer.pack([doc]))
    assert len(samples) == 3 and packer.stats.split_documents == 1 and packer.stats.dropped_positions == 0
    check_sample(samples[1], [split_document(doc, 10)[0][1]], 10)
