"""Wall-clock time of a call: the median of repeats after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; stops early (>= 1 timed run)
    once ``budget_s`` seconds of timed runs have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if budget_s is not None and spent >= budget_s:
            break
    return statistics.median(times)
