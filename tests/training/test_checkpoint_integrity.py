"""Verified checkpoints: a corrupt checkpoint is never loaded silently.

Each checkpoint carries ``manifest.json`` (size and CRC-32 of every file, written last,
inside the rename). Before it, flipped bytes in a shard loaded silently (one probe: step loss
1.35e35, exit 0, and a new checkpoint that pruned the last good one), and a truncated shard
or a missing ``.metadata`` ended in a 60-line traceback. Now loading skips such a
checkpoint with one line saying why and resumes from the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, losses_by_step, run_train
from megafusion.training.checkpoint import (CheckpointError, complete_checkpoints, select_checkpoint,
                                            verify_checkpoint)

# The LR schedule spans 6 steps in every run, so a resume from step 3 continues exactly the
# schedule of the uninterrupted run.
BASE = ["schedule.decay_steps=6", "logging.tensorboard=false", "checkpoint.every=3", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """6 steps, checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    run_train(run_dir, "tiny_text.yaml", BASE + ["train.steps=6"])
    assert [s for s, _ in complete_checkpoints(run_dir)] == [3, 6]
    return run_dir


@pytest.fixture
def copy(run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def flip_bytes(path: Path, at: float = 0.5, count: int = 16) -> None:
    """Inverts ``count`` bytes in the middle of ``path`` (inside the tensor data)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def said(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[megafusion]")]


def test_manifest_lists_every_file_with_size_and_crc(run):
    manifest = json.loads((ckpt(run, 6) / "manifest.json").read_text())
    files = sorted(p.name for p in ckpt(run, 6).iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and ".metadata" in files
    for name, entry in manifest["files"].items():
        assert entry["size"] == (ckpt(run, 6) / name).stat().st_size
        assert len(entry["crc32"]) == 8
    assert verify_checkpoint(ckpt(run, 6)).verified


def test_flipped_bytes_are_skipped_and_training_resumes_from_the_older_checkpoint(run, copy):
    """The defect: the corrupt step-6 checkpoint loaded silently (here: `resumed from step 6`)."""
    flip_bytes(ckpt(copy, 6) / "__0_0.distcp")
    proc = run_train(copy, "tiny_text.yaml", BASE + ["train.steps=6"])
    assert "checkpoint step_00000006 skipped: __0_0.distcp checksum mismatch" in proc.stderr
    assert "resumed from step 3" in proc.stdout
    assert losses_by_step(copy)[6] == losses_by_step(run)[6]  # steps 4-6 trained again, exactly as before
    assert verify_checkpoint(ckpt(copy, 6)).verified  # and step 6 written again, whole


@pytest.mark.parametrize("damage, reason", [
    (lambda c: flip_bytes(c / "__0_0.distcp"), "__0_0.distcp checksum mismatch"),
    (lambda c: truncate(c / "__0_0.distcp"), "__0_0.distcp is {half} bytes, the manifest says {full} (truncated)"),
    (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp missing"),
    (lambda c: (c / ".metadata").unlink(), ".metadata missing"),
    (lambda c: truncate(c / ".metadata"), ".metadata is"),
    # not read at all: corrupt bits in a class name must not pass for tampering (a hard error)
    (lambda c: flip_bytes(c / ".metadata", count=4000), ".metadata checksum mismatch"),
    (lambda c: (c / "common.pt").write_bytes(b"planted"), "unexpected file common.pt"),
    (lambda c: (c / "manifest.json").write_text("{"), "manifest.json unreadable"),
], ids=["flipped", "truncated", "missing-shard", "missing-metadata", "truncated-metadata", "flipped-metadata",
        "extra-file", "bad-manifest"])
def test_each_kind_of_damage_falls_back_with_its_reason(copy, capsys, damage, reason):
    full = (ckpt(copy, 6) / "__0_0.distcp").stat().st_size
    damage(ckpt(copy, 6))
    assert select_checkpoint(copy) == (3, ckpt(copy, 3))
    [line] = said(capsys)
    assert line.startswith("[megafusion] checkpoint step_00000006 skipped: ")
    assert reason.format(half=full // 2, full=full) in line


@pytest.mark.parametrize("damage, reason", [
    (lambda c: truncate(c / "__0_0.distcp"), "__0_0.distcp truncated: {half} bytes, .metadata needs"),
    (lambda c: (c / ".metadata").unlink(), ".metadata missing"),
    (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp missing (named by .metadata)"),
], ids=["truncated", "missing-metadata", "missing-shard"])
def test_checkpoints_without_manifest_are_checked_against_their_metadata(copy, capsys, damage, reason):
    """Checkpoints saved before manifests: loaded (with a line saying so) unless their
    .metadata names a shard that is missing or too short."""
    for step in (3, 6):
        (ckpt(copy, step) / "manifest.json").unlink()
    half = (ckpt(copy, 6) / "__0_0.distcp").stat().st_size // 2
    damage(ckpt(copy, 6))
    assert select_checkpoint(copy) == (3, ckpt(copy, 3))
    skipped, unverified = said(capsys)
    assert reason.format(half=half) in skipped and "step_00000006 skipped" in skipped
    assert "checkpoint step_00000003: no manifest.json" in unverified and "loading it unverified" in unverified


def test_no_checkpoint_verifies_is_one_clear_error(copy):
    truncate(ckpt(copy, 6) / "__0_0.distcp")
    (ckpt(copy, 3) / ".metadata").unlink()
    with pytest.raises(CheckpointError) as err:
        select_checkpoint(copy)
    message = str(err.value)
    assert "\n" not in message and "none of its 2 checkpoint(s) verifies" in message
    assert "step_00000006: __0_0.distcp is" in message and "nothing was loaded" in message


def test_a_requested_step_that_fails_is_an_error_not_a_fallback(copy):
    flip_bytes(ckpt(copy, 3) / "__0_0.distcp")
    assert select_checkpoint(copy, 6)[0] == 6
    with pytest.raises(CheckpointError, match=r"step_00000003 failed verification: __0_0\.distcp checksum mismatch"):
        select_checkpoint(copy, 3)


def test_newest_verified_checkpoint_is_never_pruned(copy):
    """Before: with keep=1, resuming under a corrupt step-6 checkpoint and saving step 4
    pruned every checkpoint but the corrupt one (the last `keep` by step)."""
    flip_bytes(ckpt(copy, 6) / "__0_0.distcp")
    proc = run_train(copy, "tiny_text.yaml", ["schedule.decay_steps=6", "logging.tensorboard=false",
                                              "checkpoint.every=1", "checkpoint.keep=1", "train.steps=5"])
    assert "resumed from step 3" in proc.stdout
    assert [s for s, _ in complete_checkpoints(copy)] == [5, 6]  # 3 and 4 pruned; the skipped 6 left alone
    assert verify_checkpoint(ckpt(copy, 5)).verified and not verify_checkpoint(ckpt(copy, 6)).ok
    assert select_checkpoint(copy) == (5, ckpt(copy, 5))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafusion.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def test_checkpoint_verify_command(copy, tmp_path):
    proc = cli("checkpoint", "verify", str(copy))
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["step_00000003 ok", "step_00000006 ok"]
    flip_bytes(ckpt(copy, 6) / "__0_0.distcp")
    proc = cli("checkpoint", "verify", str(copy))
    assert proc.returncode == 1
    ok, failed = proc.stdout.splitlines()
    assert ok == "step_00000003 ok" and failed.startswith("step_00000006 FAILED: __0_0.distcp checksum mismatch")
    proc = cli("checkpoint", "verify", str(ckpt(copy, 3)))  # one checkpoint
    assert proc.returncode == 0 and proc.stdout == "step_00000003 ok\n"
    for bad in (tmp_path / "nowhere", tmp_path):
        proc = cli("checkpoint", "verify", str(bad))
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and str(bad) in proc.stderr


def test_export_skips_a_corrupt_checkpoint_and_fails_cleanly_when_none_verifies(copy, tmp_path):
    """export (like eval and generate) loads through load_run."""
    flip_bytes(ckpt(copy, 6) / "__0_0.distcp")
    proc = cli("export", "--run-dir", str(copy), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step_00000006 skipped: __0_0.distcp checksum mismatch" in proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["megafusion"]["step"] == 3
    (ckpt(copy, 3) / ".metadata").unlink()
    proc = cli("export", "--run-dir", str(copy), "--out", str(tmp_path / "out2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("megafusion export:")]
    assert "none of its 2 checkpoint(s) verifies" in line


def test_train_stops_with_one_line_when_no_checkpoint_verifies(copy):
    for step in (3, 6):
        flip_bytes(ckpt(copy, step) / "__0_0.distcp")
    proc = run_train(copy, "tiny_text.yaml", BASE + ["train.steps=8"], expect_rc=2)
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("megafusion train:")]
    assert "none of its 2 checkpoint(s) verifies" in line
    assert sorted(losses_by_step(copy)) == list(range(1, 7))  # nothing trained, nothing overwritten


@pytest.mark.distributed
def test_two_ranks_hash_in_parallel_and_agree_on_the_fallback(tmp_path):
    """DP=2: the ranks share the hashing at save and at load; both resume from step 3."""
    full = tmp_path / "full"
    run_train(full, "tiny_text.yaml", BASE + ["train.steps=6"], nproc=2)
    assert verify_checkpoint(ckpt(full, 6)).verified
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    flip_bytes(ckpt(cut, 6) / "__0_0.distcp")
    proc = run_train(cut, "tiny_text.yaml", BASE + ["train.steps=6"], nproc=2)
    assert proc.stderr.count("checkpoint step_00000006 skipped") == 1  # said once, by rank 0
    assert "resumed from step 3" in proc.stdout
    assert losses_by_step(cut)[6] == pytest.approx(losses_by_step(full)[6], abs=1e-6)
