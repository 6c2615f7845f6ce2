"""`megafusion import` / `export` refuse bad input in one line with exit code 2: tensors of
the wrong dtype or with NaN/inf values (before: converted or copied silently, and a NaN
model imported), and paths that are not an export or a run dir (before: tracebacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_train
from megafusion.interop.import_ import ImportError_, load_strict


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))


def good() -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) for k, v in model().state_dict().items()}


@pytest.mark.parametrize("change, dtype, message", [
    (lambda t: t.double(), "fp32", "tensor '0.weight' is torch.float64 but config.json says \"dtype\": 'fp32'"),
    (lambda t: t.bfloat16(), "fp32", "tensor '0.weight' is torch.bfloat16 but config.json says \"dtype\": 'fp32'"),
    (lambda t: t.long(), None, "tensor '0.weight' is torch.int64 but the model's is floating point"),
    (lambda t: t.index_fill(1, torch.tensor([1]), float("nan")), "fp32", "tensor '0.weight' holds 2 NaN/inf value(s)"),
    (lambda t: t.index_fill(1, torch.tensor([0]), float("inf")), None, "tensor '0.weight' holds 2 NaN/inf value(s)"),
], ids=["float64", "bf16-declared-fp32", "int64", "nan", "inf"])
def test_wrong_dtype_or_non_finite_tensor_is_named(change, dtype, message):
    tensors = good()
    tensors["0.weight"] = change(tensors["0.weight"])
    target = model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ImportError_) as err:
        load_strict(target, tensors, Path("export_dir"), dtype)
    assert message in str(err.value) and "\n" not in str(err.value) and "'export_dir'" in str(err.value)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # nothing copied


def test_declared_dtype_must_be_one_export_writes():
    with pytest.raises(ImportError_, match="\"dtype\": 'fp16' is not one megafusion exports"):
        load_strict(model(), good(), Path("e"), "fp16")


def test_good_tensors_in_the_declared_dtype_load():
    tensors = {k: v.bfloat16() for k, v in good().items()}
    target = model()
    load_strict(target, tensors, Path("e"), "bf16")
    assert all(torch.equal(target.state_dict()[k], v.float()) for k, v in tensors.items())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafusion.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def one_line_exit_2(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith(f"megafusion {command}:")]
    return line


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from megafusion.interop.export import export_run

    root = tmp_path_factory.mktemp("import_errors")
    run_train(root / "run", "tiny_text.yaml", ["train.steps=1", "schedule.warmup_steps=0", "checkpoint.every=1", "logging.tensorboard=false"])
    return export_run(root / "run", root / "export")


def test_import_of_nan_weights_is_one_line_exit_2(export_dir, tmp_path):
    tensors = load_file(str(export_dir / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    (tmp_path / "export").mkdir()
    save_file(tensors, str(tmp_path / "export" / "model.safetensors"))
    (tmp_path / "export" / "config.json").write_text((export_dir / "config.json").read_text())
    line = one_line_exit_2(cli("import", "--from", str(tmp_path / "export"), "--run-dir", str(tmp_path / "run")),
                           "import")
    assert "NaN/inf value(s)" in line and "export a checkpoint from before the loss diverged" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_paths_are_one_line_exit_2(export_dir, tmp_path):
    line = one_line_exit_2(cli("import", "--from", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")),
                           "import")
    assert str(tmp_path / "nowhere" / "config.json") in line
    line = one_line_exit_2(cli("export", "--run-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")),
                           "export")
    assert str(tmp_path / "nowhere") in line and "megafusion train" in line
    run_dir = export_dir.parent / "run"
    (tmp_path / "file").write_text("")
    line = one_line_exit_2(cli("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "file")), "export")
    assert str(tmp_path / "file") in line
    line = one_line_exit_2(cli("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"),
                               "--max-shard-size", "big"), "export")
    assert "--max-shard-size 'big' is not a size" in line
    assert json.loads((export_dir / "config.json").read_text())["megafusion"]["step"] == 1
