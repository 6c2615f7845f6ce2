"""megafusion export / import: checkpoints saved at EP2 and TP2 export to safetensors equal to
the world-size-1 model rebuilt from the checkpoint, every expert present; import + re-export
is byte-identical; broken exports fail with errors that name the file/tensor/field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, run_train

FAST = ["train.steps=2", "schedule.warmup_steps=1", "checkpoint.every=2", "logging.tensorboard=false"]

# The reference: the world-size-1 model rebuilt from the checkpoint with dist_checkpointing
# directly (independently of megafusion.interop), its full state_dict saved as safetensors.
REFERENCE = r"""
import sys, torch
from megatron.core import dist_checkpointing
from safetensors.torch import save_file
from megafusion.config import load_config
from megafusion.inference.loading import build_model, checkpoint_path
from megafusion.parallel import cpu_compat
from megafusion.training.checkpoint import unwrap
run_dir, out = sys.argv[1], sys.argv[2]
cfg = load_config(run_dir + "/config.yaml")
_, path = checkpoint_path(__import__("pathlib").Path(run_dir), None)
with cpu_compat.applied("cpu"), build_model(cfg, "cpu") as loaded:
    model = unwrap(loaded.model)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
               and not k.endswith("_extra_state")}, out)
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                                         **__import__("os").environ})
    assert proc.returncode == 0, f"megafusion {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def reference(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(run_dir), str(out)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return load_file(str(out))


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("moe") / "run"
    run_train(run_dir, "tiny_text_moe.yaml", ["parallel.ep=2", *FAST], nproc=2)
    return run_dir


@pytest.fixture(scope="module")
def moe_export(moe_run) -> Path:
    out = moe_run.parent / "export"
    cli("export", "--run-dir", str(moe_run), "--out", str(out))
    return out


def assert_equal_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.distributed
def test_ep2_export_equals_world_of_one_with_every_expert(moe_run, moe_export):
    got = load_file(str(moe_export / "model.safetensors"))
    with safe_open(str(moe_export / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers requires of a safetensors header
    assert_equal_tensors(got, reference(moe_run, moe_run.parent / "reference.safetensors"))
    for layer in range(2):
        for expert in range(4):
            for fc in ("linear_fc1", "linear_fc2"):
                assert f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{fc}.weight" in got
    top = json.loads((moe_export / "config.json").read_text())
    assert top["model_type"] == "megafusion-text" and top["architectures"] == ["MegafusionTextModel"]
    config = top["megafusion"]
    assert config["architecture"]["moe"] == {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64,
                                             "layers": [0, 1], "router_score": "softmax",
                                             "shared_expert_ffn_hidden_size": None,
                                             "per_modality_shared_experts": False}
    assert config["architecture"]["model_type"] == "megafusion-text"
    assert config["config"]["parallel"]["ep"] == 2 and config["step"] == 2


@pytest.mark.distributed
def test_tp2_export_equals_world_of_one_and_shards(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "tiny_text.yaml", ["parallel.tp=2", *FAST], nproc=2)
    cli("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "x"), "--max-shard-size", "40KB")
    index = json.loads((tmp_path / "x" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "x" / "model.safetensors").exists()
    got = {}
    for name in files:
        got.update(load_file(str(tmp_path / "x" / name)))
    assert_equal_tensors(got, reference(run_dir, tmp_path / "reference.safetensors"))


@pytest.mark.distributed
def test_import_then_reexport_is_byte_identical(moe_export, tmp_path):
    cli("import", "--from", str(moe_export), "--run-dir", str(tmp_path / "imported"))
    assert (tmp_path / "imported" / "checkpoints" / "step_00000000").is_dir()
    cli("export", "--run-dir", str(tmp_path / "imported"), "--out", str(tmp_path / "again"))
    first = load_file(str(moe_export / "model.safetensors"))
    second = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name].numpy().tobytes() == second[name].numpy().tobytes(), name


def test_training_resumes_from_an_import_at_any_layout(moe_export, tmp_path):
    """Imported weights train on at EP1 and at EP2 with a fresh optimizer, to the same losses."""
    from conftest import losses_by_step, run_train

    losses = {}
    for name, nproc, layout in (("ep1", 1, "parallel.ep=1"), ("ep2", 2, "parallel.ep=2")):
        run_dir = tmp_path / name
        cli("import", "--from", str(moe_export), "--run-dir", str(run_dir))
        proc = run_train(run_dir, str(run_dir / "config.yaml"),
                         ["train.steps=2", layout, "logging.tensorboard=false", "checkpoint.save_final=false"],
                         nproc=nproc)
        assert "resumed from step 0" in proc.stdout
        losses[name] = losses_by_step(run_dir)
    assert sorted(losses["ep1"]) == [1, 2]
    for step, loss in losses["ep1"].items():
        assert losses["ep2"][step] == pytest.approx(loss, abs=1e-5)


def test_truncated_safetensors_is_a_clear_error(moe_export, tmp_path):
    from megafusion.interop.import_ import ImportError_, read_tensors

    data = (moe_export / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportError_, match=r"model\.safetensors.*truncated or corrupt"):
        read_tensors(tmp_path)


def test_config_with_wrong_field_is_a_clear_error(moe_export, tmp_path):
    from megafusion.config import ConfigError
    from megafusion.interop.import_ import read_config

    raw = json.loads((moe_export / "config.json").read_text())
    raw["megafusion"]["config"]["model"]["hidden_sise"] = 64
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_sise") as err:
        read_config(tmp_path)
    assert "config.json" in str(err.value)


def test_missing_unexpected_and_misshapen_tensors_are_named():
    from megafusion.interop.import_ import ImportError_, load_strict

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    tensors = {"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2), "1.weight": torch.zeros(2, 2),
               "extra.weight": torch.zeros(1)}
    with pytest.raises(ImportError_) as err:
        load_strict(model, tensors, Path("somewhere"))
    message = str(err.value)
    assert "missing tensor '1.bias'" in message and "(2,)" in message
    assert "unexpected tensor 'extra.weight'" in message
    assert "'0.weight' has shape (2, 4)" in message and "expects (2, 3)" in message
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    load_strict(model, good, Path("somewhere"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
