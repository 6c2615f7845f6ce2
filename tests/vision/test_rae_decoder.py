"""RAE decoder training: noise augmentation, learning, checkpoints/resume, DDP, CLI.

A tiny random DINOv2 (hidden 32, patch 4, 32x32 images -> 64 tokens) is built and saved
here; the data are generated shapes. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from megafusion.vision import load_representation
from megafusion.vision.images import open_image_source
from megafusion.vision.rae import noise_augment
from megafusion.vision.train_decoder import DecoderTrainConfig, main, train_decoder

transformers = pytest.importorskip("transformers", reason="the RAE's HF encoders need `transformers`")

TINY_DECODER = dict(decoder_hidden_size=64, decoder_depth=2, decoder_heads=4)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
        image_size=32)).save_pretrained(path)
    return path


def np_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    mse = ((pred.astype(np.float64) - target.astype(np.float64)) ** 2).reshape(len(pred), -1).mean(1)
    return 10 * np.log10(1.0 / mse)


def test_noise_augment_draws_one_half_normal_sigma_per_sample():
    gen = torch.Generator().manual_seed(0)
    clean = torch.zeros(4000, 64, 16, dtype=torch.float64)
    noise = noise_augment(clean, tau=0.8, generator=gen)
    sigma = noise.reshape(4000, -1).std(1)  # each sample has a single sigma
    # E|N(0, tau^2)| = tau * sqrt(2/pi); a half-normal, not a constant: its own spread is tau*sqrt(1 - 2/pi)
    assert abs(sigma.mean().item() - 0.8 * (2 / np.pi) ** 0.5) < 0.02
    assert abs(sigma.std().item() - 0.8 * (1 - 2 / np.pi) ** 0.5) < 0.02
    assert torch.equal(noise_augment(clean, tau=0.0), clean)


def test_trained_decoder_beats_untrained_and_run_dir_is_complete(encoder_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = DecoderTrainConfig(encoder_path=str(encoder_dir), data="synthetic", run_dir=str(run), steps=300,
                             batch_size=16, lr=1e-3, eval_every=150, image_every=150, log_every=50,
                             checkpoint_every=150, heldout_images=32, stats_images=64, **TINY_DECODER)
    result = train_decoder(cfg)  # default noise_tau = 0.8

    # Margin: >= 8 dB over the untrained decoder (measured: 6.5 -> 18.9 dB), and >= 1.5 dB over the best
    # image-agnostic baseline, painting each image its own mean colour (15.8 dB): the decoder recovers layout.
    heldout = open_image_source("synthetic", 32, 32, seed=cfg.seed + 1_000_003)
    x = torch.stack([heldout[i] for i in range(32)])
    mean_colour = np_psnr(x.mean((2, 3), keepdim=True).expand_as(x).numpy(), x.numpy()).mean()
    assert result["heldout_psnr_final"] > result["heldout_psnr_initial"] + 8.0, result
    assert result["heldout_psnr_final"] > mean_colour + 1.5, (result, mean_colour)

    # the saved representation reproduces the reported PSNR (recomputed here in numpy)
    rep = load_representation("rae", run)
    with torch.no_grad():
        rec = rep.decode(rep.encode(x))
    assert np_psnr(rec.numpy(), x.numpy()).mean() == pytest.approx(result["heldout_psnr_final"], abs=1e-3)
    assert rep.has_stats and rep.latent_std.shape == (32,)

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [50, 100, 150, 200, 250, 300]
    assert {"l1", "lr", "grad_norm", "images_per_s"} <= set(train_lines[0])
    assert [r["step"] for r in lines if "heldout_psnr" in r] == [0, 150, 300]
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train-decoder] step")]
    assert len(progress) == len(lines) and progress[-1].startswith("[train-decoder] step 300/300 | ")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000300"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000150", "step_00000300"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("heldout/originals_over_reconstructions")) == 3
    assert len(events.Scalars("heldout_psnr")) == 3


def test_resume_continues_exactly_with_adversarial_loss(encoder_dir, tmp_path):
    cfg = dict(encoder_path=str(encoder_dir), data="synthetic", steps=6, batch_size=4, checkpoint_every=3,
               eval_every=100, image_every=100, heldout_images=4, stats_images=0, adv_weight=0.1,
               adv_start_step=2, disc_channels=8, **TINY_DECODER)
    full = tmp_path / "full"
    train_decoder(DecoderTrainConfig(run_dir=str(full), **cfg))
    # an interrupted copy: only the step-3 checkpoint survived
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    shutil.rmtree(cut / "representation")
    (cut / "checkpoints" / "latest").write_text("step_00000003\n")
    train_decoder(DecoderTrainConfig(run_dir=str(cut), **cfg))
    a = torch.load(full / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    step3 = torch.load(full / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("decoder", "discriminator"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs after resume"
    assert any(not torch.equal(v, step3["discriminator"][k]) for k, v in a["discriminator"].items())
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    g_adv = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if "g_adv" in line]
    assert g_adv and all(np.isfinite(r["g_adv"]) and np.isfinite(r["d_loss"]) for r in g_adv)


class _Payload:
    """Unpickling this runs a shell command (what a planted state.pt would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_resume_never_unpickles_code(encoder_dir, tmp_path, capsys):
    """Before: the resume read state.pt with torch.load(weights_only=False) and ran this."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    torch.save({"step": 3, "decoder": _Payload(f"touch '{marker}'")}, run / "checkpoints" / "step_00000003" / "state.pt")
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    cfg = DecoderTrainConfig(encoder_path=str(encoder_dir), data="synthetic", run_dir=str(run), steps=6, batch_size=4,
                             checkpoint_every=3, heldout_images=4, stats_images=0, **TINY_DECODER)
    with pytest.raises(ValueError, match=r"state\.pt': refusing to unpickle 'posix\.system'"):
        train_decoder(cfg)
    assert not marker.exists()
    # The command says it in one line, exit 2.
    assert main(["--encoder-path", str(encoder_dir), "--data", "synthetic", "--run-dir", str(run), "--steps", "6",
                 "--batch-size", "4", "--heldout-images", "4"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert line.startswith("megafusion train-decoder: '") and "refusing to unpickle 'posix.system'" in line
    assert not marker.exists()


def test_trains_from_an_image_folder(encoder_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):  # non-square, other sizes: resized and centre-cropped
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = train_decoder(DecoderTrainConfig(encoder_path=str(encoder_dir), data=str(tmp_path / "imgs"),
                                              run_dir=str(tmp_path / "run"), steps=2, batch_size=4,
                                              heldout_images=4, stats_images=8, **TINY_DECODER))
    assert np.isfinite(result["heldout_psnr_final"])


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_trains_on_a_module_encoder(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.Flatten(2), _Transpose())
    result = train_decoder(DecoderTrainConfig(data="synthetic", run_dir=str(tmp_path / "run"), steps=3, batch_size=4,
                                              image_size=32, heldout_images=4, stats_images=8, **TINY_DECODER),
                           encoder=module)
    rep = load_representation("rae", tmp_path / "run", encoder=module)
    assert (rep.tokens_per_image, rep.latent_dim) == (64, 16) and rep.has_stats
    assert np.isfinite(result["heldout_psnr_final"])


def test_lpips_term_is_added_with_its_weight(encoder_dir, tmp_path, monkeypatch):
    """The real `lpips` package cannot be installed here (its torchvision pin replaces torch), so a
    stand-in module with the same constructor checks the wiring: the logged loss is l1 + w * lpips."""
    import types

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net="vgg", verbose=True):
            super().__init__()
            self.net = net
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, a, b):  # [B, 1, 1, 1] like lpips
            return self.scale * ((a - b) ** 2).mean((1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    run = tmp_path / "run"
    train_decoder(DecoderTrainConfig(encoder_path=str(encoder_dir), run_dir=str(run), steps=2, batch_size=4,
                                     log_every=1, heldout_images=4, stats_images=0, lpips_weight=0.5,
                                     **TINY_DECODER))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(lines) == 2
    for r in lines:
        assert r["lpips"] > 0 and r["loss"] == pytest.approx(r["l1"] + 0.5 * r["lpips"], rel=1e-6)


def test_lpips_without_the_package_says_how_to_get_it(monkeypatch):
    from megafusion.vision.decoder_losses import load_lpips

    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    with pytest.raises(ImportError, match="pip install lpips.*or set lpips_weight=0"):
        load_lpips()


def test_cli_errors_are_clear(encoder_dir, tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "r")]) == 2
    assert "needs --encoder-path" in capsys.readouterr().err
    assert main(["--encoder-path", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    conf = tmp_path / "c.yaml"
    conf.write_text("steps: 3\nnoise_taux: 0.5\n")
    assert main(["--config", str(conf), "--encoder-path", str(encoder_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'noise_taux'. Did you mean 'noise_tau'?" in err and str(conf) in err
    assert main(["--encoder-path", str(encoder_dir), "--set", "steps=many"]) == 2
    assert "config key 'steps' must be an integer, got 'many'" in capsys.readouterr().err
    assert main(["--encoder-path", str(encoder_dir), "--data", str(tmp_path / "nofolder"),
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "image folder" in capsys.readouterr().err


def test_config_file_flags_and_set_overrides_read_as_train_reads_its_config(tmp_path):
    """--config YAML, then the flags, then --set (the same loader rules as `megafusion train`:
    values checked against the field types, 1e-3 read as a number)."""
    from megafusion.config import ConfigError
    from megafusion.vision.train_decoder import config_from_args

    conf = tmp_path / "c.yaml"
    conf.write_text("steps: 30\nlr: 1e-3\nnoise_tau: 0.5\nimage_size: 32\ndevice: cpu\n")
    cfg = config_from_args(["--config", str(conf), "--steps", "40", "--set", "noise_tau=0.25",
                            "--set", "encoder_path=/enc", "--set", "image_size="])
    assert cfg == DecoderTrainConfig(steps=40, lr=1e-3, noise_tau=0.25, image_size=None, device="cpu",
                                     encoder_path="/enc")
    assert config_from_args(["--set", "batch_size=8"]).batch_size == 8
    with pytest.raises(ConfigError, match="--set expects key.sub=value"):
        config_from_args(["--set", "batch_size"])
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'. Did you mean 'batch_size'"):
        config_from_args(["--set", "batchsize=8"])


@pytest.mark.distributed
def test_two_rank_ddp_matches_one_rank_with_twice_the_batch(encoder_dir, tmp_path):
    """Without noise (tau=0), 2 ranks x batch B see the same samples as 1 rank x 2B and average the
    same L1 gradients, so the decoders must agree."""
    common = ["--encoder-path", str(encoder_dir), "--steps", "3", "--noise-tau", "0", "--heldout-images", "4",
              "--stats-images", "0", "--decoder-hidden-size", "64", "--decoder-depth", "2", "--decoder-heads", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "megafusion.vision.train_decoder",
                             "--run-dir", str(tmp_path / "ddp"), "--batch-size", "4", *common],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a hang kills the workers too
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert main(["--run-dir", str(tmp_path / "one"), "--batch-size", "8", *common]) == 0
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)["decoder"]
    b = torch.load(tmp_path / "one" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)["decoder"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
