"""Wall-clock time: the median of repeats after a warm-up, alone or interleaved with the calls it is compared to."""

from __future__ import annotations

import math
import numbers
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _check_count(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy's integers too), else a ValueError naming it (nan, 2.5 and True
    are not counts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_budget(budget_s: object) -> float | None:
    """``budget_s`` as a finite float >= 0, or None (no budget); else a ValueError naming it (a NaN budget had
    never ended the repeats, a negative one ended them after one)."""
    if budget_s is None:
        return None
    if isinstance(budget_s, bool) or not isinstance(budget_s, numbers.Real) or not 0 <= float(budget_s) < math.inf:
        raise ValueError(f"budget_s must be a finite number of seconds >= 0 or None, got {budget_s!r}")
    return float(budget_s)


def median_time(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; stops early (>= 1 timed run)
    once ``budget_s`` seconds of timed runs have passed."""
    repeats, warmup = _check_count("repeats", repeats, 1), _check_count("warmup", warmup, 0)
    budget_s = _check_budget(budget_s)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if budget_s is not None and spent >= budget_s:
            break
    return statistics.median(times)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 3, warmup: int = 1,
                      max_rounds: int | None = None, budget_s: float | None = None,
                      before: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Seconds of every call of each ``fns[name]()``, timed in rounds: each round calls every function once, in an
    order that rotates by one per round, so that load which comes and goes on a shared machine falls on every
    contender alike (timing one contender's repeats, then the next's, lets it fall on one of them).

    ``warmup`` untimed rounds come first. After ``rounds`` timed rounds, more run while the timed seconds so far
    are below ``budget_s`` (if given), up to ``max_rounds`` rounds in all (no cap when None). ``before()``, if
    given, runs untimed before every timed call (to flush caches, so that no call inherits what the previous
    contender left in them). Compare medians of the returned lists."""
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns must be a mapping of names to callables (a dict), got {type(fns).__name__}")
    rounds, warmup = _check_count("rounds", rounds, 1), _check_count("warmup", warmup, 0)
    if max_rounds is not None:
        max_rounds = _check_count("max_rounds", max_rounds, rounds)
    budget_s = _check_budget(budget_s)
    names = list(fns)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    spent, r = 0.0, 0
    # budget_s without max_rounds had been ignored (no round past ``rounds``)
    while r < rounds or (budget_s is not None and spent < budget_s and (max_rounds is None or r < max_rounds)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        r += 1
    return times


#: the text of the warning torch gives for each synchronising call under ``set_sync_debug_mode("warn")``
#: (c10/cuda/CUDAFunctions.cpp). Matched exactly: the first use of the mode in a process also warns, once, that it
#: "is a prototype feature and does not yet detect all synchronizing operations", which is not a read-back.
SYNC_WARNING = "called a synchronizing CUDA operation"


def cuda_read_backs(fn: Callable[[], Any]) -> int | None:
    """How many times ``fn()`` waits for the GPU: the synchronising CUDA calls it makes (reading a value back to
    the host, ``.item()``, ``bool(tensor)``, a copy to the CPU or from pageable host memory), which torch reports in
    ``torch.cuda.set_sync_debug_mode("warn")``. Each drains the queue of kernels, so launch-bound code slows with
    every one. An explicit ``torch.cuda.synchronize()`` is not among them: torch's source does not report it
    (``device_synchronize`` in c10/cuda/CUDAFunctions.cpp). Calls ``fn`` once; None without CUDA (there ``fn`` is
    not called). The caller's sync debug mode is restored afterwards; a count nested inside ``fn`` keeps its
    read-backs to itself (the outer count does not see them)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()  # a caller's "error" guard must survive the count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(SYNC_WARNING in str(w.message) for w in caught)
