"""Tiny real IsoFLOP sweeps end to end: plan -> the planned `megafusion train` runs -> fit,
on the synthetic text family and on the ShapesWorld Transfusion family (text and image)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO, read_metrics

from megafusion.scaling.isoflop import read_run_dirs


def _megafusion(*args, cwd=REPO, timeout=900, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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

    # three tiny sizes rarely bracket the optimum: keep extrapolated optima in the law, this tests the plumbing
    _megafusion("isoflop", "fit", *map(str, run_dirs), "--plan", str(sweep / "plan.json"), "--out",
                str(sweep / "fit"), "--bootstrap", "50", "--include-extrapolated")
    laws = json.loads((sweep / "fit" / "scaling_laws.json").read_text())
    assert "text" in json.dumps(laws)
    for png in ("isoflop_text.png", "optima_text.png"):
        assert (sweep / "fit" / png).read_bytes()[:4] == b"\x89PNG"


def test_transfusion_shapes_sweep_per_modality_plan_train_fit(tmp_path):
    """The ShapesWorld Transfusion family (examples/configs/isoflop_family_shapes.yaml), as
    small as it goes: two budgets x three sizes (hidden 4, 8, 16), a few hundred steps in all.
    The planner's FLOPs (text tokens, image latents, padding, attention pairs of the measured
    packing) must match what the trainer counts on its real batches, and the fitter must read
    every run's final text and image losses. At this scale an IsoFLOP curve may have no
    minimum yet (examples/isoflop_shapes.sh is the sweep large enough to have one): then the
    fitter must say so for that modality and budget and still report the other modality."""
    family = yaml.safe_load((CONFIGS / "isoflop_family_shapes.yaml").read_text())
    for key in ("widths", "aspect_ratio", "head_dim", "ffn_ratio", "ffn_multiple"):
        del family["family"][key]
    family["family"]["sizes"] = [{"hidden_size": h, "num_layers": 1, "num_heads": max(1, h // 8),
                                  "ffn_hidden_size": 4 * h} for h in (4, 8, 16)]
    family["family"]["packing"] = {"measure": 8}
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(family))
    sweep = tmp_path / "sweep"
    _megafusion("isoflop", "plan", "--budgets", "3e9,6e9", "--family", str(path), "--out", str(sweep))
    plan = json.loads((sweep / "plan.json").read_text())
    assert len(plan["runs"]) == 6 and plan["packing"]["per_sequence"]["image"] > 0
    for run in plan["runs"]:
        assert run["tokens_by_modality"]["image"] > 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    launched = subprocess.run(["bash", str(sweep / "launch.sh")], env=env, capture_output=True, text=True,
                              timeout=900)
    assert launched.returncode == 0 and "failed" not in launched.stderr, launched.stderr[-3000:]
    run_dirs = [sweep / r["run_dir"] for r in plan["runs"]]
    expected = {}
    for run, run_dir in zip(plan["runs"], run_dirs):
        records = read_metrics(run_dir)
        assert len(records) == run["steps"]
        # the trainer's own count on the batches it trained on (tflops_per_gpu x step time)
        counted = sum(r["tflops_per_gpu"] * 1e12 * r["step_time_s"] for r in records)
        assert counted == pytest.approx(run["flops"], rel=0.1), run["name"]
        for m in ("text", "image"):
            logged = [r[f"loss_{m}"] for r in records if f"loss_{m}" in r][-5:]
            expected[run["name"], m] = (run["budget"], run["params"], run["tokens"], sum(logged) / len(logged))

    observations = read_run_dirs(run_dirs, plan=sweep / "plan.json", average_last=5)
    got = {(Path(o.source).name, o.modality): (o.budget, o.params, o.tokens, o.loss) for o in observations}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key

    out = sweep / "fit"
    # (--include-extrapolated: at this scale an optimum may lie outside the three sizes; see the first test)
    fitted = _megafusion("isoflop", "fit", *map(str, run_dirs), "--plan", str(sweep / "plan.json"), "--out", str(out),
                         "--bootstrap", "50", "--average-last", "5", "--include-extrapolated", check=False)
    print(fitted.stdout, fitted.stderr[-2000:])  # what the fitter found, for the CI log
    # every modality is fitted, or named with its budget as a curve without a minimum (exit 1: some fitted)
    failed = set(re.findall(r"error: (text|image) at budget [36]e\+09 FLOPs: loss vs log N has no minimum",
                            fitted.stderr))
    assert fitted.returncode == (0 if not failed else 2 if failed == {"text", "image"} else 1), fitted.stderr[-3000:]
    if fitted.returncode == 2:
        return
    laws = json.loads((out / "scaling_laws.json").read_text())
    assert list(laws["modalities"]) == [m for m in ("text", "image") if m not in failed]
    for m, entry in laws["modalities"].items():
        assert [b["flops"] for b in entry["budgets"]] == [3e9, 6e9]
        for b in entry["budgets"]:
            sizes = [r["params"] for r in b["runs"]]
            assert len(sizes) == 3 and b["n_opt"] > 0 and b["d_opt"] > 0
            assert b["extrapolated"] == (not min(sizes) <= b["n_opt"] <= max(sizes))
            assert f"{m:<6} C = {b['flops']:.3g}: N_opt = {b['n_opt']:.4g}" in fitted.stdout
        assert all(math.isfinite(entry[k]["exponent"]) for k in ("params_law", "tokens_law"))
        for png in (f"isoflop_{m}.png", f"optima_{m}.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
