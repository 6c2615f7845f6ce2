"""Kill-and-resume, resharding across layouts, and crash safety of checkpoints."""

import json
import shutil

import pytest

from conftest import losses_by_step, read_metrics, run_train
from megafusion.training.checkpoint import complete_checkpoints

# The LR schedule spans 6 steps in every run, so stopping at step 3 and resuming
# continues exactly the schedule of the uninterrupted run.
BASE = ["schedule.decay_steps=6", "logging.tensorboard=false", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    run_train(run_dir, "tiny_text.yaml", BASE + ["train.steps=6"])
    return losses_by_step(run_dir)


def test_resume_equals_uninterrupted(tmp_path, uninterrupted):
    run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=3"])
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [3]
    proc = run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=6"])
    assert "resumed from step 3" in proc.stdout
    resumed = losses_by_step(tmp_path)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == uninterrupted[step], f"step {step} differs after resume"


@pytest.mark.distributed
@pytest.mark.parametrize("target", [["parallel.tp=1"], ["parallel.pp=2"]], ids=["tp1", "pp2"])
def test_checkpoint_saved_at_tp2_resumes_at_other_layout(tmp_path, uninterrupted, target):
    run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=3", "parallel.tp=2"], nproc=2)
    nproc = 2 if "parallel.pp=2" in target else 1
    run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=6", *target], nproc=nproc)
    resumed = losses_by_step(tmp_path)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), f"step {step}"


@pytest.mark.distributed
def test_distributed_optimizer_checkpoint_reshards(tmp_path, uninterrupted):
    """Optimizer state sharded over DP2 resumes sharded over TP2 (fully reshardable format)."""
    do = ["parallel.distributed_optimizer=true"]
    run_train(tmp_path, "tiny_text.yaml", BASE + do + ["train.steps=3"], nproc=2)
    run_train(tmp_path, "tiny_text.yaml", BASE + do + ["train.steps=6", "parallel.tp=2"], nproc=2)
    resumed = losses_by_step(tmp_path)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), f"step {step}"


def test_incomplete_checkpoint_is_ignored_and_removed(tmp_path, uninterrupted):
    """A crash mid-save leaves a .tmp directory: resume uses the last complete one."""
    run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=3"])
    complete = tmp_path / "checkpoints" / "step_00000003"
    crashed = tmp_path / "checkpoints" / "step_00000005.tmp"
    shutil.copytree(complete, crashed)
    (crashed / "common.pt").write_bytes(b"truncated")
    proc = run_train(tmp_path, "tiny_text.yaml", BASE + ["train.steps=6"])
    assert "resumed from step 3" in proc.stdout
    assert not crashed.exists()
    assert losses_by_step(tmp_path)[6] == uninterrupted[6]


def test_keeps_last_k_checkpoints(tmp_path):
    run_train(tmp_path, "tiny_text.yaml", ["train.steps=4", "checkpoint.every=1", "checkpoint.keep=2",
                                           "logging.tensorboard=false"])
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_run_dir_contents(tmp_path):
    run_train(tmp_path, "tiny_text.yaml", ["train.steps=3", "checkpoint.every=0"])
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    records = read_metrics(tmp_path)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
        assert key in records[-1], key
    assert records[-1]["tflops_per_gpu"] > 0 and "mfu" not in records[-1]  # MFU only on a GPU
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [3]  # the final save


def test_non_finite_loss_stops_without_saving(tmp_path):
    """A huge learning rate blows the weights up; the run stops, names step and rank, saves nothing.

    (The gradients turn NaN one step before the loss would: the finite-update guard stops
    it there; test_finite_updates.py covers both messages.)"""
    proc = run_train(tmp_path, "tiny_text.yaml",
                     ["train.steps=6", "checkpoint.every=1", "optimizer.lr=1e30", "optimizer.min_lr=0",
                      "optimizer.clip_grad=0", "logging.tensorboard=false"], expect_rc=3)
    assert "non-finite gradient (NaN or inf) at step" in proc.stderr and "on rank 0" in proc.stderr
    bad_step = int(proc.stderr.split("at step ")[1].split()[0])
    saved = [step for step, _ in complete_checkpoints(tmp_path)]
    assert saved and max(saved) == bad_step - 1
