"""Preemption: SIGTERM / SIGINT end the current step with a checkpoint and a metrics row,
exit 143 with one line, and the re-run resumes bit-exact.

Before: SIGTERM killed the run without saving (with ``checkpoint.every: 0`` the whole run
was lost) and SIGINT printed a 49-line traceback.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, REPO, losses_by_step, read_metrics, run_train
from megafusion.training.checkpoint import complete_checkpoints
from megafusion.training.preemption import PREEMPTED_EXIT_CODE

# Long enough to be signalled mid-run; the schedule spans the same 2000 steps in every run,
# so a short reference run follows the same LRs as the interrupted one.
LONG = ["train.steps=2000", "schedule.decay_steps=2000", "logging.tensorboard=false", "checkpoint.every=0"]


def start_train(run_dir, overrides, nproc=1):
    args = ["--config", str(CONFIGS / "tiny_text.yaml"), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([*launcher, "-m", "megafusion.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def signal_after(proc, run_dir, sig, steps=3, delay=0.0, timeout=120):
    """Sends ``sig`` ``delay`` s after metrics.jsonl shows ``steps`` rows (0: once it exists,
    i.e. training has started); returns (rc, stdout, stderr)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended before it could be signalled:\n{proc.communicate()[1][-4000:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def stopped_step(stderr, signal_name):
    match = re.search(rf"megafusion train: stopped by {signal_name} after step (\d+); checkpoint saved; "
                      r"re-run to resume", stderr)
    assert match, stderr[-4000:]
    return int(match.group(1))


def test_sigterm_saves_the_current_step_and_resumes_bit_exact(tmp_path):
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    rc, _, err = signal_after(start_train(run_dir, LONG), run_dir, signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_CODE, err[-4000:]
    step = stopped_step(err, "SIGTERM")
    assert "Traceback" not in err
    assert [s for s, _ in complete_checkpoints(run_dir)] == [step]  # saved though checkpoint.every = 0
    assert read_metrics(run_dir)[-1]["step"] == step

    end = [f"train.steps={step + 3}"]
    proc = run_train(run_dir, "tiny_text.yaml", LONG + end)
    assert f"resumed from step {step}" in proc.stdout
    run_train(reference, "tiny_text.yaml", LONG + end)
    resumed, uninterrupted = losses_by_step(run_dir), losses_by_step(reference)
    assert sorted(resumed) == list(range(1, step + 4))  # one row per step, none twice
    for s in range(1, step + 4):
        assert resumed[s] == uninterrupted[s], f"step {s} differs from the uninterrupted run"


def test_sigint_takes_the_same_clean_path(tmp_path):
    rc, _, err = signal_after(start_train(tmp_path, LONG + ["logging.every=1000"]), tmp_path, signal.SIGINT,
                              steps=0, delay=0.5)
    assert rc == PREEMPTED_EXIT_CODE, err[-4000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-4000:]
    step = stopped_step(err, "SIGINT")
    assert err.strip().splitlines()[-1].startswith("megafusion train: stopped by SIGINT")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [step]
    assert [row["step"] for row in read_metrics(tmp_path)] == [step]  # logged although logging.every = 1000


@pytest.mark.distributed
def test_sigterm_to_torchrun_saves_on_both_ranks(tmp_path):
    """torchrun forwards SIGTERM to its workers (and SIGKILLs them 30 s later): both ranks
    agree on the stop at the same step and save one checkpoint together."""
    proc = start_train(tmp_path, LONG + ["parallel.tp=2"], nproc=2)
    _, _, err = signal_after(proc, tmp_path, signal.SIGTERM)
    step = stopped_step(err, "SIGTERM")
    assert err.count("megafusion train: stopped by SIGTERM") == 1  # rank 0 speaks for both
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [step]
    assert read_metrics(tmp_path)[-1]["step"] == step
    resumed = run_train(tmp_path, "tiny_text.yaml", LONG + ["parallel.tp=2", f"train.steps={step + 1}"], nproc=2)
    assert f"resumed from step {step}" in resumed.stdout
    assert sorted(losses_by_step(tmp_path)) == list(range(1, step + 2))
