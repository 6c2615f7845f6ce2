"""The trainer's background loader: this rank's micro-batches of each step, built ahead.

The loader takes the recipe's batch function, ``micro_batches(step, dp_rank, dp_size)``
(``megafusion.recipes``: a provider's ``micro_batches``), a pure function of the step
(every packed sample is a pure function of ``(seed, index)``), so the loader is a
map-style ``torch.utils.data.Dataset`` over steps read by a ``DataLoader``: with
``num_workers > 0`` worker processes (forked on Linux, so they share the recipe's
memory maps and indexes) build whole steps ahead, ``prefetch`` steps per worker, and
hand them back in step order; ``pin_memory`` puts them in page-locked memory so the
host-to-device copy (``non_blocking=True``) overlaps compute. ``num_workers=0`` builds
each step in the training process when it is asked for.

The data position is the step: resuming at step ``k`` is ``StepLoader(micro_batches, k, ...)``;
nothing else is stored, and the batches are the same whatever ``num_workers`` is.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

MicroBatches = list[dict[str, torch.Tensor]]
# The recipe's batch function: (step, dp_rank, dp_size) -> this rank's micro-batches of the step.
BatchFunction = Callable[[int, int, int], MicroBatches]


def default_num_workers(device: torch.device | str) -> int:
    """2 worker processes on a GPU (data overlaps the step); 0 on a CPU, where workers would
    take cores from the step itself (see the README's data-loading figures)."""
    return 2 if torch.device(device).type == "cuda" else 0


class _Steps(Dataset):
    def __init__(self, micro_batches: BatchFunction, dp_rank: int, dp_size: int, end_step: int):
        self.micro_batches, self.dp_rank, self.dp_size, self.end_step = micro_batches, dp_rank, dp_size, end_step

    def __len__(self) -> int:
        return self.end_step

    def __getitem__(self, step: int) -> MicroBatches:
        return self.micro_batches(int(step), self.dp_rank, self.dp_size)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # DataLoader does this too; explicit because the step competes for cores


class StepLoader:
    """Iterates this rank's micro-batches for data steps ``start_step, ..., end_step - 1``.

    ``micro_batches``: the recipe's batch function, ``(step, dp_rank, dp_size) -> list[dict[str, Tensor]]``
    (e.g. ``provider.micro_batches``).
    Data step ``s`` (0-based) is what training step ``s + 1`` consumes.
    """

    def __init__(self, micro_batches: BatchFunction, start_step: int, end_step: int, dp_rank: int = 0,
                 dp_size: int = 1, *, num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        if not 0 <= start_step <= end_step:
            raise ValueError(f"StepLoader: start_step={start_step} must be in [0, end_step={end_step}]")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"data.num_workers = {num_workers} must be >= 0 and data.prefetch = {prefetch} >= 1")
        self.start_step, self.end_step, self.num_workers = start_step, end_step, num_workers
        workers = {}
        if num_workers > 0:
            methods = multiprocessing.get_all_start_methods()
            workers = dict(prefetch_factor=prefetch, worker_init_fn=_one_thread,
                           multiprocessing_context="fork" if "fork" in methods else None)
        self._loader = DataLoader(
            _Steps(micro_batches, dp_rank, dp_size, end_step),
            batch_size=None,  # each item is already a step's list of micro-batches
            sampler=range(start_step, end_step),
            num_workers=num_workers,
            pin_memory=pin_memory,
            # the workers' base seed comes from this generator, not the trainer's global RNG
            generator=torch.Generator().manual_seed(0),
            **workers,
        )
        self._iter: Iterator | None = None

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> "StepLoader":
        if self._iter is None:
            self._iter = iter(self._loader)
        return self

    def __next__(self) -> MicroBatches:
        if self._iter is None:
            self._iter = iter(self._loader)
        return next(self._iter)

    def close(self) -> None:
        """Stops the worker processes (also done when the loader is garbage-collected)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "StepLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def micro_batch_iterators(batches: MicroBatches, num_chunks: int) -> list[Iterator]:
    """One iterator per virtual pipeline chunk over the same micro-batches."""
    return [iter(batches) for _ in range(num_chunks)]
