"""Flow-matching paths: parameterisations, time shift, per-span noising, loss."""

import math

import pytest
import torch

from megafusion.diffusion.flow import (
    PREDICTIONS,
    FlowMatchingConfig,
    add_noise,
    auto_shift,
    convert,
    flow_matching_loss,
    make_target,
    resolve_shift,
    time_shift,
    to_velocity,
    to_x0,
)


def _pack():
    """Two rows: text, an image span, a 3-frame video (one span per frame, the first clean), padding."""
    span_ids = torch.tensor([
        [-1, 0, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1],
        [-1, 4, 4, -1, 5, 5, -1, 6, 6, -1, -1, -1],
    ])
    doc_ids = torch.tensor([
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
    ])
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    clean[1, 1:3] = True  # the first video frame is a context frame
    latents = torch.randn(2, 12, 3, dtype=torch.float64) * (span_ids >= 0).unsqueeze(-1)
    return latents, span_ids, doc_ids, clean


def test_time_shift_identity_monotone_and_towards_noise():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(time_shift(t, 1.0), t)
    for shift in (0.25, 0.7, 2.0, 5.0):
        s = time_shift(t, shift)
        assert s[0] == 0 and s[-1] == 1
        assert (s[1:] > s[:-1]).all(), "time shift must be strictly increasing"
        inner = slice(1, -1)
        assert ((s[inner] > t[inner]) if shift > 1 else (s[inner] < t[inner])).all()
    # inverse shift undoes the shift
    torch.testing.assert_close(time_shift(time_shift(t, 3.0), 1 / 3.0), t)
    assert auto_shift(4096) == 1.0 and auto_shift(4 * 4096) == 2.0


@pytest.mark.parametrize("src", PREDICTIONS)
def test_parameterisations_convert_consistently(src):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 8, generator=g, dtype=torch.float64)
    t = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = (1 - t) * x0 + t * eps
    pred = make_target(x0, eps, src)
    for dst in PREDICTIONS:
        torch.testing.assert_close(convert(pred, x_t, t, src, dst), make_target(x0, eps, dst))
    torch.testing.assert_close(to_velocity(pred, x_t, t, src), eps - x0)
    torch.testing.assert_close(to_x0(pred, x_t, t, src), x0)
    # the velocity is the time derivative of the path
    dt = 1e-6
    torch.testing.assert_close(((1 - t - dt) * x0 + (t + dt) * eps - x_t) / dt, eps - x0)


def test_add_noise_per_span_timesteps_clean_spans_and_targets():
    torch.manual_seed(0)
    latents, span_ids, doc_ids, clean = _pack()
    for prediction in PREDICTIONS:
        cfg = FlowMatchingConfig(prediction=prediction, clean_fraction=0.0, cfg_dropout=0.0)
        out = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(3))
        is_latent = span_ids >= 0
        for b in range(2):
            for s in span_ids[b].unique().tolist():
                if s < 0:
                    continue
                ts = out.t[b][span_ids[b] == s]
                assert (ts == ts[0]).all(), "all positions of a span share one timestep"
        # clean span: t = 0, x_t = x0, no loss; every other span noised
        assert (out.t[clean] == 0).all() and not out.loss_mask[clean].any()
        torch.testing.assert_close(out.x_t[clean], latents[clean])
        noised = is_latent & ~clean
        assert (out.t[noised] > 0).all() and out.loss_mask[noised].all()
        # text: t = 0, zero input, no loss
        assert (out.t[~is_latent] == 0).all() and (out.x_t[~is_latent] == 0).all()
        assert not out.loss_mask[~is_latent].any()
        # the path and the target
        tt = out.t.unsqueeze(-1).double()
        torch.testing.assert_close(out.x_t, (1 - tt) * latents + tt * out.noise)
        torch.testing.assert_close(out.target, make_target(latents, out.noise, prediction))
    # three frames of the video got independent timesteps
    assert out.t[1, 4] != out.t[1, 7]


def test_add_noise_restricts_loss_to_image_loss_mask_and_handles_unbatched():
    latents, span_ids, _, clean = _pack()
    cfg = FlowMatchingConfig(cfg_dropout=0.0)
    ilm = (span_ids >= 0) & ~clean
    ilm[0, 1] = False
    out = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0), image_loss_mask=ilm)
    assert torch.equal(out.loss_mask, ilm)
    single = add_noise(latents[0], span_ids[0], clean[0], cfg, torch.Generator().manual_seed(0))
    assert single.x_t.shape == latents[0].shape and single.t.shape == span_ids[0].shape


def test_logit_normal_and_auto_shift_per_span_size():
    # 600 spans of alternating sizes 1 and 4 positions, C = 4096 -> auto shifts 1 and 2
    sizes = torch.tensor([1, 4] * 300)
    span_ids = torch.repeat_interleave(torch.arange(600), sizes)[None]
    C = 16
    latents = torch.zeros(1, span_ids.shape[1], C)
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    base = FlowMatchingConfig(time_shift=1.0, clean_fraction=0.0, logit_normal_mean=0.3, logit_normal_std=0.8)
    t0 = add_noise(latents, span_ids, clean, base, torch.Generator().manual_seed(5)).t[0]
    first = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    t_span = t0[first].double()
    u = torch.log(t_span / (1 - t_span))
    assert abs(u.mean().item() - 0.3) < 0.1 and abs(u.std().item() - 0.8) < 0.08
    # the same draws under 'auto': each span shifted by sqrt(size * C / 4096)
    auto = FlowMatchingConfig(time_shift="auto", clean_fraction=0.0, logit_normal_mean=0.3, logit_normal_std=0.8)
    t1 = add_noise(latents, span_ids, clean, auto, torch.Generator().manual_seed(5)).t[0]
    expected = time_shift(t_span, torch.sqrt(sizes.double() * C / 4096))
    torch.testing.assert_close(t1[first].double(), expected, rtol=1e-5, atol=1e-6)


def test_noise_capping_fraction_and_range():
    span_ids = torch.arange(2000)[None]
    latents = torch.zeros(1, 2000, 2)
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    common = dict(time_shift=1.0, cfg_dropout=0.0)
    t_all = add_noise(latents, span_ids, clean, FlowMatchingConfig(clean_fraction=1.0, clean_t_max=0.3, **common),
                      torch.Generator().manual_seed(0)).t
    assert t_all.max() <= 0.3 and t_all.max() > 0.25
    # capped timesteps are uniform in [0, clean_t_max] whatever the shift: inference conditions
    # on clean images (t = 0), which a shifted draw scaled down would almost never reach
    shifted = add_noise(latents, span_ids, clean, FlowMatchingConfig(clean_fraction=1.0, clean_t_max=0.3,
                                                                     time_shift=3.0, cfg_dropout=0.0),
                        torch.Generator().manual_seed(0)).t[0]
    assert abs(shifted.mean().item() - 0.15) < 0.01
    assert abs((shifted < 0.03).float().mean().item() - 0.1) < 0.02
    out = add_noise(latents, span_ids, clean, FlowMatchingConfig(clean_fraction=0.25, clean_t_max=0.3, **common),
                    torch.Generator().manual_seed(0))
    assert out.loss_mask.all(), "capped images keep their diffusion loss"
    frac_low = (out.t <= 0.3).float().mean().item()
    natural_low = 0.5 * (1 + math.erf(math.log(0.3 / 0.7) / math.sqrt(2)))  # P(sigmoid(u) <= 0.3), u ~ N(0, 1)
    p_low = 0.25 + 0.75 * natural_low  # capped, or uncapped but already low
    assert abs(frac_low - p_low) < 0.04
    # eligibility restricts which spans may be capped
    eligible = torch.zeros_like(clean)
    eligible[0, :1000] = True
    out = add_noise(latents, span_ids, clean, FlowMatchingConfig(clean_fraction=1.0, clean_t_max=0.3, **common),
                    torch.Generator().manual_seed(0), cap_eligible=eligible)
    assert out.t[0, :1000].max() <= 0.3 and out.t[0, 1000:].max() > 0.9


def test_frame_time_shift_moves_only_frame_spans():
    """``frame_time_shift`` shifts the same logit-normal draws of frame spans by its own
    value (image spans keep ``time_shift``); without ``is_frame`` nothing changes."""
    span_ids = torch.arange(1000).repeat_interleave(2)[None]  # 2 positions per span
    latents = torch.zeros(1, 2000, 2)
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    is_frame = span_ids % 2 == 1  # odd spans are video frames
    common = dict(clean_fraction=0.0, time_shift=3.0, cfg_dropout=0.0)
    base = add_noise(latents, span_ids, clean, FlowMatchingConfig(**common), torch.Generator().manual_seed(0)).t[0]
    cfg = FlowMatchingConfig(frame_time_shift=10.0, **common)
    out = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0), is_frame=is_frame).t[0]
    frames = is_frame[0]
    torch.testing.assert_close(out[~frames], base[~frames], rtol=0, atol=0)
    drawn = time_shift(base[frames].double(), 1 / 3.0)  # the shift-3 map inverted: shift(., 1/s) undoes s
    torch.testing.assert_close(out[frames].double(), time_shift(drawn, 10.0), rtol=1e-5, atol=1e-6)
    assert out[frames].mean() > base[frames].mean() + 0.05
    plain = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0)).t[0]
    torch.testing.assert_close(plain, base, rtol=0, atol=0)
    assert resolve_shift(cfg, 192, frame=True) == 10.0 and resolve_shift(cfg, 192) == 3.0
    with pytest.raises(ValueError, match="frame_time_shift"):
        FlowMatchingConfig(frame_time_shift=0.0)


def test_per_span_capping_fraction():
    """``cap_fraction`` gives each span its own capping probability (frames vs images);
    a constant equal to ``clean_fraction`` draws exactly what the default draws."""
    span_ids = torch.arange(2000).repeat_interleave(2)[None]  # 2 positions per span
    latents = torch.zeros(1, 4000, 2)
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    cfg = FlowMatchingConfig(clean_fraction=0.5, clean_t_max=0.3, time_shift=1.0, cfg_dropout=0.0)
    default = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0))
    same = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0),
                     cap_fraction=torch.full((1, 4000), 0.5))
    torch.testing.assert_close(same.t, default.t, rtol=0, atol=0)
    # first half of the spans never capped, second half always
    fraction = torch.where(span_ids < 1000, 0.0, 1.0)
    out = add_noise(latents, span_ids, clean, cfg, torch.Generator().manual_seed(0), cap_fraction=fraction)
    assert out.t[0, 2000:].max() <= 0.3
    natural_low = 0.5 * (1 + math.erf(math.log(0.3 / 0.7) / math.sqrt(2)))
    assert abs((out.t[0, :2000] <= 0.3).float().mean().item() - natural_low) < 0.05
    assert out.t[0, :2000].max() > 0.9
    with pytest.raises(ValueError, match="frame_clean_fraction"):
        FlowMatchingConfig(frame_clean_fraction=1.5)


def test_cfg_dropout_flags_spans_or_documents():
    span_ids = torch.arange(4000)[None]
    latents = torch.zeros(1, 4000, 2)
    clean = torch.zeros_like(span_ids, dtype=torch.bool)
    out = add_noise(latents, span_ids, clean, FlowMatchingConfig(cfg_dropout=0.1), torch.Generator().manual_seed(0))
    assert abs(out.drop_condition.float().mean().item() - 0.1) < 0.02
    # per document: all positions of a document carry the same flag
    latents, span_ids, doc_ids, clean = _pack()
    seen = set()
    for seed in range(20):
        out = add_noise(latents, span_ids, clean, FlowMatchingConfig(cfg_dropout=0.5),
                        torch.Generator().manual_seed(seed), doc_ids=doc_ids)
        for b in range(2):
            for d in doc_ids[b].unique():
                flags = out.drop_condition[b][doc_ids[b] == d]
                assert (flags == flags[0]).all()
                seen.add(bool(flags[0]))
    assert seen == {True, False}


def test_flow_matching_loss_masked_mean():
    pred = torch.randn(2, 5, 3, requires_grad=True)
    target = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    expected = torch.stack([((pred[b, n] - target[b, n]) ** 2).mean() for b, n in mask.nonzero().tolist()]).mean()
    torch.testing.assert_close(flow_matching_loss(pred, target, mask), expected)
    per_pos = flow_matching_loss(pred, target, mask, reduction="none")
    assert per_pos.shape == (2, 5) and (per_pos[~mask] == 0).all()
    empty = flow_matching_loss(pred, target, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0 and pred.grad is not None


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="prediction"):
        FlowMatchingConfig(prediction="noise")
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatchingConfig(time_shift="big")
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatchingConfig(time_shift=0.0)
    assert FlowMatchingConfig(time_shift="2.5").time_shift == 2.5
    with pytest.raises(ValueError, match="clean_t_max"):
        FlowMatchingConfig(clean_t_max=0.0)


def test_add_noise_on_a_text_only_batch():
    latents = torch.zeros(2, 5, 3)
    span_ids = torch.full((2, 5), -1)
    out = add_noise(latents, span_ids, torch.zeros(2, 5, dtype=torch.bool), FlowMatchingConfig(),
                    torch.Generator().manual_seed(0), doc_ids=torch.zeros(2, 5, dtype=torch.long))
    assert (out.t == 0).all() and not out.loss_mask.any() and (out.x_t == 0).all()
