"""A run directory never executes code: hostile pickles in a checkpoint are refused.

megatron's torch_dist checkpoints keep ``.metadata`` as a pickle, and the objects inside the
shards (RNG state, the run's common state) as ``torch.save`` pickles that torch reads with
``weights_only=False``. Each test plants a payload that creates a marker file when
unpickled (first shown to work under a plain unpickler, so the tests can fail) and checks
that train resume, ``load_run`` (eval, generate) and ``megafusion export`` refuse it with an
error naming the file and the class, and that the marker never appears.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_train
from megafusion.training.checkpoint import write_manifest
from megafusion.training.safe_load import (CheckpointError, UnsafeCheckpointError, read_metadata,
                                           restricted_loading)

FAST = ["train.steps=2", "schedule.warmup_steps=1", "checkpoint.every=2", "logging.tensorboard=false"]
STEP = "step_00000002"


class Payload:
    """Unpickling this calls ``call(arg)``: what a hostile checkpoint would do."""

    def __init__(self, call, arg) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """name -> (payload object, the global a refusal must name)."""
    return {"os.system": (Payload(os.system, f"touch '{marker}'"), "posix.system"),
            "builtins.exec": (Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    run_train(run_dir, "tiny_text.yaml", FAST)
    return run_dir


@pytest.fixture
def copy(run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def plant_metadata(run_dir: Path, payload: object, manifest: str) -> Path:
    """Replaces the checkpoint's ``.metadata`` by ``payload``; ``manifest``: "forged" (a
    manifest rewritten to match, as an attacker would) or "none" (an old checkpoint)."""
    ckpt = run_dir / "checkpoints" / STEP
    (ckpt / ".metadata").write_bytes(pickle.dumps(payload))
    if manifest == "forged":
        write_manifest(ckpt, 2)
    else:
        (ckpt / "manifest.json").unlink()
    return ckpt


def plant_object(run_dir: Path, payload: object) -> Path:
    """Points the checkpoint's ``common_state`` object (read by every load) at a
    ``torch.save`` of ``payload`` in a new shard, with metadata and manifest to match."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    ckpt = run_dir / "checkpoints" / STEP
    metadata = read_metadata(ckpt / ".metadata")
    blob = io.BytesIO()
    torch.save(payload, blob)
    (ckpt / "__9_0.distcp").write_bytes(blob.getvalue())
    [index] = [i for i in metadata.storage_data if i.fqn.startswith("common_state")]
    metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(blob.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(ckpt, 2)
    return ckpt


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_payloads_run_under_a_plain_unpickler(tmp_path, kind):
    """The defect: what torch's FileSystemReader does with .metadata (pickle.load)."""
    marker = tmp_path / "marker"
    payload, _ = payloads(marker)[kind]
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_real_metadata_reads_back_equal(run):
    path = run / "checkpoints" / STEP / ".metadata"
    safe = read_metadata(path)
    with open(path, "rb") as f:
        plain = pickle.load(f)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data
    assert len(safe.state_dict_metadata) > 10


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_hostile_metadata_is_refused_naming_file_and_class(copy, tmp_path, kind):
    marker = tmp_path / "marker"
    payload, name = payloads(marker)[kind]
    ckpt = plant_metadata(copy, payload, "forged")
    with pytest.raises(UnsafeCheckpointError) as err:
        read_metadata(ckpt / ".metadata", f"{STEP}/.metadata")
    assert f"{STEP}/.metadata: refusing to unpickle '{name}'" in str(err.value)
    assert not marker.exists()


def test_garbage_metadata_is_a_checkpoint_error(copy):
    ckpt = copy / "checkpoints" / STEP
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        read_metadata(ckpt / ".metadata")


def test_megatron_load_runs_the_payload_unless_restricted(copy, tmp_path, cpu_layer):
    """Below the verification: megatron's own load executes a hostile .metadata, the same
    load inside ``restricted_loading`` refuses it (and puts megatron's reader back)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    from megafusion.config import load_config
    from megafusion.inference.loading import build_model
    from megafusion.training.checkpoint import unwrap

    marker = tmp_path / "marker"
    ckpt = plant_metadata(copy, payloads(marker)["os.system"][0], "forged")
    originals = (serialization._get_filesystem_reader, torch_strategy._get_filesystem_reader)
    with build_model(load_config(copy / "config.yaml"), "cpu") as loaded:
        model = unwrap(loaded.model)
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle 'posix\.system'"):
            with restricted_loading():
                dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        assert not marker.exists()
        assert (serialization._get_filesystem_reader, torch_strategy._get_filesystem_reader) == originals
        with pytest.raises(BaseException):  # the payload returns 0, not Metadata: megatron fails after running it
            dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        assert marker.exists()


@pytest.mark.parametrize("manifest", ["forged", "none"])
def test_load_run_refuses_hostile_metadata(copy, tmp_path, manifest, cpu_layer):
    """load_run: what eval, generate and export load through."""
    from megafusion.inference.loading import load_run

    marker = tmp_path / "marker"
    plant_metadata(copy, payloads(marker)["os.system"][0], manifest)
    with pytest.raises(UnsafeCheckpointError, match=rf"{STEP}/\.metadata: refusing to unpickle 'posix\.system'"):
        with load_run(copy, device="cpu", kinds=None):
            pass
    assert not marker.exists()


def test_hostile_object_inside_a_shard_is_refused(copy, tmp_path, cpu_layer):
    """The objects inside the shards: torch reads them with weights_only=False."""
    from megatron.core import dist_checkpointing

    from megafusion.inference.loading import load_run

    marker = tmp_path / "marker"
    ckpt = plant_object(copy, payloads(marker)["os.system"][0])
    with pytest.raises(UnsafeCheckpointError) as err:
        with load_run(copy, device="cpu", kinds=None):
            pass
    assert f"{STEP}/__9_0.distcp: refusing to unpickle 'posix.system' in 'common_state" in str(err.value)
    assert not marker.exists()
    try:  # the defect: megatron's own load of the common state runs it
        dist_checkpointing.load_common_state_dict(str(ckpt))
    except BaseException:
        pass
    assert marker.exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafusion.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def test_export_refuses_hostile_metadata_in_one_line(copy, tmp_path):
    marker = tmp_path / "marker"
    plant_metadata(copy, payloads(marker)["builtins.exec"][0], "forged")
    proc = cli("export", "--run-dir", str(copy), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("megafusion export:")]
    assert f"{STEP}/.metadata: refusing to unpickle 'builtins.exec'" in line
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_train_resume_refuses_hostile_metadata(copy, tmp_path):
    marker = tmp_path / "marker"
    plant_metadata(copy, payloads(marker)["os.system"][0], "forged")
    cmd = [sys.executable, "-m", "megafusion.train", "--config", str(REPO / "examples/configs/tiny_text.yaml"),
           "--run-dir", str(copy), *[a for item in FAST + ["train.steps=4"] for a in ("--set", item)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-3000:]  # megafusion.train: CheckpointError -> one line, exit 2
    assert "Traceback" not in proc.stderr
    assert f"{STEP}/.metadata: refusing to unpickle 'posix.system'" in proc.stderr
    assert not marker.exists()
    assert "step      3" not in proc.stdout  # nothing trained
