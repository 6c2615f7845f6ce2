"""``megafusion isoflop run``: train a plan's runs here, one after another, or write a SLURM array.

    megafusion isoflop run sweep/ [--out sweep/] [--launcher local|slurm] [--checkpoint-every N]

Each run trains its plan config (``configs/<run>.yaml``) into ``OUT/runs/<run>`` with
``megafusion train`` (``torchrun --standalone`` when the plan has ``gpus_per_run`` > 1),
its stdout and stderr appended to ``OUT/runs/<run>/train.log``. Two settings are added on
the command line, never in the config file: ``checkpoint.save_final=true`` (the final
checkpoint is the mark of a finished run) and ``checkpoint.every`` (``--checkpoint-every``,
by default the config's own or, when it has none, a tenth of the run's steps) so that a
killed run resumes from its last checkpoint; neither changes what is trained.

A run is *done* when its ``config.yaml`` (and every earlier attempt's ``config.<n>.yaml``)
equals the plan's config, ``metrics.jsonl`` reached ``train.steps`` and the complete
checkpoint of step ``train.steps`` exists. A done run is skipped; any other run dir is
handed to the trainer, which resumes it from its newest checkpoint (or starts it again
when it has none). A run dir whose config differs from the plan's is refused before
anything runs (exit 2). A failed run stops the sweep (exit 1); running the same command
again continues where it stopped.

``--launcher slurm`` writes ``OUT/launch.sbatch``, an array with one task per run: task i
reads line i+1 of ``OUT/runs.tsv`` (run name, config, checkpoint interval) and runs the
same train command. ``MEGAFUSION_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash OUT/launch.sbatch``
prints that command and runs nothing. A re-submitted array resumes: the trainer picks up
each run dir's newest checkpoint, and a finished run (final checkpoint) trains no step.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megafusion.scaling.plan import PlanError
from megafusion.settings import flatten

# Settings the runner sets itself (on the command line) or the trainer writes back on a
# resume (the LR schedule's horizon, when the config leaves it to train.steps): they do
# not change what a run trains, so they are left out of the comparison with the plan.
RUNNER_KEYS = ("checkpoint.every", "checkpoint.save_final")
LOG_NAME = "train.log"
LIST_NAME = "runs.tsv"


@dataclass(frozen=True)
class Run:
    index: int
    name: str
    config: Path  # the plan's trainer config (absolute)
    run_dir: Path  # OUT/runs/<name> (absolute)
    steps: int
    checkpoint_every: int

    def overrides(self) -> list[str]:
        return ["checkpoint.save_final=true", f"checkpoint.every={self.checkpoint_every}"]


def _load_plan(plan: Path) -> tuple[Path, dict]:
    path = plan / "plan.json" if plan.is_dir() else plan
    if not path.is_file():
        raise PlanError(f"PLAN '{plan}' has no plan.json; give the directory (or its plan.json) that "
                        f"`megafusion isoflop plan --out DIR` wrote")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"{path} is not a readable plan ({err}); write it again with `megafusion isoflop plan`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list) or not manifest["runs"]:
        raise PlanError(f"{path} lists no runs; write it again with `megafusion isoflop plan`")
    return path.parent.resolve(), manifest


def _config_dict(path: Path) -> dict[str, Any]:
    from megafusion.config import ConfigError, load_config

    try:
        return load_config(path).to_dict()
    except (ConfigError, OSError, yaml.YAMLError) as err:
        raise PlanError(f"{path}: {err}") from None


def config_differences(planned: dict, trained: dict) -> list[str]:
    """``key: planned -> in the run dir`` for every setting that differs, but the runner's own
    keys and a schedule horizon the trainer filled in on a resume (``schedule.decay_steps``
    left unset in the plan)."""
    a, b = flatten(planned), flatten(trained)
    ignored = set(RUNNER_KEYS)
    if a.get("schedule.decay_steps") is None:
        ignored.add("schedule.decay_steps")
    return [f"{k}: {a.get(k)!r} in the plan, {b.get(k)!r} in the run dir"
            for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)]


def plan_runs(plan: Path, out: Path, checkpoint_every: int | None = None) -> tuple[list[Run], dict]:
    """The plan's runs (in plan order) with their configs checked to exist and load."""
    plan_dir, manifest = _load_plan(plan)
    runs = []
    for i, entry in enumerate(manifest["runs"]):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("config"):
            raise PlanError(f"{plan_dir / 'plan.json'}: run {i} has no name or config; write the plan again")
        name = str(entry["name"])
        config = (plan_dir / entry["config"]).resolve()
        if not config.is_file():
            raise PlanError(f"run {name}: its config {config} does not exist; write the plan again "
                            f"(`megafusion isoflop plan`)")
        cfg = _config_dict(config)
        steps = int(cfg["train"]["steps"])
        every = checkpoint_every or int(cfg["checkpoint"]["every"]) or max(1, math.ceil(steps / 10))
        runs.append(Run(i, name, config, (out / "runs" / name).resolve(), steps, every))
    return runs, manifest


def _metrics_last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            last = record["step"]
    return last


def check_run_dir(run: Run) -> None:
    """Refuses a run dir that was trained with another config than the plan's (any attempt)."""
    if not run.run_dir.exists():
        return
    if not run.run_dir.is_dir():
        raise PlanError(f"run {run.name}: {run.run_dir} is a file, not a run directory; move it away")
    attempts = sorted(run.run_dir.glob("config.*.yaml")) + [run.run_dir / "config.yaml"]
    planned = _config_dict(run.config)
    for path in attempts:
        if not path.is_file():
            continue
        differences = config_differences(planned, _config_dict(path))
        if differences:
            more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
            raise PlanError(f"run {run.name}: {path} differs from the plan's {run.config} ({differences[0]}{more}); "
                            f"move {run.run_dir} away to train it afresh, or restore the plan's config")


def run_state(run: Run) -> tuple[str, int]:
    """('done' | 'resume' | 'new', the step it starts after). Call :func:`check_run_dir` first."""
    from megafusion.training.checkpoint import complete_checkpoints

    checkpoints = complete_checkpoints(run.run_dir)
    final = any(step == run.steps for step, _ in checkpoints)
    if final and _metrics_last_step(run.run_dir) == run.steps and (run.run_dir / "config.yaml").is_file():
        return "done", run.steps
    if checkpoints:
        return "resume", checkpoints[-1][0]
    return "new", 0


def train_command(run: Run, gpus: int, python: str = sys.executable) -> list[str]:
    args = ["--config", str(run.config), "--run-dir", str(run.run_dir)]
    for override in run.overrides():
        args += ["--set", override]
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "-m", "megafusion.train", *args]
    return [python, "-m", "megafusion.train", *args]


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"exit code {rc} (killed by {signal.Signals(-rc).name})"
        except ValueError:
            return f"exit code {rc}"
    return f"exit code {rc}"


class RunFailed(RuntimeError):
    pass


def run_local(runs: list[Run], gpus: int, plan_json: Path | None = None, out=sys.stdout) -> None:
    n = len(runs)
    for run in runs:  # every run dir is checked before anything trains
        check_run_dir(run)
    began = time.perf_counter()
    counts = {"trained": 0, "resumed": 0, "skipped": 0}
    for k, run in enumerate(runs, 1):
        state, step = run_state(run)
        tag = f"[{k}/{n}] {run.name}"
        if state == "done":
            print(f"{tag}: skipped (done: {run.steps} steps and the final checkpoint in {run.run_dir})",
                  file=out, flush=True)
            counts["skipped"] += 1
            continue
        log = run.run_dir / LOG_NAME
        what = f"resuming from step {step} of {run.steps}" if state == "resume" else f"training {run.steps} steps"
        print(f"{tag}: {what} (log: {log})", file=out, flush=True)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "a") as handle:
            handle.write(f"=== megafusion isoflop run, {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}\n$ "
                         f"{shlex.join(train_command(run, gpus))}\n")
            handle.flush()
            proc = subprocess.Popen(train_command(run, gpus), stdout=handle, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:  # the trainer got the Ctrl-C too: it saves a checkpoint and stops
                rc = proc.wait()
                raise RunFailed(f"interrupted during run {run.name} ({_describe_exit(rc)}); see {log}; "
                                f"run the same command again to resume it") from None
        elapsed = time.perf_counter() - started
        if rc != 0:
            raise RunFailed(f"run {run.name} failed with {_describe_exit(rc)}; see {log}; "
                            f"run the same command again to continue the sweep")
        done, _ = run_state(run)
        if done != "done":
            raise RunFailed(f"run {run.name} exited 0 but did not reach step {run.steps} with a final "
                            f"checkpoint; see {log}")
        verb = "resumed" if state == "resume" else "trained"
        counts[verb] += 1
        print(f"{tag}: {verb} ({elapsed:.1f} s)", file=out, flush=True)
    runs_dir = runs[0].run_dir.parent
    fit = f"megafusion isoflop fit {shlex.quote(str(runs_dir))}/*"
    if plan_json is not None:
        fit += f" --plan {shlex.quote(str(plan_json))}"
    print(f"{n} runs: {counts['trained']} trained, {counts['resumed']} resumed, {counts['skipped']} skipped "
          f"({time.perf_counter() - began:.1f} s); fit with: {fit} --out {shlex.quote(str(runs_dir.parent / 'fit'))}",
          file=out)


def write_sbatch(runs: list[Run], out_dir: Path, gpus: int) -> Path:
    """OUT/runs.tsv (one line per run: name, config, checkpoint interval) and OUT/launch.sbatch."""
    out_dir = out_dir.resolve()
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    for run in runs:
        if "\t" in str(run.config) or "\n" in str(run.config):
            raise PlanError(f"run {run.name}: its config path {str(run.config)!r} holds a tab or newline; "
                            f"move the plan to a plain path")
    (out_dir / LIST_NAME).write_text("".join(f"{r.name}\t{r.config}\t{r.checkpoint_every}\n" for r in runs))
    launcher = ('torchrun --standalone --nproc_per_node "$GPUS" -m megafusion.train' if gpus > 1
                else "megafusion train")
    lines = [
        "#!/usr/bin/env bash",
        "# IsoFLOP sweep as a SLURM array, one task per run (megafusion isoflop run --launcher slurm).",
        f"#   sbatch {shlex.quote(str(out_dir / 'launch.sbatch'))}",
        f"# Task i trains line i+1 of {LIST_NAME} (run, config, checkpoint interval) into runs/<run>;",
        "# re-submit to resume (finished runs train no step). MEGAFUSION_DRY_RUN=1 prints the command.",
        "#SBATCH --job-name=isoflop",
        f"#SBATCH --array=0-{len(runs) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --output={out_dir}/logs/%x_%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(out_dir))}",
        f"GPUS={gpus}",
        'TASK=${SLURM_ARRAY_TASK_ID:?"run under sbatch (an array task), or set SLURM_ARRAY_TASK_ID"}',
        f'line=$(sed -n "$((TASK + 1))p" {LIST_NAME})',
        f'[ -n "$line" ] || {{ echo "array task $TASK: no such line in {LIST_NAME} ({len(runs)} runs)" >&2; exit 2; }}',
        "IFS=$'\\t' read -r name config every <<< \"$line\"",
        f'cmd=({launcher} --config "$config" --run-dir "runs/$name"',
        '  --set checkpoint.save_final=true --set "checkpoint.every=$every")',
        'if [ "${MEGAFUSION_DRY_RUN:-0}" = 1 ]; then',
        "  printf '%q ' \"${cmd[@]}\"",
        "  printf '\\n'",
        "  exit 0",
        "fi",
        'mkdir -p "runs/$name"',
        f'exec "${{cmd[@]}}" >> "runs/$name/{LOG_NAME}" 2>&1',
    ]
    path = out_dir / "launch.sbatch"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def run_plan(plan: Path, out: Path | None, launcher: str = "local", checkpoint_every: int | None = None) -> int:
    if checkpoint_every is not None and checkpoint_every < 1:
        raise PlanError(f"--checkpoint-every {checkpoint_every}: give a number of steps >= 1")
    plan_dir, _ = _load_plan(plan)
    out = (out or plan_dir).resolve()
    runs, manifest = plan_runs(plan, out, checkpoint_every)
    gpus = int(manifest.get("gpus_per_run") or 1)
    if launcher == "slurm":
        for run in runs:
            check_run_dir(run)
        path = write_sbatch(runs, out, gpus)
        print(f"{len(runs)} runs, {gpus} GPU(s) each: wrote {path} and {out / LIST_NAME}")
        print(f"sbatch {shlex.quote(str(path))}")
        return 0
    run_local(runs, gpus, plan_dir / "plan.json")
    return 0
