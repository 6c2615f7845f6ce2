"""Run-directory logging: ``metrics.jsonl``, TensorBoard scalars, a one-line progress log.

Only the global rank 0 writes; other ranks get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


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
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._start = time.time()
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier attempt's events from this step on.
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        self.progress(step, metrics)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        parts = [f"step {step:>6}/{self.total_steps}"]
        for key in ("loss", "loss_text", "loss_image", "loss_video", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu"):
            value = metrics.get(key)
            if isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
        if "mfu" in metrics:  # None: a GPU whose peak is not documented here
            from megafusion.scaling.flops import format_mfu

            parts.append(f"mfu {format_mfu(metrics['mfu'])}")
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {metrics['skipped_steps']}")
        parts.append(f"elapsed {time.time() - self._start:.0f}s")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Extra scalars for TensorBoard only (e.g. per-expert routing statistics)."""
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
