"""The Transfusion recipe (``megafusion.recipes.transfusion``): the loss formula, condition
dropout against a brute-force reference, noise caps, frame context, and micro-batches that do
not depend on the data-parallel layout. Moved from tests/model/test_transfusion.py (issue 25).
"""

import math

import numpy as np
import pytest
import torch

from megafusion.config import ConfigError, load_config, validate
from megafusion.data.byte_tokenizer import ByteTokenizer
from megafusion.data.sample import IGNORE_INDEX, IMAGE, TEXT, VIDEO

CONFIG = "examples/configs/tiny_transfusion.yaml"
SMALL = ["model.seq_length=128", "model.num_layers=2", "train.micro_batch_size=2", "train.device=cpu"]


def test_loss_formula_known_answer():
    from megafusion.recipes.transfusion import transfusion_loss

    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    target = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])
    batch = {"text_loss_mask": torch.tensor([[True, True, False, False]]), "target": target,
             "flow_loss_mask": torch.tensor([[False, False, True, True]]),
             "modality": torch.tensor([[TEXT, TEXT, IMAGE, VIDEO]])}
    loss, count, metrics = transfusion_loss(batch, 3.0, (ce, pred))
    # CE mean over text = 1.5; MSE per position: 1.0 (image) and 2.0 (video) -> mean 1.5
    assert loss.item() == pytest.approx(1.5 + 3.0 * 1.5)
    assert int(count) == 1
    assert metrics["loss_text"].tolist() == [3.0, 2.0]
    assert metrics["loss_image"].tolist() == [1.0, 1.0]
    assert metrics["loss_video"].tolist() == [2.0, 1.0]


def test_condition_dropout_matches_brute_force():
    from megafusion.recipes.transfusion import drop_text_condition

    rng = np.random.default_rng(0)
    for _ in range(20):
        B, N = 2, 30
        doc = np.sort(rng.integers(0, 4, (B, N)), axis=1)
        mod = np.where(rng.random((B, N)) < 0.3, IMAGE, TEXT)
        drop = rng.random((B, N)) < 0.5
        tokens = rng.integers(0, 256, (B, N))
        labels = rng.integers(0, 256, (B, N))
        out_t, out_l = drop_text_condition(*(torch.as_tensor(x) for x in (tokens, labels, mod, doc, drop)),
                                           null_id=999)
        for b in range(B):
            for i in range(N):
                later = [j for j in range(N) if doc[b, j] == doc[b, i] and mod[b, j] != TEXT]
                dropped = drop[b, i] and mod[b, i] == TEXT and bool(later) and i < min(later) - 1
                assert out_t[b, i] == (999 if dropped else tokens[b, i])
                assert out_l[b, i] == (IGNORE_INDEX if dropped else labels[b, i])


def test_micro_batches_do_not_depend_on_the_data_parallel_layout():
    provider_cfg = load_config(CONFIG, [*SMALL, "train.global_batch_size=4"])
    from megafusion.recipes.transfusion import TransfusionProvider

    provider = TransfusionProvider.__new__(TransfusionProvider)
    TransfusionProvider.__init__(provider, provider_cfg, None)
    single = provider.micro_batches(step=1, dp_rank=0, dp_size=1)
    split = provider.micro_batches(step=1, dp_rank=0, dp_size=2) + provider.micro_batches(step=1, dp_rank=1,
                                                                                          dp_size=2)
    assert len(single) == len(split) == 2
    for x, y in zip(single, split):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert not math.isclose(float(single[0]["x_t"].sum()), float(single[1]["x_t"].sum()))


def test_frame_clean_fraction_reaches_the_training_batches():
    """Video frames follow ``diffusion.frame_clean_fraction``, images ``clean_fraction``."""
    from megafusion.recipes.transfusion import TransfusionProvider

    def noisy_frames(fraction):
        cfg = load_config(CONFIG, [*SMALL, "model.seq_length=256", "train.global_batch_size=8",
                                   "data.shapes_weights={text: 0, image_text: 0, video: 0, action_video: 1}",
                                   "diffusion.clean_fraction=1.0", "diffusion.clean_t_max=0.25",
                                   f"diffusion.frame_clean_fraction={fraction}"])
        provider = TransfusionProvider.__new__(TransfusionProvider)
        TransfusionProvider.__init__(provider, cfg, None)
        noisy = frames = 0
        for b in provider.micro_batches(step=1, dp_rank=0, dp_size=1):
            for span, t, mod in zip(b["span_ids"], b["t"], b["modality"]):
                for u in span.unique().tolist():
                    if u >= 0 and int(mod[span == u][0]) == VIDEO:
                        frames += 1
                        noisy += int(float(t[span == u][0]) > 0.25)
        return noisy, frames

    capped_noisy, frames = noisy_frames(1.0)  # only each clip's last frame escapes the cap
    free_noisy, same_frames = noisy_frames(0.0)
    assert same_frames == frames > 10
    assert capped_noisy <= frames // 3 and free_noisy > 2 * capped_noisy  # measured: 8, 22 of 32


def test_frame_condition_noise_reaches_only_the_frame_before_input():
    """``diffusion.frame_condition_noise``: the batch's ``clean_latents`` (what each frame reads
    as the frame before it) get noise at video positions only, one std per sample within the
    bound; x_t, targets and everything else equal the noise-free batch."""
    from megafusion.recipes.transfusion import TransfusionProvider

    def batch(noise):
        cfg = load_config(CONFIG, [*SMALL, "model.seq_length=256", "train.global_batch_size=8",
                                   "data.shapes_weights={text: 0, image_text: 1, video: 0, action_video: 1}",
                                   f"diffusion.frame_condition_noise={noise}"])
        provider = TransfusionProvider.__new__(TransfusionProvider)
        TransfusionProvider.__init__(provider, cfg, None)
        return provider.batch(list(range(8)))

    plain, noised = batch(0.0), batch(0.5)
    for key in plain:
        if key != "clean_latents":
            assert torch.equal(plain[key], noised[key]), key
    video = plain["modality"] == VIDEO
    assert video.any() and (plain["modality"] == IMAGE).any()
    diff = noised["clean_latents"] - plain["clean_latents"]
    assert diff[~video].abs().max() == 0
    stds = [float(d[v].std()) for d, v in zip(diff, video) if v.any()]
    assert len(stds) > 2 and all(0 < x < 0.5 * 1.1 for x in stds) and max(stds) - min(stds) > 0.05
    assert torch.equal(batch(0.5)["clean_latents"], noised["clean_latents"])  # a pure function of the seed
    with pytest.raises(ConfigError, match="frame_condition_noise"):
        validate(load_config(CONFIG, ["diffusion.frame_condition_noise=-1"]), world_size=1)


def test_noise_capping_only_for_spans_that_condition_later_text():
    from megafusion.data.packing import Segment, build_sample
    from megafusion.recipes.transfusion import conditions_later_text

    tok = ByteTokenizer()
    image = Segment(latents=np.zeros((4, 3), np.float32), modality=IMAGE)
    text = lambda s: Segment(tokens=np.array(tok.encode(s)))  # noqa: E731
    eod = Segment(tokens=np.array([tok.eod_id]))
    docs = [[text("a cat"), image, eod],  # generation: the image conditions nothing after it
            [image, text("a dog"), eod],  # captioning: the caption is predicted from the image
            [text("two"), image, Segment(tokens=np.array([tok.frame_id])), image, eod]]  # a 2-frame clip
    s = build_sample(docs, 64, 3, tok.pad_id, tok.boi_id, tok.eoi_id)
    got = conditions_later_text(s.labels, s.span_ids, s.doc_ids)
    per_span = {span: bool(got[s.span_ids == span].all()) for span in range(4)}
    assert per_span == {0: False, 1: True, 2: True, 3: False}
    assert not got[s.span_ids < 0].any()


def test_conditions_later_text_equals_a_position_by_position_count():
    """The vectorised rule against its definition, on random packs of documents and spans."""
    from megafusion.recipes.transfusion import IGNORE_INDEX, conditions_later_text

    def by_definition(labels, span_ids, doc_ids):
        n, out = len(labels), torch.zeros(len(labels), dtype=torch.bool)
        for span in set(span_ids.tolist()) - {-1}:
            idx = (span_ids == span).nonzero().squeeze(1)
            first, eoi = int(idx[0]), int(idx[-1]) + 1
            later = [j for j in range(eoi + 1, n) if all(doc_ids[k] == doc_ids[first] for k in range(eoi, j + 1))]
            out[idx] = eoi < n and bool(doc_ids[eoi] == doc_ids[first]) and any(
                labels[j] != IGNORE_INDEX for j in later)
        return out

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 48, (1,), generator=g))
        doc = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
        labels = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, 9, (n,), generator=g),
                             torch.full((n,), IGNORE_INDEX))
        span, pos = torch.full((n,), -1), 0
        while pos < n:
            length = int(torch.randint(1, 6, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.4:
                span[pos:pos + length] = int(span.max()) + 1
            pos += length + int(torch.randint(0, 4, (1,), generator=g))
        assert torch.equal(conditions_later_text(labels, span, doc), by_definition(labels, span, doc))
