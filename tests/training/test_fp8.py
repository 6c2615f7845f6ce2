"""FP8 training through Transformer Engine (train.fp8, train.fp8_params, model.spec = te).

On CPU: the config is refused with clear reasons and the fields reach megatron's
TransformerConfig. On a CUDA GPU with Transformer Engine: the Transfusion model with the te
spec trains like the local spec in bf16, every FP8 recipe trains, and checkpoints move
between bf16 and FP8 runs.
"""

import importlib.util

import pytest
import torch

from conftest import CONFIGS, losses_by_step, run_train
from megafusion import config as config_module
from megafusion.config import ConfigError, load_config, validate

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_CUDA = torch.cuda.is_available()
_SKIP_REASON = ("FP8 / the te spec need a CUDA GPU; none is visible" if not HAVE_CUDA else
                "needs Transformer Engine (pip install 'transformer-engine[pytorch]' on the GPU machine)"
                if not HAVE_TE else "")
requires_te_gpu = pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON)
TINY = "tiny_transfusion.yaml"


def _problems(overrides, monkeypatch=None, gpu=None, te=None) -> str:
    if gpu is not None:
        monkeypatch.setattr(config_module, "_cuda_capability", lambda cfg: gpu)
    if te is not None:
        monkeypatch.setattr(config_module, "_transformer_engine_installed", lambda: te)
    try:
        validate(load_config(CONFIGS / TINY, overrides), world_size=1)
    except ConfigError as err:
        return str(err)
    return ""


# --------------------------------------------------------------------------- CPU: config


def test_fp8_needs_te_spec_and_bf16(monkeypatch):
    message = _problems(["train.fp8=delayed"], monkeypatch, gpu=("NVIDIA H100 80GB HBM3", (9, 0)), te=True)
    assert "train.fp8 = delayed needs model.spec = te" in message
    assert "train.fp8 = delayed needs train.precision = bf16" in message and "got fp32" in message
    assert "fp8_params" not in message
    assert "train.fp8_params = true needs an FP8 recipe" in _problems(["train.fp8_params=true"])
    assert "train.fp8 = 'e4m3' is not one of none, delayed, tensorwise, mxfp8" in _problems(["train.fp8=e4m3"])


def test_fp8_needs_a_gpu_and_transformer_engine(monkeypatch):
    fine = ["model.spec=te", "train.precision=bf16", "train.fp8=tensorwise"]
    message = _problems(fine, monkeypatch, gpu=None, te=False)
    assert "train.fp8 = tensorwise needs a CUDA GPU" in message
    assert "needs Transformer Engine, which is not installed" in message
    assert _problems(fine, monkeypatch, gpu=("NVIDIA H100 80GB HBM3", (9, 0)), te=True) == ""


def test_mxfp8_needs_blackwell(monkeypatch):
    mx = ["model.spec=te", "train.precision=bf16", "train.fp8=mxfp8", "train.fp8_params=true",
          "parallel.distributed_optimizer=true"]
    message = _problems(mx, monkeypatch, gpu=("NVIDIA H100 80GB HBM3", (9, 0)), te=True)
    assert "train.fp8 = mxfp8 needs a Blackwell-class GPU" in message and "has 9.0" in message
    assert _problems(mx, monkeypatch, gpu=("NVIDIA B200", (10, 0)), te=True) == ""


def test_fp8_params_needs_the_distributed_optimizer(monkeypatch):
    """Only the distributed optimizer writes its updated main params into FP8 weights
    (DDP's fp8_param_gather); with the plain optimizer they never change."""
    fp8 = ["model.spec=te", "train.precision=bf16", "train.fp8=tensorwise", "train.fp8_params=true"]
    h100 = ("NVIDIA H100 80GB HBM3", (9, 0))
    message = _problems(fp8, monkeypatch, gpu=h100, te=True)
    assert message == ("invalid config: train.fp8_params = true needs parallel.distributed_optimizer = true (only "
                       "the distributed optimizer updates FP8 weights): set it, or train.fp8_params = false")
    assert _problems(fp8 + ["parallel.distributed_optimizer=true"], monkeypatch, gpu=h100, te=True) == ""


@pytest.mark.parametrize("fp8_params", [False, True])
def test_fp8_params_sets_fp8_param_gather_in_the_ddp_config(monkeypatch, fp8_params):
    from megatron.core import distributed

    from megafusion.training import loop

    seen = []
    monkeypatch.setattr(loop, "build_chunks", lambda cfg, tc, provider, device: [torch.nn.Linear(2, 2)])
    monkeypatch.setattr(distributed, "DistributedDataParallel",
                        lambda config, ddp_config, module, disable_bucketing: seen.append(ddp_config) or module)
    cfg = load_config(CONFIGS / TINY, ["parallel.distributed_optimizer=true", f"train.fp8_params={fp8_params}"])
    loop.build_model_chunks(cfg, None, None, type("Env", (), {"device": torch.device("cpu")})())
    assert seen[0].fp8_param_gather is fp8_params and seen[0].use_distributed_optimizer is True


@pytest.mark.parametrize("recipe, fmt", [("delayed", "hybrid"), ("tensorwise", "hybrid"), ("mxfp8", "e4m3")])
def test_fp8_fields_reach_the_transformer_config(recipe, fmt):
    from megafusion.model.transformer_config import build_transformer_config

    cfg = load_config(CONFIGS / TINY, ["model.spec=te", "train.precision=bf16", f"train.fp8={recipe}",
                                       "train.fp8_params=true"])
    tc = build_transformer_config(cfg, torch.device("cpu"))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param, tc.bf16) == (fmt, recipe, True, True)
    plain = build_transformer_config(load_config(CONFIGS / TINY, ["train.precision=bf16"]), torch.device("cpu"))
    assert plain.fp8 is None and plain.fp8_param is False


# --------------------------------------------------------------------------- GPU + TE: training

GPU_RUN = ["train.device=cuda", "train.precision=bf16", "train.steps=4", "logging.tensorboard=false"]


def _losses(run_dir, overrides):
    run_train(run_dir, TINY, GPU_RUN + overrides)
    return losses_by_step(run_dir)


@requires_te_gpu
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_te_spec_trains_like_the_local_spec(tmp_path, attention):
    local = _losses(tmp_path / "local", [f"model.attention={attention}"])
    te = _losses(tmp_path / "te", ["model.spec=te", f"model.attention={attention}"])
    assert set(te) == set(local) == {1, 2, 3, 4}
    for step in local:  # same initial weights (layout-independent init), bf16 kernels differ
        assert te[step] == pytest.approx(local[step], rel=2e-2), (step, te, local)


@requires_te_gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
@pytest.mark.parametrize("fp8_params", [False, True])
def test_fp8_recipes_train(tmp_path, recipe, fp8_params):
    if recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
        pytest.skip("mxfp8 needs a Blackwell-class GPU (compute capability >= 10)")
    bf16 = _losses(tmp_path / "bf16", ["model.spec=te"])
    fp8 = _losses(tmp_path / "fp8", ["model.spec=te", f"train.fp8={recipe}", f"train.fp8_params={fp8_params}",
                                     f"parallel.distributed_optimizer={fp8_params}"])
    assert all(torch.isfinite(torch.tensor(v)) for v in fp8.values()), fp8
    assert fp8[1] == pytest.approx(bf16[1], rel=5e-2), (fp8, bf16)  # same weights, FP8 matmuls
    assert fp8[4] < fp8[1], fp8


@requires_te_gpu
@pytest.mark.parametrize("first, then", [("none", "delayed"), ("delayed", "none")])
def test_checkpoints_load_between_bf16_and_fp8(tmp_path, first, then):
    """A checkpoint written by a bf16 run resumes in an FP8 run and the other way round,
    continuing where an uninterrupted run would be (within FP8 tolerance)."""
    te = ["model.spec=te", "logging.tensorboard=false", "train.device=cuda", "train.precision=bf16"]
    whole = tmp_path / "whole"
    run_train(whole, TINY, te + ["train.steps=4", f"train.fp8={first}"])
    resumed = tmp_path / "resumed"
    run_train(resumed, TINY, te + ["train.steps=2", f"train.fp8={first}"])
    proc = run_train(resumed, TINY, te + ["train.steps=4", f"train.fp8={then}"])
    assert "resumed from step 2" in proc.stdout
    expected, got = losses_by_step(whole), losses_by_step(resumed)
    assert set(got) == {1, 2, 3, 4}
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=5e-2), (step, got, expected)


@requires_te_gpu
def test_fp8_params_optimizer_starts_from_the_models_weights(tmp_path):
    """With FP8 weights the optimizer keeps fp32 master copies; they must be the weights the
    model was initialised with (megafusion's layout-independent init), not TE's first draw:
    with a zero learning rate the loss cannot move from step 1 to step 3."""
    losses = _losses(tmp_path / "lr0", ["model.spec=te", "train.fp8=tensorwise", "train.fp8_params=true",
                                        "parallel.distributed_optimizer=true", "optimizer.lr=0", "optimizer.min_lr=0", "diffusion.cfg_dropout=0"])
    bf16 = _losses(tmp_path / "bf16", ["model.spec=te", "optimizer.lr=0", "optimizer.min_lr=0",
                                       "diffusion.cfg_dropout=0"])
    for step in (1, 2, 3):  # each step sees other data; compare with the bf16 run of the same weights
        assert losses[step] == pytest.approx(bf16[step], rel=5e-2), (step, losses, bf16)
