"""The launch scripts of examples/launch run (single node) or at least parse (SLURM)."""

import os
import re
import subprocess

import pytest

from conftest import REPO, losses_by_step


@pytest.mark.distributed
def test_single_node_torchrun_script_trains(tmp_path):
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        ["bash", "examples/launch/torchrun_single_node.sh", "examples/configs/tiny_text.yaml", str(tmp_path),
         "--set", "train.steps=3", "--set", "parallel.tp=2", "--set", "logging.tensorboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(losses_by_step(tmp_path)) == [1, 2, 3]
    assert re.search(r"step\s+3/3", (tmp_path / "train.log").read_text())  # the progress line, tee'd


def test_slurm_script_is_valid_bash_with_rendezvous():
    script = REPO / "examples" / "launch" / "slurm_multi_node.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("--rdzv_backend c10d", "--rdzv_endpoint", "SLURM_JOB_NUM_NODES", "logs/node-"):
        assert needle in text


def _fake_slurm(bin_dir):
    """``srun`` that runs its command here (dropping its options) and ``scontrol`` for one host."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


@pytest.mark.distributed
def test_slurm_time_limit_signal_saves_and_stops(tmp_path):
    """SLURM's pre-timeout SIGUSR1 to the batch script: both ranks save at one step and stop."""
    import signal
    import socket
    import time

    from megafusion.training.checkpoint import complete_checkpoints

    _fake_slurm(tmp_path / "bin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "42", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MEGAFUSION_REQUEUE": "1", "SCONTROL_LOG": str(tmp_path / "scontrol.log")}
    proc = subprocess.Popen(
        ["bash", "examples/launch/slurm_multi_node.sbatch", "examples/configs/tiny_text.yaml", str(run_dir),
         "--set", "train.steps=5000", "--set", "parallel.tp=2", "--set", "logging.tensorboard=false",
         "--set", "checkpoint.every=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while len(losses_by_step(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the run did not start training in 180 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # to the batch script only, as --signal=B:USR1 does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (run_dir / "logs" / "node-0.log").read_text()
    assert "asking the ranks to save and stop" in out and "stopped with a checkpoint" in out, out
    assert "stopped by SIGTERM" in log, log[-3000:]
    last_logged = max(losses_by_step(run_dir))
    assert 3 <= last_logged < 5000
    assert [step for step, _ in complete_checkpoints(run_dir)] == [last_logged]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]


SPACED = ["--set", "data.paths=[a b]", "--set", "logging.note=it's \"quoted\" $HOME *"]


def _slurm_env(tmp_path, **extra):
    return {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7", "SLURM_NODEID": "0", "GPUS_PER_NODE": "4", **extra}


def test_slurm_dry_run_prints_the_command_with_spaced_arguments_intact(tmp_path):
    """MEGAFUSION_DRY_RUN=1 prints srun's argv shell-quoted: each argument stays one word."""
    import shlex

    _fake_slurm(tmp_path / "bin")
    run_dir = tmp_path / "run dir"
    proc = subprocess.run(
        ["bash", "examples/launch/slurm_multi_node.sbatch", "cfg dir/x.yaml", str(run_dir), *SPACED],
        cwd=REPO, env=_slurm_env(tmp_path, MEGAFUSION_DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    train = argv[argv.index("megafusion.train") + 1:]
    assert train == ["--config", "cfg dir/x.yaml", "--run-dir", str(run_dir), *SPACED]
    torchrun = argv[argv.index("torchrun"):argv.index("megafusion.train")]
    assert torchrun == ["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "7", "--rdzv_backend",
                        "c10d", "--rdzv_endpoint", "localhost:29500", "-m"]
    assert not run_dir.exists(), "a dry run creates nothing"


def test_slurm_script_hands_spaced_arguments_to_torchrun_intact(tmp_path):
    """Not only the printout: srun's node command (bash -c with the per-node log) passes the
    arguments to torchrun as they were given (a fake torchrun writes its argv to the node log)."""
    import json

    _fake_slurm(tmp_path / "bin")
    (tmp_path / "bin" / "torchrun").write_text(
        '#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    run_dir = tmp_path / "run dir"
    proc = subprocess.run(
        ["bash", "examples/launch/slurm_multi_node.sbatch", "x.yaml", str(run_dir), *SPACED],
        cwd=REPO, env=_slurm_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads((run_dir / "logs" / "node-0.log").read_text())
    assert argv[argv.index("megafusion.train") + 1:] == ["--config", "x.yaml", "--run-dir", str(run_dir), *SPACED]


def test_single_node_dry_run_keeps_spaced_arguments(tmp_path):
    import shlex

    proc = subprocess.run(
        ["bash", "examples/launch/torchrun_single_node.sh", "x.yaml", str(tmp_path / "r"), *SPACED],
        cwd=REPO, env={**os.environ, "MEGAFUSION_DRY_RUN": "1", "NPROC": "2"}, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "megafusion.train",
                                        "--config", "x.yaml", "--run-dir", str(tmp_path / "r"), *SPACED]
    assert not (tmp_path / "r").exists()
