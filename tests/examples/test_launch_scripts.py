"""The launch scripts of examples/launch run (single node) or at least parse (SLURM)."""

import os
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
    assert "step      3/3" in (tmp_path / "train.log").read_text()


def test_slurm_script_is_valid_bash_with_rendezvous():
    script = REPO / "examples" / "launch" / "slurm_multi_node.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("--rdzv_backend c10d", "--rdzv_endpoint", "SLURM_JOB_NUM_NODES", "logs/node-"):
        assert needle in text
