"""Run-directory logging: ``metrics.jsonl``, TensorBoard scalars, a one-line progress log.

Only the global rank 0 writes; other ranks get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._start = time.time()
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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
