"""Wall-clock timing shared by the benchmarks' standalone modes (no pytest-benchmark)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_step(step: Callable[[], object], warmup: int, rounds: int) -> tuple[float, list[float]]:
    """Runs ``step`` ``warmup`` times untimed, then ``rounds`` times timed.

    Returns (median seconds, every round's seconds). ``step`` must synchronise the device
    itself if it launches asynchronous work.
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
