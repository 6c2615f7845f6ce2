"""Fault injection: a 2-rank torchrun run SIGKILLed in the middle of a checkpoint save.

The fault is injected from outside the package: a ``sitecustomize.py`` on PYTHONPATH
(imported by every process at start-up, torchrun's workers included) wraps the function
that writes one tensor into a shard file, or the rename that publishes a checkpoint, or the
deletion that prunes an old one, so that on the chosen rank and checkpoint it stops there
and leaves a marker file. The test then kills the whole process tree with SIGKILL, as a
node failure would, re-runs the same command and checks that the run resumes from the last
intact checkpoint and that every later step's loss equals an uninterrupted run's, exactly.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import CONFIGS, REPO, losses_by_step, run_train
from megafusion.training.checkpoint import complete_checkpoints

pytestmark = pytest.mark.distributed

# 6 steps, a checkpoint every 2, at TP=2 on 2 processes; the LR schedule is the same
# 6 steps in every run, so an interrupted run resumes on the uninterrupted run's schedule.
# keep=1: the save of step 4 has to prune step 2, so a kill mid-prune is reachable.
OVERRIDES = ["train.steps=6", "schedule.decay_steps=6", "checkpoint.every=2", "checkpoint.keep=1",
             "parallel.tp=2", "logging.tensorboard=false"]

SITECUSTOMIZE = textwrap.dedent('''
    """Test-only fault injection (see tests/training/test_fault_injection.py)."""
    import os

    MODE = os.environ.get("MF_FAULT_MODE")
    TARGET = os.environ.get("MF_FAULT_CHECKPOINT", "")
    RANK = os.environ.get("MF_FAULT_RANK", "0")
    MARKER = os.environ.get("MF_FAULT_MARKER", "")


    def _hang():
        import time

        open(MARKER, "w").close()
        while True:
            time.sleep(1)


    if MODE and os.environ.get("RANK", "0") == RANK:
        if MODE == "mid_write":
            # megatron's writer imports _write_item by name when it is first imported, so
            # wrapping torch's function before that reaches megatron's shard writer.
            import functools

            import torch.distributed.checkpoint.filesystem as fs

            _write_item = fs._write_item
            _written = []

            @functools.wraps(_write_item)  # megatron reads its signature
            def write_item(*args, **kwargs):
                result = _write_item(*args, **kwargs)
                stream = next((a for a in args if hasattr(a, "name") and hasattr(a, "write")), None)
                if stream is not None and TARGET in str(stream.name):
                    _written.append(1)
                    if len(_written) == 2:  # one shard file half written
                        stream.flush()
                        _hang()
                return result

            fs._write_item = write_item
        elif MODE == "before_publish":
            import pathlib

            _rename = pathlib.Path.rename

            def rename(self, target):
                if self.name == TARGET + ".tmp":
                    _hang()
                return _rename(self, target)

            pathlib.Path.rename = rename
        elif MODE == "mid_prune":
            import shutil

            _rmtree = shutil.rmtree

            def rmtree(path, *args, **kwargs):
                path = str(path)
                if path.rstrip("/").endswith(TARGET):
                    names = sorted(os.listdir(path))
                    os.remove(os.path.join(path, names[-1]))  # part of the old checkpoint gone
                    _hang()
                return _rmtree(path, *args, **kwargs)

            shutil.rmtree = rmtree
''')


def _train_cmd(run_dir):
    args = ["--config", str(CONFIGS / "tiny_text.yaml"), "--run-dir", str(run_dir)]
    for item in OVERRIDES:
        args += ["--set", item]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "megafusion.train", *args]


def _run_until_fault(run_dir, fault_dir, mode, checkpoint, rank):
    """Starts the 2-rank run with the fault armed; SIGKILLs the whole tree once it is reached."""
    (fault_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = fault_dir / f"reached-{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(fault_dir), os.environ.get("PYTHONPATH", "")]),
           "MF_FAULT_MODE": mode, "MF_FAULT_CHECKPOINT": checkpoint, "MF_FAULT_RANK": str(rank),
           "MF_FAULT_MARKER": str(marker)}
    proc = subprocess.Popen(_train_cmd(run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before the fault point "
                                     f"{mode}/{checkpoint}:\n{proc.stdout.read()[-4000:]}")
            if time.time() > deadline:
                raise AssertionError(f"fault point {mode}/{checkpoint} not reached in 240 s")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, with no chance to clean up
        proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(run_dir, "tiny_text.yaml", OVERRIDES, nproc=2)
    return losses_by_step(run_dir)


@pytest.mark.parametrize("mode, checkpoint, rank, resumes_from", [
    ("mid_write", "step_00000004", 1, 2),       # rank 1 dies with a shard half written
    ("before_publish", "step_00000004", 0, 2),  # every shard written, not yet renamed into place
    ("mid_prune", "step_00000002", 0, 4),       # step 4 published, step 2 half deleted
], ids=["mid-write", "before-publish", "mid-prune"])
def test_sigkill_mid_save_resumes_bit_exact(tmp_path, uninterrupted, mode, checkpoint, rank, resumes_from):
    run_dir, fault_dir = tmp_path / "run", tmp_path / "fault"
    fault_dir.mkdir()
    _run_until_fault(run_dir, fault_dir, mode, checkpoint, rank)

    proc = run_train(run_dir, "tiny_text.yaml", OVERRIDES, nproc=2)
    assert f"resumed from step {resumes_from}" in proc.stdout, proc.stdout[-3000:]
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(resumes_from + 1, 7):
        assert resumed[step] == uninterrupted[step], f"step {step} differs after the kill ({mode})"
    assert [step for step, _ in complete_checkpoints(run_dir)] == [6]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
