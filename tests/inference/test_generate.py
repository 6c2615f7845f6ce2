"""Generation from a checkpoint of the tiny Transfusion config, trained here by `megafusion train`.

Checked against independent references: KV-cached decoding against full recomputation;
the one-step ODE sample against the model's own x-prediction at t = 1 (and, with guidance,
against the conditional/unconditional predictions combined by hand).
"""

import json

import numpy as np
import pytest
import torch
from conftest import run_train

TRAIN = ["train.steps=2", "schedule.warmup_steps=1", "train.global_batch_size=2", "model.seq_length=128"]


def trained_run(tmp_path_factory):
    """One tiny trained run per test session (shared with tests/eval/test_eval_cli.py)."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny_transfusion_for_inference"
    if not (run_dir / "checkpoints").is_dir():
        run_train(run_dir, "tiny_transfusion.yaml", TRAIN)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir, cpu_layer):
    from megafusion.inference.loading import load_run

    with load_run(run_dir, device="cpu") as loaded:
        yield loaded


@pytest.fixture(scope="module")
def gens(loaded):
    from megafusion.inference.generate import Generator

    return Generator.from_run(loaded), Generator.from_run(loaded, use_cache=False)


def test_load_run_reads_the_checkpoint_weights(run_dir, loaded):
    """The loaded weights are the checkpoint's, not the initialisation's."""
    from megafusion.inference.loading import build_model

    assert loaded.step == 2
    with build_model(loaded.cfg, device="cpu") as fresh:
        a, b = dict(loaded.model.named_parameters()), dict(fresh.model.named_parameters())
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a), "trained weights equal the initialisation"


def test_kv_cached_decoding_equals_recomputation(gens):
    from megafusion.inference.generate import SamplingOptions

    cached, full = gens
    tok = cached.tokenizer
    s1, s2 = cached.new_state(), full.new_state()
    prompt = tok.encode("There is a small red") + [tok.boi_id]
    steps = [(s1.append_tokens(prompt), s2.append_tokens(prompt))]
    opts = SamplingOptions(steps=3, cfg_scale=2.0, seed=5)
    x1, x2 = cached.sample_latents(s1, opts), full.sample_latents(s2, opts)
    torch.testing.assert_close(x1, x2, atol=1e-5, rtol=0)
    for t in tok.encode(" circle.") + [tok.eod_id]:  # text after the image, one token at a time
        steps.append((s1.append_tokens([t]), s2.append_tokens([t])))
    for a, b in steps:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert s1.tokens == s2.tokens and len(s1) == len(prompt) + cached.tokens_per_image + 1 + 9
    # Greedy text decoding takes the same tokens either way.
    assert cached.generate("A big", 12).text == full.generate("A big", 12).text


def test_kv_cached_sampling_with_learned_patch_positions_and_1d_frames(loaded):
    """The cached path adds the learned patch positions and places frames (1-D under 3-D
    RoPE) exactly as the full forward does."""
    from dataclasses import replace

    from megafusion.inference.generate import Generator, SamplingOptions
    from megafusion.inference.loading import build_model

    cfg = replace(loaded.cfg, model=replace(loaded.cfg.model, patch_positions="learned", time_conditioning="adaln",
                                            image_positions="3d", frame_positions="1d"))
    with build_model(cfg, device="cpu") as fresh:
        with torch.no_grad():
            fresh.model.patch_position.table.weight.normal_(0, 1.0)  # make its effect large
        cached, full = Generator.from_run(fresh), Generator.from_run(fresh, use_cache=False)
        prompt = cached.tokenizer.encode("a red circle") + [cached.tokenizer.boi_id]
        s1, s2 = cached.new_state(), full.new_state()
        s1.append_tokens(prompt), s2.append_tokens(prompt)
        opts = SamplingOptions(steps=2, cfg_scale=2.0, seed=3)
        torch.testing.assert_close(cached.sample_latents(s1, opts), full.sample_latents(s2, opts), atol=1e-5, rtol=0)
        # frames (1-D positions under 3-D RoPE) through the cached rollout path
        frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        a = cached.rollout(frames, ["up", "left"], "The agent is a red circle.", opts)
        b = full.rollout(frames, ["up", "left"], "The agent is a red circle.", opts)
        assert a.shape == (1, 32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("override,weight_of", [
    ({"frame_conditioning": "previous"}, lambda m: m.previous_frame_in.proj.weight),
    ({"frame_conditioning": "window"}, lambda m: m.previous_frame_in.proj.weight),
    ({"action_conditioning": "embedding"}, lambda m: m.action_in.proj.weight)])
def test_kv_cached_rollout_with_frame_inputs(loaded, override, weight_of):
    """``frame_conditioning: previous | window`` / ``action_conditioning: embedding``: the
    cached rollout hands every sampled frame the frame before it (a context frame, then a
    generated one; its patch or the 3x3 window around it) and the action between them exactly
    as the full forward does, and that input is heard (zeroing its weights changes the
    rollout)."""
    from dataclasses import replace

    from megafusion.inference.generate import Generator, SamplingOptions
    from megafusion.inference.loading import build_model

    cfg = replace(loaded.cfg, model=replace(loaded.cfg.model, **override))
    with build_model(cfg, device="cpu") as fresh:
        weight = weight_of(fresh.model)
        with torch.no_grad():
            weight.normal_(0, 0.5)  # make its effect large
        cached, full = Generator.from_run(fresh), Generator.from_run(fresh, use_cache=False)
        frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        opts = SamplingOptions(steps=2, cfg_scale=2.0, seed=3)
        args = (frames, ["up", "left", "stay"], "The agent is a red circle.", opts)
        a, b = cached.rollout(*args), full.rollout(*args)
        assert a.shape == (2, 32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
        with torch.no_grad():
            weight.zero_()
        assert np.abs(cached.rollout(*args).astype(int) - a.astype(int)).max() > 8


def _x_prediction(gen, ids, noise, t=1.0, modality=None):
    """The model's latent prediction for a span of ``noise`` (an image's unless ``modality``
    says otherwise) after text ``ids`` (one full forward)."""
    from megafusion.data.sample import IMAGE, TEXT
    from megafusion.model.mask import HybridMaskInfo

    n, T = len(ids), noise.shape[0]
    tokens = torch.tensor(ids + [gen.tokenizer.pad_id] * T)[None]
    latents = torch.cat([torch.zeros(n, noise.shape[1]), noise])[None]
    modality = torch.tensor([TEXT] * n + [IMAGE if modality is None else modality] * T)[None]
    span = torch.tensor([-1] * n + [0] * T)[None]
    timesteps = torch.cat([torch.zeros(n), torch.full((T,), t)])[None]
    mask = HybridMaskInfo(torch.zeros_like(tokens), span).as_tensor()
    with torch.no_grad():
        _, pred = gen.model(tokens, torch.arange(n + T)[None], mask, latents=latents, timesteps=timesteps,
                            modality=modality)
    return pred[0, n:]


def test_ode_image_sampler_through_the_model(gens):
    from megafusion.inference.generate import SamplingOptions

    gen = gens[0]
    tok = gen.tokenizer
    T, C = gen.tokens_per_image, gen.latent_dim
    assert gen.cfg.diffusion.prediction == "x"
    prompt = tok.encode("a red circle") + [tok.boi_id]

    def sample(**kw):
        state = gen.new_state()
        state.append_tokens(prompt)
        return gen.sample_latents(state, SamplingOptions(**kw))

    # One Euler step from t = 1 with x-prediction lands on the model's x-prediction of the noise.
    noise = torch.randn(1, T, C, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(sample(steps=1, cfg_scale=1.0, seed=3), _x_prediction(gen, prompt, noise),
                               atol=1e-5, rtol=0)
    # With guidance: u + s (c - u), u predicted with the caption replaced by the null token.
    null = [tok.pad_id] * (len(prompt) - 1) + [tok.boi_id]
    c, u = _x_prediction(gen, prompt, noise), _x_prediction(gen, null, noise)
    torch.testing.assert_close(sample(steps=1, cfg_scale=2.5, seed=3), u + 2.5 * (c - u), atol=1e-4, rtol=0)

    a, b = sample(steps=3, method="heun", seed=1), sample(steps=3, method="heun", seed=1)
    assert a.shape == (T, C) and torch.equal(a, b)
    assert not torch.equal(a, sample(steps=3, method="heun", seed=2))
    assert not torch.equal(a, sample(steps=3, method="euler", seed=1))
    image = gen.generate_image("a red circle", SamplingOptions(steps=2, seed=1))
    size = gen.representation.image_size
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("span, kw, shift", [("image", dict(shift=100.0), 100.0),
                                             ("frame", dict(shift=7.0, frame_shift=30.0), 30.0),
                                             ("frame", dict(shift=7.0), 7.0)])
def test_sampling_shift_overrides_the_runs(gens, span, kw, shift):
    """Two Euler steps with x-prediction end on the model's x-prediction at the grid's middle
    time ``t1 = s / (1 + s)``, from ``t1 * noise + (1 - t1) * x0(noise, 1)``: the sample
    follows the requested shift (frames: ``frame_shift``, else the image shift, as the tiny
    run sets no frame shift of its own)."""
    from megafusion.data.sample import IMAGE, VIDEO
    from megafusion.inference.generate import SamplingOptions

    gen = gens[0]
    assert gen.cfg.diffusion.frame_time_shift is None and gen.cfg.diffusion.time_shift != shift
    modality = IMAGE if span == "image" else VIDEO
    tok = gen.tokenizer
    prompt = tok.encode("a red circle") + [tok.boi_id]
    state = gen.new_state()
    state.append_tokens(prompt)
    got = gen.sample_latents(state, SamplingOptions(steps=2, cfg_scale=1.0, seed=3, **kw), modality)
    noise = torch.randn(1, gen.tokens_per_image, gen.latent_dim, generator=torch.Generator().manual_seed(3))[0]
    t1 = shift / (1 + shift)
    x0 = _x_prediction(gen, prompt, noise, modality=modality)
    want = _x_prediction(gen, prompt, t1 * noise + (1 - t1) * x0, t=t1, modality=modality)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="frame_shift=0"):
        SamplingOptions(frame_shift=0)


def test_caption_and_rollout_paths(gens):
    from megafusion.data.shapes import ShapesWorld
    from megafusion.eval.world import eval_world
    from megafusion.inference.generate import SamplingOptions

    gen = gens[0]
    image = ShapesWorld(seed=7, image_size=gen.representation.image_size).image_text(0).image
    text = gen.caption(image, max_new_tokens=10)
    assert isinstance(text, str) and not any(m in text for m in ("<boi>", "<eoi>", "<frame>", "<pad>"))
    assert text == gen.caption(image, max_new_tokens=10)  # greedy: deterministic

    clip = eval_world(gen).action_video(0)
    c = clip.context_frames
    opts = SamplingOptions(steps=2, seed=4)
    frames = gen.rollout(clip.frames[:c], clip.actions, clip.caption, opts)
    assert frames.shape == (len(clip.actions) + 1 - c, *clip.frames.shape[1:]) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, gen.rollout(clip.frames[:c], clip.actions, clip.caption, opts))


def test_generate_cli_writes_images_and_text(run_dir, loaded, tmp_path):
    from megafusion.data.shapes import load_png, save_png
    from megafusion.inference.cli import main

    out = tmp_path / "image"
    assert main(["--run-dir", str(run_dir), "--prompt", "A big blue square.", "--image-prompt", "--steps", "2",
                 "--sampler", "heun", "--cfg", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["mode"] == "image" and record["step"] == 2 and isinstance(record["text"], str)
    assert record["text"].startswith("<image 0>") and record["images"] == ["image_0.png"]
    assert load_png(out / "image_0.png").shape == (32, 32, 3)

    out = tmp_path / "text"
    assert main(["--run-dir", str(run_dir), "--prompt", "There is", "--max-new-tokens", "8", "--temperature", "1",
                 "--top-k", "20", "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["mode"] == "text" and record["text"]

    save_png(np.full((32, 32, 3), 200, np.uint8), tmp_path / "in.png")
    out = tmp_path / "caption"
    assert main(["--run-dir", str(run_dir), "--caption", str(tmp_path / "in.png"), "--max-new-tokens", "5",
                 "--out", str(out)]) == 0
    assert json.loads((out / "generation.json").read_text())["mode"] == "caption"

    out = tmp_path / "rollout"
    assert main(["--run-dir", str(run_dir), "--rollout", "1", "--actions", "up,s,left", "--steps", "2",
                 "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["actions"] == ["up", "down", "left"] and len(record["frames"]) == 3
    assert all((out / f).is_file() for f in record["frames"]) and (out / "rollout_grid.png").is_file()


def test_generate_cli_errors_name_the_problem(tmp_path, capsys):
    from megafusion.inference.cli import main

    assert main(["--run-dir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_frames_are_sampled_on_the_frame_time_shift(loaded, monkeypatch):
    """``diffusion.frame_time_shift``: rollout frames integrate the ODE on that shift's grid,
    images keep ``time_shift``'s (as training drew their timesteps)."""
    from dataclasses import replace

    import megafusion.diffusion.sampling as sampling
    from megafusion.diffusion.flow import resolve_shift
    from megafusion.inference.generate import Generator, SamplingOptions

    gen = Generator.from_run(loaded)
    gen.cfg = replace(loaded.cfg, diffusion=replace(loaded.cfg.diffusion, frame_time_shift=30.0))
    shifts, real = [], sampling.sample_ode
    monkeypatch.setattr(sampling, "sample_ode", lambda *a, shift, **kw: shifts.append(shift) or real(*a, shift=shift,
                                                                                                      **kw))
    opts = SamplingOptions(steps=2, cfg_scale=1.0, seed=0)
    frames = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    gen.rollout(frames, ["up", "left"], "The agent is a red circle.", opts)
    assert shifts == [30.0, 30.0]
    gen.generate_image("a red circle", opts)
    image_shift = float(resolve_shift(gen.cfg.diffusion, gen.tokens_per_image * gen.latent_dim))
    assert shifts[-1] == image_shift != 30.0
