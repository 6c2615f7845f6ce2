"""A tiny real IsoFLOP sweep end to end: plan -> the planned `megafusion train` runs -> fit."""

import json
import os
import subprocess
import sys

from conftest import CONFIGS, REPO


def _megafusion(*args, cwd=REPO, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_budgets_three_sizes_plan_train_fit(tmp_path):
    sweep = tmp_path / "sweep"
    _megafusion("isoflop", "plan", "--budgets", "2e10,6e10", "--family", str(CONFIGS / "isoflop_family_text.yaml"),
                "--out", str(sweep), "--sizes", "3")
    plan = json.loads((sweep / "plan.json").read_text())
    runs = plan["runs"] if isinstance(plan, dict) else plan
    assert len(runs) == 6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    launched = subprocess.run(["bash", str(sweep / "launch.sh")], env=env, capture_output=True, text=True,
                              timeout=900)
    assert launched.returncode == 0 and "failed" not in launched.stderr, launched.stderr[-3000:]
    run_dirs = sorted((sweep / "runs").iterdir())
    assert len(run_dirs) == 6 and all((d / "metrics.jsonl").is_file() for d in run_dirs)

    _megafusion("isoflop", "fit", *map(str, run_dirs), "--plan", str(sweep / "plan.json"), "--out",
                str(sweep / "fit"), "--bootstrap", "50")
    laws = json.loads((sweep / "fit" / "scaling_laws.json").read_text())
    assert "text" in json.dumps(laws)
    for png in ("isoflop_text.png", "optima_text.png"):
        assert (sweep / "fit" / png).read_bytes()[:4] == b"\x89PNG"
