"""``megafusion isoflop run``: a plan trained here one run after another (resumable), or
written as a SLURM array script; then ``isoflop fit`` on the run dirs.

One tiny real sweep (the text family, two budgets x three sizes) is trained once for the
module; the other tests work on copies of it. A killed run is made deterministic with a
``sitecustomize.py`` on PYTHONPATH (imported by the trainer process at start-up): right
after the chosen run publishes its first checkpoint, the trainer SIGKILLs itself.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import CONFIGS, REPO, losses_by_step, read_metrics

from megafusion.scaling.isoflop import read_run_dirs

BUDGETS = "2e10,3e10"  # the smallest budgets of this family whose curves the fitter accepts
FAMILY = yaml.safe_load((CONFIGS / "isoflop_family_text.yaml").read_text())
KILLED = "c2e10_h32_l2"  # 144 steps, first checkpoint at step 15 (a tenth of its steps)

SITECUSTOMIZE = textwrap.dedent('''
    """Test-only fault (tests/scaling/test_isoflop_run.py): SIGKILL after a checkpoint is published."""
    import os

    RUN, STEP = os.environ.get("MF_KILL_RUN"), os.environ.get("MF_KILL_STEP")
    if RUN and STEP:
        import pathlib
        import signal

        _rename = pathlib.Path.rename

        def rename(self, target):
            result = _rename(self, target)
            if self.name == STEP + ".tmp" and self.parent.parent.name == RUN:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        pathlib.Path.rename = rename
''')


def _megafusion(*args, env=None, timeout=900):
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "megafusion.cli", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(runs_dir):
    """Every file under the run dirs with its size and mtime: unchanged means nothing ran."""
    return {str(p.relative_to(runs_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(runs_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("isoflop_run") / "sweep"
    planned = _megafusion("isoflop", "plan", "--budgets", BUDGETS, "--family",
                          str(CONFIGS / "isoflop_family_text.yaml"), "--out", str(out), "--sizes", "3")
    assert planned.returncode == 0, planned.stderr
    started = time.perf_counter()
    ran = _megafusion("isoflop", "run", str(out))
    print(f"isoflop run: {time.perf_counter() - started:.1f} s\n{ran.stdout}")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    return out, json.loads((out / "plan.json").read_text()), ran


def test_local_run_trains_every_run_and_fit_reads_the_run_dirs(sweep, tmp_path):
    out, plan, ran = sweep
    runs = plan["runs"]
    assert len(runs) == 6 and plan["gpus_per_run"] == 1
    lines = ran.stdout.splitlines()
    for k, run in enumerate(runs, 1):
        run_dir = out / "runs" / run["name"]
        assert any(line.startswith(f"[{k}/6] {run['name']}: trained (") for line in lines), ran.stdout
        records = read_metrics(run_dir)
        assert [r["step"] for r in records] == list(range(1, run["steps"] + 1))
        assert (run_dir / "checkpoints" / f"step_{run['steps']:08d}").is_dir()  # the final checkpoint
        assert re.search(r"step +1/", (run_dir / "train.log").read_text())  # the trainer's output went to its log
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        planned = yaml.safe_load((out / run["config"]).read_text())
        assert cfg["model"] == {**cfg["model"], **planned["model"]} and cfg["train"]["steps"] == run["steps"]
        # the plan's config file is left as planned (the runner's settings go on the command line)
        assert planned["checkpoint"] == FAMILY["checkpoint"] and FAMILY["checkpoint"]["every"] == 0
    assert "6 trained, 0 resumed, 0 skipped" in ran.stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r["name"] for r in runs)

    run_dirs = sorted((out / "runs").iterdir())
    observations = read_run_dirs(run_dirs, plan=out / "plan.json")
    assert len(observations) == 6 and {o.budget for o in observations} == {2e10, 3e10}
    fitted = _megafusion("isoflop", "fit", *map(str, run_dirs), "--plan", str(out / "plan.json"),
                         "--out", str(tmp_path / "fit"), "--bootstrap", "20",
                         # three sizes per budget need not bracket the optimum: this test is about the
                         # runner's run dirs, so the fit keeps extrapolated optima (the fitter's own tests
                         # check that they are left out by default)
                         "--include-extrapolated")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    laws = json.loads((tmp_path / "fit" / "scaling_laws.json").read_text())
    assert [b["flops"] for b in laws["modalities"]["text"]["budgets"]] == [2e10, 3e10]


def test_rerun_skips_finished_runs_and_trains_nothing(sweep):
    out, plan, _ = sweep
    before = _snapshot(out / "runs")
    started = time.perf_counter()
    again = _megafusion("isoflop", "run", str(out / "plan.json"), "--out", str(out))
    elapsed = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    for k, run in enumerate(plan["runs"], 1):
        assert f"[{k}/6] {run['name']}: skipped (done: {run['steps']} steps" in again.stdout
    assert "0 trained, 0 resumed, 6 skipped" in again.stdout
    assert _snapshot(out / "runs") == before  # no trainer started: not even a log line
    print(f"re-run: {elapsed:.1f} s")


def test_killed_run_resumes_from_its_checkpoint_bit_exact(sweep, tmp_path):
    out, plan, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "runs" / KILLED)  # the other five stay finished
    steps = next(r["steps"] for r in plan["runs"] if r["name"] == KILLED)
    first = -(-steps // 10)
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    fault = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fault"), os.environ.get("PYTHONPATH", "")]),
             "MF_KILL_RUN": KILLED, "MF_KILL_STEP": f"step_{first:08d}"}

    killed = _megafusion("isoflop", "run", str(copy), env=fault)
    log = copy / "runs" / KILLED / "train.log"
    assert killed.returncode == 1, killed.stdout + killed.stderr
    assert f"run {KILLED} failed with exit code -9 (killed by SIGKILL); see {log}" in killed.stderr
    assert "Traceback" not in killed.stderr
    assert f"{KILLED}: trained" not in killed.stdout
    assert [r["step"] for r in read_metrics(copy / "runs" / KILLED)][-1] < steps  # really cut short
    assert sorted(p.name for p in (copy / "runs" / KILLED / "checkpoints").iterdir()) == [f"step_{first:08d}"]

    resumed = _megafusion("isoflop", "run", str(copy))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{KILLED}: resuming from step {first} of {steps}" in resumed.stdout
    assert f"{KILLED}: resumed (" in resumed.stdout and "0 trained, 1 resumed, 5 skipped" in resumed.stdout
    assert f"resumed from step {first}" in log.read_text()
    # every step's loss equals the uninterrupted run's, exactly
    assert losses_by_step(copy / "runs" / KILLED) == losses_by_step(out / "runs" / KILLED)
    assert len(losses_by_step(copy / "runs" / KILLED)) == steps
    # the resume wrote its schedule horizon into config.yaml; the run is still the plan's, and done
    third = _megafusion("isoflop", "run", str(copy))
    assert third.returncode == 0 and "0 trained, 0 resumed, 6 skipped" in third.stdout, third.stderr[-2000:]


def test_changed_config_is_refused_before_anything_runs(sweep, tmp_path):
    out, plan, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    name = plan["runs"][4]["name"]
    path = copy / "configs" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["optimizer"]["lr"] = 1.0e-3
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(copy / "runs" / plan["runs"][0]["name"])  # would train first, were the sweep not refused
    before = _snapshot(copy / "runs")
    refused = _megafusion("isoflop", "run", str(copy))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"run {name}:" in lines[0] and "optimizer.lr: 0.001 in the plan, 0.003 in the run dir" in lines[0]
    assert _snapshot(copy / "runs") == before and refused.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "PLAN '{tmp}/nowhere' has no plan.json"),
    (["{plan}", "--checkpoint-every", "0"], "--checkpoint-every 0: give a number of steps >= 1"),
])
def test_bad_input_is_one_line_exit_2(sweep, tmp_path, args, message):
    out, _, _ = sweep
    fill = {"tmp": str(tmp_path), "plan": str(out)}
    proc = _megafusion("isoflop", "run", *[a.format(**fill) for a in args])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message.format(**fill) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("gpus", [1, 4])
def test_slurm_array_script_picks_each_tasks_config(sweep, tmp_path, gpus):
    out, plan, _ = sweep
    if gpus > 1:  # a plan for several GPUs per run (configs only; nothing is trained)
        out = tmp_path / "plan"
        planned = _megafusion("isoflop", "plan", "--budgets", BUDGETS, "--family",
                              str(CONFIGS / "isoflop_family_text.yaml"), "--out", str(out), "--sizes", "3",
                              "--gpus-per-run", str(gpus))
        assert planned.returncode == 0, planned.stderr
    target = tmp_path / "slurm"
    wrote = _megafusion("isoflop", "run", str(out), "--out", str(target), "--launcher", "slurm")
    assert wrote.returncode == 0, wrote.stderr
    script = target / "launch.sbatch"
    assert f"sbatch {script}" in wrote.stdout.splitlines()
    body = script.read_text()
    assert "#SBATCH --array=0-5\n" in body and f"#SBATCH --gpus-per-node={gpus}\n" in body
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert not (target / "runs" / plan["runs"][0]["name"]).exists()  # nothing trained, nothing created per run

    env = {"PATH": os.environ["PATH"], "MEGAFUSION_DRY_RUN": "1"}
    for i, run in enumerate(plan["runs"]):
        task = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              capture_output=True, text=True, timeout=60)
        assert task.returncode == 0, task.stderr
        argv = shlex.split(task.stdout)
        head = (["torchrun", "--standalone", "--nproc_per_node", str(gpus), "-m", "megafusion.train"] if gpus > 1
                else ["megafusion", "train"])
        assert argv[:len(head)] == head, argv
        assert argv[argv.index("--config") + 1] == str((out / run["config"]).resolve())
        assert argv[argv.index("--run-dir") + 1] == f"runs/{run['name']}"
        every = -(-run["steps"] // 10)
        assert "checkpoint.save_final=true" in argv and f"checkpoint.every={every}" in argv
    assert not (target / "runs" / plan["runs"][0]["name"]).exists()  # the dry run created nothing
    past = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "6"},
                          capture_output=True, text=True, timeout=60)
    assert past.returncode == 2 and "array task 6: no such line" in past.stderr


def test_done_needs_every_step_logged_and_the_final_checkpoint(sweep, tmp_path):
    from megafusion.scaling.isoflop_run import plan_runs, run_state

    out, plan, _ = sweep
    runs, _ = plan_runs(out, tmp_path)
    run = next(r for r in runs if r.name == KILLED)
    shutil.copytree(out / "runs" / KILLED, run.run_dir)
    assert run_state(run) == ("done", run.steps)
    metrics = run.run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last record cut short
    assert run_state(run) == ("resume", run.steps)
    metrics.write_text("".join(lines))
    shutil.rmtree(run.run_dir / "checkpoints" / f"step_{run.steps:08d}")
    (run.run_dir / "checkpoints" / f"step_{run.steps:08d}.tmp").mkdir()  # a save cut short is no checkpoint
    assert run_state(run) == ("new", 0)
