"""Run-directory logging: ``metrics.jsonl``, TensorBoard scalars, a one-line progress log.

Only the global rank 0 writes; other ranks get a writer that does nothing. Every logged step
(``logging.every``) is a row of ``metrics.jsonl`` and TensorBoard scalars; the console gets a
progress line with an ETA every ``logging.console_every`` steps (the first and last logged
step, skipped steps and a stop always), through the ``megafusion.training.metrics`` logger
(``megafusion.logging_setup`` formats it: time and rank).

TensorBoard also gets images (:mod:`megafusion.training.samples`): the ``samples`` grid of
``logging.sample_every`` and, for MoE models, the ``moe/routing_heatmap`` of the routing
metrics every ``heatmap_every`` logged steps (and at the last step). With
``logging.wandb.project`` set, the same scalars (and images) go to Weights & Biases; wandb
is imported only then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h12m``: a duration as a progress line shows it."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keeps the rows of steps <= ``last_step`` (and drops a torn last line); returns rows dropped.

    A resume re-does the steps after its checkpoint, so their old rows would be duplicates.
    The file is rewritten atomically (a crash leaves the old one or the new one, never half).
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"] if line.strip() else None
        except (ValueError, KeyError, TypeError):
            step = None
        if step is not None and step <= last_step:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(row + "\n" for row in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """``start_step``: the step the run starts after (the resumed checkpoint's, 0 for a new
    run); rows and TensorBoard events of later steps, left by an earlier attempt, are dropped."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int,
                 start_step: int = 0, console_every: int | None = None, heatmap_every: int | None = None,
                 wandb: Any = None, run_config: dict[str, Any] | None = None) -> None:
        """``heatmap_every``: steps between MoE routing heatmaps (None: none); ``wandb``: a
        ``WandbConfig`` (None or no project: no W&B), ``run_config`` the config it records."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.console_every = console_every  # None: a console line for every logged step
        self.heatmap_every = heatmap_every
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._start = time.time()
        self._start_step = start_step
        self._first: tuple[float, int] | None = None  # (time, step) of the first logged step: the ETA's origin
        self._printed = False
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier attempt's events from this step on.
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if wandb is not None and wandb.project is not None:
            import wandb as wandb_module  # only when asked for: validate checked that it is installed

            self._wandb_module = wandb_module
            self._wandb = wandb_module.init(project=wandb.project, entity=wandb.entity, config=run_config,
                                            dir=str(run_dir), mode=wandb.mode)

    def log(self, step: int, metrics: dict[str, Any], force_console: bool = False) -> None:
        """A row of ``metrics.jsonl`` (and TensorBoard scalars) for ``step``; a console line when
        it is due (see :meth:`console_due`) or ``force_console`` (a stop, a skipped update)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            if self.heatmap_every and (step % self.heatmap_every == 0 or step >= self.total_steps):
                from megafusion.training.samples import HEATMAP_TAG, routing_heatmap

                heatmap = routing_heatmap(metrics, step)
                if heatmap is not None:
                    self.add_image(HEATMAP_TAG, heatmap, step)
        if self._wandb is not None:
            self._wandb.log({key: value for key, value in metrics.items()
                             if isinstance(value, (int, float)) and math.isfinite(value)}, step=step)
        if self._first is None:
            self._first = (time.time(), step)
        if force_console or self.console_due(step):
            self.progress(step, metrics)

    def console_due(self, step: int) -> bool:
        """The first logged step of this attempt, the last step, and every ``console_every``-th."""
        return (not self._printed or step >= self.total_steps or self.console_every is None
                or step % self.console_every == 0)

    def eta_seconds(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at the pace since the first logged step (its own time, with start-up and
        compilation, left out once there is a later step to measure from); None at the end."""
        now = time.time() if now is None else now
        if step >= self.total_steps:
            return None
        first_time, first_step = self._first or (self._start, self._start_step)
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
        else:
            per_step = (now - self._start) / max(step - self._start_step, 1)
        return per_step * (self.total_steps - step)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        self._printed = True
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps} ({100 * step / max(self.total_steps, 1):3.0f}%)"]
        for key in ("loss", "loss_text", "loss_image", "loss_video", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
            value = metrics.get(key)
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
        if "mfu" in metrics:  # None: a GPU whose peak is not documented here
            from megafusion.scaling.flops import format_mfu

            parts.append(f"mfu {format_mfu(metrics['mfu'])}")
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {metrics['skipped_steps']}")
        if isinstance(metrics.get("step_time_s"), float):
            parts.append(f"{metrics['step_time_s']:.3g} s/step")
        parts.append(f"elapsed {format_duration(time.time() - self._start)}")
        eta = self.eta_seconds(step)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        log.info(" | ".join(parts))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Extra scalars for TensorBoard only (e.g. per-expert routing statistics)."""
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        """An [H, W, 3] uint8 image for TensorBoard (and W&B when set), e.g. a sample grid."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb_module.Image(image)}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
