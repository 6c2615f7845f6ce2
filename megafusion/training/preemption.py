"""Stop cleanly when asked to: SIGTERM, SIGINT or SIGUSR1 save a checkpoint, then exit.

SLURM sends SIGTERM at preemption and at the time limit (and, with ``--signal=USR1@90``,
SIGUSR1 some seconds before it); torchrun forwards SIGTERM/SIGINT to its workers and kills
them 30 s later. A handler that raised inside the step would leave ranks at different
points of a collective, so the handler only records the signal; the training loop asks
:meth:`PreemptionWatcher.requested` once per step, at the same step on every rank, and
all ranks agree through one ``all_reduce`` (any rank that saw a signal stops them all).

    watcher = PreemptionWatcher()
    try:
        for step in ...:
            ...one step...
            if watcher.requested(device):
                save(step); raise Preempted(watcher.signal_name, step)
    finally:
        watcher.close()
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

# 128 + SIGTERM: what a process killed by SIGTERM reports, so schedulers and scripts treat
# the run as stopped from outside, but returned only after the checkpoint is on disk.
PREEMPTED_EXIT_CODE = 143

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped because of ``signal_name``: after ``step`` with its checkpoint saved, or,
    with ``saved=False``, before its first step (the checkpoint it resumed from is the latest)."""

    def __init__(self, signal_name: str, step: int, saved: bool = True) -> None:
        if saved:
            message = f"stopped by {signal_name} after step {step}; checkpoint saved; re-run to resume"
        else:
            message = (f"stopped by {signal_name} before the first step (at step {step}); nothing new to save; "
                       "re-run to resume")
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step
        self.saved = saved


class PreemptionWatcher:
    """Records SIGTERM / SIGINT / SIGUSR1 while installed; restores the old handlers on close.

    A second SIGINT (Ctrl-C twice) falls back to the default handler, so a user can still
    interrupt a run that is stuck before the end of its step.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only: nothing to watch from here
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signal_name = signal.Signals(signum).name

    @property
    def seen(self) -> bool:
        """Whether this process received a stop signal (local; no collective)."""
        return self.signal_name is not None

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal. A collective: every rank calls it at the same step."""
        flag = torch.tensor([1 if self.seen else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
