"""Honest resumes: what a run directory may be resumed with, and what it says when it is.

- :func:`check_run_dir`: the run directory is a directory (or does not exist yet).
- :func:`check_compatible`: a run directory that holds a checkpoint is resumed only with a
  model of the same shape; checked before anything in it is written.
- :func:`write_config`: each attempt's config is kept as ``config.<n>.yaml``; ``config.yaml``
  is the latest (what eval, generate and export read), written once the resume is known good.
- :func:`continue_schedule`: the LR schedule continues as the checkpoint saved it unless
  ``schedule.decay_steps`` is given explicitly; one line says which and where it stands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from megafusion.config import Config, ConfigError, save_config
from megafusion.data.tokenizer import write_tokenizer_map
from megafusion.settings import flatten

# Model settings that pick an implementation, not the parameters: a checkpoint resumes under
# another value (same tensors, same names).
IMPLEMENTATION_KEYS = {"model.attention", "model.seq_length", "model.moe.dispatcher", "model.moe.dispatch",
                       "model.moe.experts"}
# Outside ``model``, the settings that change the Transfusion model's tensors.
VISION_SHAPE_KEYS = {"vision.representation", "vision.image_size", "vision.patch_size"}

_HISTORY = re.compile(r"^config\.(\d+)\.yaml$")


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory; give a directory "
                          f"(a new one starts a run, an existing run directory is resumed)")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--run-dir {run_dir}: {parent} is a file, not a directory")


def shape_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: saved -> new`` for every model-shaping setting that differs (keys in both only:
    a key added to the code since the run started keeps its old behaviour by default)."""
    old_flat, new_flat = flatten(saved), flatten(new)
    keys = [k for k in new_flat if k.startswith("model.") and k not in IMPLEMENTATION_KEYS]
    if new_flat.get("model.kind") == "transfusion":
        keys += sorted(VISION_SHAPE_KEYS)
    return [f"{k}: {old_flat[k]!r} -> {new_flat[k]!r}" for k in keys
            if k in old_flat and old_flat[k] != new_flat.get(k)]


def check_compatible(cfg: Config, run_dir: Path, has_checkpoint: bool) -> None:
    """Refuses to resume a checkpointed run with a model of another shape. Writes nothing."""
    saved_path = run_dir / "config.yaml"
    if not has_checkpoint or not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {saved_path} to check the resume: {err}") from None
    differences = shape_differences(saved, cfg.to_dict())
    if differences:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of another model ({'; '.join(differences)}); resume it with its own "
            f"settings (see {saved_path}) or give a new --run-dir. Nothing was changed in {run_dir}.")


def write_config(cfg: Config, run_dir: Path) -> Path:
    """Writes this attempt's config as ``config.<n>.yaml`` and as ``config.yaml``; returns the former.

    A run directory from before the history existed has only ``config.yaml``: it becomes
    ``config.1.yaml`` first, so no attempt's settings are lost.
    """
    numbers = [int(m.group(1)) for p in run_dir.glob("config.*.yaml") if (m := _HISTORY.match(p.name))]
    latest = run_dir / "config.yaml"
    if not numbers and latest.is_file():
        os.replace(latest, run_dir / "config.1.yaml")
        numbers = [1]
    attempt = run_dir / f"config.{max(numbers, default=0) + 1}.yaml"
    save_config(cfg, attempt)
    tmp = run_dir / "config.yaml.tmp"
    save_config(cfg, tmp)
    os.replace(tmp, latest)
    write_tokenizer_map(cfg.data, run_dir)  # tokenizer_map.json: the tokenizer's special ids, sizes, hash
    return attempt


# --------------------------------------------------------------------------- the LR schedule

_KIND = {"cosine": "cosine", "WSD": "wsd", "constant": "constant"}


def wsd_decay_steps(fraction: float, decay_steps: int) -> int:
    return max(1, round(fraction * decay_steps))


def continue_schedule(cfg: Config, scheduler, step: int) -> str:
    """After ``scheduler.load_state_dict``: re-plans the decay when ``schedule.decay_steps`` is
    given and differs from the checkpoint's, writes the schedule in force back into ``cfg``
    (so ``config.yaml`` tells what runs) and returns the one line that says so."""
    s = cfg.schedule
    saved_decay = int(scheduler.lr_decay_steps)
    if s.decay_steps is not None and s.decay_steps != saved_decay:
        if s.decay_steps <= scheduler.lr_warmup_steps:
            raise ConfigError(f"schedule.decay_steps = {s.decay_steps} must be larger than the checkpoint's "
                              f"warmup of {scheduler.lr_warmup_steps} steps")
        scheduler.lr_decay_steps = scheduler.wd_incr_steps = s.decay_steps
        how = f"re-planned by schedule.decay_steps: decay over {s.decay_steps} steps instead of {saved_decay}"
    else:
        how = f"continues as saved (decay over {saved_decay} steps)"
    # WSD's anneal length is not in megatron's scheduler state: derive it from the horizon in force.
    if scheduler.lr_decay_style == "WSD":
        scheduler.wsd_decay_steps = wsd_decay_steps(s.wsd_decay_fraction, scheduler.lr_decay_steps)
    scheduler.step(increment=0)  # re-apply the LR for the restored position

    # What the checkpoint's schedule keeps of this config (megatron's use-checkpoint semantics).
    kind = _KIND.get(scheduler.lr_decay_style, scheduler.lr_decay_style)
    kept = {"schedule.kind": (s.kind, kind), "optimizer.lr": (cfg.optimizer.lr, scheduler.max_lr),
            "schedule.warmup_steps": (s.warmup_steps, scheduler.lr_warmup_steps)}
    if kind != "constant":
        kept["optimizer.min_lr"] = (cfg.optimizer.min_lr, scheduler.min_lr)
    ignored = [f"{key} {given:g} -> {saved:g}" if isinstance(given, (int, float)) else f"{key} {given} -> {saved}"
               for key, (given, saved) in kept.items() if given != saved]
    s.kind, cfg.optimizer.lr, s.warmup_steps = kind, scheduler.max_lr, scheduler.lr_warmup_steps
    if kind != "constant":
        cfg.optimizer.min_lr = scheduler.min_lr
    s.decay_steps = int(scheduler.lr_decay_steps)

    lr = scheduler.get_lr({})
    where = (f"now at min_lr {lr:.4g}" if kind != "constant" and scheduler.num_steps > scheduler.lr_decay_steps
             else f"now at lr {lr:.4g}, schedule step {scheduler.num_steps}")
    line = f"resuming at step {step} of {cfg.train.steps}: LR schedule ({kind}) {how}, {where}"
    if ignored:
        line += f"; kept from the checkpoint: {', '.join(ignored)}"
    if kind != "constant" and s.decay_steps < cfg.train.steps and "re-planned" not in how:
        line += (f"; train.steps = {cfg.train.steps} goes past the decay, which then stays at min_lr: "
                 f"set schedule.decay_steps to re-plan it")
    return line
