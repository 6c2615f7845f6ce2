"""Honest resumes: a refused resume changes nothing, each attempt's config is kept, re-done
steps are logged once, and a longer run says how its LR schedule continues.

Before: ``config.yaml`` was overwritten before the checkpoint failed to load (so the intact
run could no longer be exported), ``metrics.jsonl`` kept a second row for every step
re-done after a resume, and extending ``train.steps`` trained on at the minimum LR while
``config.yaml`` claimed a schedule over the new length, without a word.
"""

import shutil

import pytest
import yaml

from conftest import losses_by_step, read_metrics, run_train
from megafusion.training.checkpoint import complete_checkpoints

QUIET = ["logging.tensorboard=false"]


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_refused_resume_changes_nothing_and_resumes_log_each_step_once(tmp_path):
    # 3 steps, checkpoint at 2: step 3 is logged but not saved (as after a crash).
    run_train(tmp_path, "tiny_text.yaml", QUIET + ["train.steps=3", "checkpoint.every=2",
                                                   "checkpoint.save_final=false", "schedule.decay_steps=4"])
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    first = read_metrics(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.1.yaml", "config.yaml"]

    before = _snapshot(tmp_path)
    proc = run_train(tmp_path, "tiny_text.yaml", QUIET + ["train.steps=4", "model.hidden_size=128"], expect_rc=2)
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "model.hidden_size: 64 -> 128" in error[0], proc.stderr
    assert _snapshot(tmp_path) == before, "a refused resume changed the run directory"

    # A killed write may leave a torn last line; it goes with the rows the resume re-does.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    proc = run_train(tmp_path, "tiny_text.yaml", QUIET + ["train.steps=4", "schedule.decay_steps=4"])
    assert "resumed from step 2" in proc.stdout
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == first[2]["loss"]  # step 3 re-done from the step-2 checkpoint, the same
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.1.yaml", "config.2.yaml", "config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == (tmp_path / "config.2.yaml").read_text()
    assert yaml.safe_load((tmp_path / "config.1.yaml").read_text())["train"]["steps"] == 3


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a run")
    proc = run_train(path, "tiny_text.yaml", QUIET, expect_rc=2)
    assert proc.stderr.strip() == (f"megafusion train: --run-dir {path} is a file, not a directory; give a directory "
                                   "(a new one starts a run, an existing run directory is resumed)")
    assert path.read_text() == "not a run"


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step cosine run (decay over train.steps = 4; tiny_text: warmup 2, min_lr 3e-4)."""
    run_dir = tmp_path_factory.mktemp("four")
    run_train(run_dir, "tiny_text.yaml", QUIET + ["train.steps=4"])
    return run_dir


def test_extending_steps_says_the_schedule_continues_as_saved(tmp_path, four_steps):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    proc = run_train(tmp_path, "tiny_text.yaml", QUIET + ["train.steps=8"])
    line = next(line for line in proc.stdout.splitlines() if "resuming at step" in line)
    assert ("resuming at step 4 of 8: LR schedule (cosine) continues as saved (decay over 4 steps), "
            "now at lr 0.0003, schedule step 4") in line
    assert "set schedule.decay_steps to re-plan it" in line
    lrs = {row["step"]: row["lr"] for row in read_metrics(tmp_path)}
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([3e-4] * 4)
    # config.yaml tells the schedule that ran, not the one the command line implied.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["schedule"]["decay_steps"] == 4


def test_explicit_decay_steps_re_plans_the_schedule(tmp_path, four_steps):
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    shutil.copytree(four_steps, run_dir)
    proc = run_train(run_dir, "tiny_text.yaml", QUIET + ["train.steps=8", "schedule.decay_steps=8"])
    assert "re-planned by schedule.decay_steps: decay over 8 steps instead of 4" in proc.stdout
    assert "set schedule.decay_steps" not in proc.stdout
    run_train(reference, "tiny_text.yaml", QUIET + ["train.steps=8"])  # planned over 8 from the start
    resumed, planned = losses_by_step(run_dir, "lr"), losses_by_step(reference, "lr")
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([planned[s] for s in range(5, 9)], rel=1e-12)
    assert resumed[5] > 3e-4
