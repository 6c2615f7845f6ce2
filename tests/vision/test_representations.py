"""Visual representations: shapes, round trips, statistics, save/load, clear errors.

Every model is tiny and built here (random weights saved with save_pretrained); nothing is
downloaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from megafusion.vision import load_representation
from megafusion.vision.base import patchify, unpatchify
from megafusion.vision.images import open_image_source
from megafusion.vision.stats import RunningStats, apply_latent_stats, compute_latent_stats

transformers = pytest.importorskip("transformers", reason="the RAE's HF encoders need `transformers`")

S = 32  # image size used throughout


def images(n: int, seed: int = 0, size: int = S) -> torch.Tensor:
    data = open_image_source("synthetic", size, length=n, seed=seed)
    return torch.stack([data[i] for i in range(n)])


def tiny_vit_kwargs(**kw):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, **kw)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random DINOv2 / DINOv2+registers / SigLIP / SigLIP 2 / full SigLIP (vision+text) dirs."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    models = {
        "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**tiny_vit_kwargs(image_size=S))),
        "dinov2_reg": transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**tiny_vit_kwargs(image_size=S, num_register_tokens=2))),
        "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**tiny_vit_kwargs(image_size=S))),
        "siglip2": transformers.Siglip2VisionModel(
            transformers.Siglip2VisionConfig(**tiny_vit_kwargs(num_patches=64))),
        "siglip_full": transformers.SiglipModel(transformers.SiglipConfig(
            vision_config=tiny_vit_kwargs(image_size=S),
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=50))),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}, models


DECODER = dict(hidden_size=32, depth=1, num_heads=2)


# --- pixel ------------------------------------------------------------------------------

def test_pixel_shapes_and_exact_round_trip():
    rep = load_representation("pixel", image_size=S, patch_size=8)
    x = images(3)
    z = rep.encode(x)
    assert (rep.tokens_per_image, rep.latent_dim, rep.image_size) == (16, 192, S)
    assert z.shape == (3, 16, 192)
    # token (row 1, col 2) is that 8x8 crop of 2x-1 in (py, px, c) order: an independent reference
    crop = (x[:, :, 8:16, 16:24] * 2 - 1).permute(0, 2, 3, 1).reshape(3, -1)
    torch.testing.assert_close(z[:, 1 * 4 + 2], crop, rtol=0, atol=0)
    torch.testing.assert_close(rep.decode(z), x, rtol=0, atol=1e-6)


def test_patchify_inverts_on_rectangular_grids():
    x = torch.randn(2, 5, 12, 20, dtype=torch.float64)
    t = patchify(x, 4)
    assert t.shape == (2, 15, 80)
    assert torch.equal(unpatchify(t, 4, 5, grid=(3, 5)), x)


# --- statistics -------------------------------------------------------------------------

def test_running_stats_match_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 7, 5, generator=gen) * torch.arange(1, 6) + 3 for n in (1, 4, 9)]
    stats = RunningStats(5)
    for p in parts:
        stats.update(p)
    ref = torch.cat(parts).reshape(-1, 5).double()
    assert stats.count == ref.shape[0]
    torch.testing.assert_close(stats.mean, ref.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.std(), ref.std(0, unbiased=False), rtol=0, atol=1e-12)


def test_constant_channel_gets_a_floor_not_a_division_by_zero():
    stats = RunningStats(2)
    stats.update(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    assert stats.std(eps=1e-3).tolist() == [1.0, 1e-3]


def _check_stats(rep, x):
    """Stats computed over x make x's latents zero-mean/unit-std; normalize/denormalize invert in float64."""
    batches = [x[i:i + 4] for i in range(0, len(x), 4)]
    stats = compute_latent_stats(rep, batches)
    assert stats.count == len(x) * rep.tokens_per_image
    apply_latent_stats(rep, stats)
    z = rep.encode(x).double()
    zn = rep.normalize(z)
    flat = zn.reshape(-1, rep.latent_dim)
    live = rep.latent_std > 1e-5  # channels that vary at all
    torch.testing.assert_close(flat.mean(0), torch.zeros(rep.latent_dim, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(flat.std(0, unbiased=False)[live], torch.ones(int(live.sum()), dtype=torch.float64),
                               rtol=0, atol=1e-4)
    # exact inversion on arbitrary float64 latents, not only the ones the stats came from
    w = torch.randn(2, rep.tokens_per_image, rep.latent_dim, dtype=torch.float64) * 5
    torch.testing.assert_close(rep.denormalize(rep.normalize(w)), w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rep.normalize(rep.denormalize(w)), w, rtol=1e-13, atol=1e-13)


def test_pixel_statistics_and_exact_inversion(tmp_path):
    rep = load_representation("pixel", image_size=S, patch_size=8)
    assert torch.equal(rep.normalize(torch.ones(1, 16, 192)), torch.ones(1, 16, 192))  # identity before stats
    x = images(12)
    _check_stats(rep, x)
    rep.save(tmp_path / "pix")
    back = load_representation("auto", tmp_path / "pix")
    assert torch.equal(back.latent_mean, rep.latent_mean) and torch.equal(back.latent_std, rep.latent_std)
    assert back.latent_mean.dtype == torch.float64


# --- RAE --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,tokens", [("dinov2", 64), ("dinov2_reg", 64), ("siglip", 64), ("siglip2", 64),
                                         ("siglip_full", 64)])
def test_rae_hf_encoders_shapes_and_round_trip(hf_dirs, name, tokens):
    dirs, _ = hf_dirs
    rep = load_representation("rae", dirs[name], decoder=DECODER)
    x = images(2)
    z = rep.encode(x)
    assert (rep.tokens_per_image, rep.latent_dim, rep.image_size) == (tokens, 32, S)
    assert z.shape == (2, tokens, 32)
    # the RAE recipe drops the final LayerNorm's affine: every token is exactly standardised
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(2, tokens), rtol=0, atol=1e-3)
    out = rep.decode(z)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_rae_dinov2_tokens_match_the_hf_model(hf_dirs):
    dirs, models = hf_dirs
    rep = load_representation("rae", dirs["dinov2_reg"], decoder=DECODER, final_norm_affine=True)
    x = images(2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = models["dinov2_reg"].eval()(pixel_values=(x - mean) / std).last_hidden_state[:, 1 + 2:]
    torch.testing.assert_close(rep.encode(x), ref, rtol=1e-5, atol=1e-5)


def test_rae_takes_the_vision_tower_of_a_full_siglip_checkpoint(hf_dirs):
    dirs, models = hf_dirs
    rep = load_representation("rae", dirs["siglip_full"], decoder=DECODER, final_norm_affine=True)
    x = images(2)
    with torch.no_grad():
        ref = models["siglip_full"].eval().vision_model(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    torch.testing.assert_close(rep.encode(x), ref, rtol=1e-5, atol=1e-5)


def test_rae_loads_a_bf16_checkpoint_in_float32(tmp_path):
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**tiny_vit_kwargs(image_size=S)))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    rep = load_representation("rae", tmp_path / "bf16", decoder=DECODER)
    assert rep.encoder.model.dtype == torch.float32
    assert rep.encode(images(1)).dtype == torch.float32


def test_representation_from_config_builds_and_loads_the_vision_section(tmp_path):
    from megafusion.config import VisionConfig
    from megafusion.vision import representation_from_config

    rep = representation_from_config(VisionConfig(representation="pixel", image_size=16, patch_size=4))
    assert (rep.kind, rep.tokens_per_image, rep.latent_dim) == ("pixel", 16, 48)
    rep.save(tmp_path / "p")
    saved = VisionConfig(representation="pixel", path=str(tmp_path / "p"), image_size=16, patch_size=4)
    loaded = representation_from_config(saved)
    assert (loaded.image_size, loaded.tokens_per_image, loaded.latent_dim) == (16, 16, 48)
    assert load_representation("auto", tmp_path / "p").image_size == 16


def test_rae_decoder_paints_larger_images_than_the_encoder_sees(hf_dirs):
    dirs, _ = hf_dirs
    rep = load_representation("rae", dirs["siglip"], image_size=64, decoder=DECODER)  # 8x8 tokens, patch 8
    assert rep.image_size == 64 and rep.decoder.cfg.patch_size == 8 and rep.encoder.input_size == S
    assert rep.decode(rep.encode(images(1, size=64))).shape == (1, 3, 64, 64)


def test_rae_statistics_and_save_load_reproduce_latents(hf_dirs, tmp_path):
    dirs, _ = hf_dirs
    torch.manual_seed(0)
    rep = load_representation("rae", dirs["siglip"], decoder=DECODER)
    x = images(8)
    _check_stats(rep, x)
    rep.save(tmp_path / "rae")
    back = load_representation("rae", tmp_path / "rae")
    assert (back.tokens_per_image, back.latent_dim, back.image_size) == (64, 32, S)
    assert torch.equal(back.encode(x), rep.encode(x))
    z = rep.normalize(rep.encode(x))
    assert torch.equal(back.normalize(back.encode(x)), z)
    assert torch.equal(back.decode(back.denormalize(z)), rep.decode(rep.denormalize(z)))
    assert load_representation("rae", tmp_path / "rae", image_size=S).image_size == S
    with pytest.raises(ValueError, match="image_size/decoder cannot change"):
        load_representation("rae", tmp_path / "rae", image_size=64)
    with pytest.raises(TypeError, match="patch_size applies to pixel/vae"):
        load_representation("rae", tmp_path / "rae", patch_size=4)


class TinyConvEncoder(nn.Module):
    """A module encoder: conv patch embedding -> tokens [B, (S/4)^2, 24]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 4, stride=4)

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def test_rae_module_encoder_save_and_load(tmp_path):
    torch.manual_seed(0)
    enc = TinyConvEncoder()
    rep = load_representation("rae", encoder=enc, image_size=S, decoder=DECODER)
    x = images(2)
    assert rep.encode(x).shape == (2, 64, 24)
    torch.testing.assert_close(rep.encode(x), enc(x).detach(), rtol=0, atol=0)  # identity pixel mean/std
    assert not any(p.requires_grad for p in rep.encoder.parameters())
    rep.save(tmp_path / "rae_mod")
    with pytest.raises(ValueError, match="pass encoder="):
        load_representation("rae", tmp_path / "rae_mod")
    fresh = TinyConvEncoder()  # different random weights; the saved ones are restored
    back = load_representation("rae", tmp_path / "rae_mod", encoder=fresh)
    assert torch.equal(back.encode(x), rep.encode(x))
    assert torch.equal(back.decode(rep.encode(x)), rep.decode(rep.encode(x)))


# --- clear errors -----------------------------------------------------------------------

def test_missing_paths_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_representation("rae", tmp_path / "nope")
    with pytest.raises(ValueError, match="path=<a local directory"):
        load_representation("rae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json.*pass path="):
        load_representation("rae", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown representation kind 'vqgan'"):
        load_representation("vqgan")
    with pytest.raises(FileNotFoundError, match="kind='auto' needs"):
        load_representation("auto", tmp_path / "empty")
    pytest.importorskip("diffusers", reason="the 'vae' representation needs the optional dependency diffusers")
    with pytest.raises(FileNotFoundError, match="VAE directory .* has no config.json"):
        load_representation("vae", tmp_path / "empty")
    with pytest.raises(ValueError, match="vae_config="):
        load_representation("vae")


def test_kind_mismatch_and_bad_images_are_named(tmp_path):
    rep = load_representation("pixel", image_size=S, patch_size=8)
    rep.save(tmp_path / "pix")
    with pytest.raises(ValueError, match="holds a 'pixel' representation, not 'rae'"):
        load_representation("rae", tmp_path / "pix")
    with pytest.raises(ValueError, match="expected images of 32x32, got 16x16"):
        rep.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expected float images"):
        rep.encode(torch.zeros(1, 3, S, S, dtype=torch.uint8))


# --- VAE --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae_config():
    pytest.importorskip("diffusers", reason="the 'vae' representation needs the optional dependency diffusers")
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=S)


def test_vae_shapes_statistics_and_save_load(tiny_vae_config, tmp_path):
    torch.manual_seed(0)
    rep = load_representation("vae", vae_config=tiny_vae_config, image_size=S, patch_size=2)
    assert (rep.tokens_per_image, rep.latent_dim, rep.image_size) == ((S // 2 // 2) ** 2, 4 * 4, S)
    x = images(8)
    z = rep.encode(x)
    assert z.shape == (8, 64, 16)
    # tokens are the posterior mean, patchified: an independent reference through diffusers directly
    with torch.no_grad():
        ref = rep.vae.encode(x * 2 - 1).latent_dist.mean
    assert torch.equal(unpatchify(z, 2, 4), ref)
    out = rep.decode(z)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    _check_stats(rep, x)
    rep.save(tmp_path / "vae")
    back = load_representation("auto", tmp_path / "vae")
    assert torch.equal(back.encode(x), rep.encode(x))
    assert torch.equal(back.latent_std, rep.latent_std)
    with torch.no_grad():
        assert torch.equal(back.decode(z), rep.decode(z))
    # a pretrained AutoencoderKL directory (save_pretrained layout) loads too
    rep.vae.save_pretrained(tmp_path / "kl")
    assert torch.equal(load_representation("vae", tmp_path / "kl", image_size=S).encode(x), z)


# --- the statistics tool ----------------------------------------------------------------

def _run_stats_tool(args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    proc = subprocess.Popen([*launcher, "tools/compute_latent_stats.py", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"compute_latent_stats timed out:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, out[-3000:]


def test_stats_tool_saves_the_dataset_statistics(tmp_path):
    from megafusion.vision.stats import main

    assert main(["--kind", "pixel", "--image-size", str(S), "--patch-size", "8", "--data", "synthetic",
                 "--num-images", "20", "--batch-size", "6", "--out", str(tmp_path / "pix")]) == 0
    rep = load_representation("auto", tmp_path / "pix")
    z = rep.encode(images(20)).double().reshape(-1, rep.latent_dim)  # independent: all at once
    torch.testing.assert_close(rep.latent_mean, z.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rep.latent_std, z.std(0, unbiased=False).clamp_min(1e-6), rtol=0, atol=1e-12)
    assert main(["--path", str(tmp_path / "nope"), "--data", "synthetic"]) == 2


@pytest.mark.distributed
def test_stats_tool_two_ranks_match_one(tmp_path):
    common = ["--kind", "pixel", "--image-size", str(S), "--patch-size", "8", "--data", "synthetic",
              "--num-images", "21", "--batch-size", "4"]
    _run_stats_tool([*common, "--out", str(tmp_path / "two")], nproc=2)
    from megafusion.vision.stats import main

    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two, one = load_representation("auto", tmp_path / "two"), load_representation("auto", tmp_path / "one")
    torch.testing.assert_close(two.latent_mean, one.latent_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(two.latent_std, one.latent_std, rtol=0, atol=1e-12)
