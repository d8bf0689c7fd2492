"""Run loops of tiny tensor ops on one thread.

A recurrence over T steps issues T small kernels (a (B, H) @ (H, H) product, an activation). Below ~10⁵ flops a
kernel gains nothing from threads, and on a busy machine waking an intra-op thread pool costs far more than the
kernel itself (MKL's addmm on a (4, 32) × (32, 32) product: 10 µs on one thread, ~9 ms on two when the cores are
shared). The loops here therefore drop to one thread while they run and restore the setting after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

SMALL_WORK = 2**17  # flops per kernel below which one thread is used


@contextmanager
def threads_for(work_per_kernel: float) -> Iterator[None]:
    """One intra-op thread inside the block when each kernel does fewer than SMALL_WORK flops."""
    before = torch.get_num_threads()
    if work_per_kernel >= SMALL_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=1)
def _blas_libraries() -> tuple:
    """numpy's BLAS/LAPACK thread controllers (threadpoolctl), found once."""
    import numpy  # noqa: F401 - loads OpenBLAS before the look-up
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def numpy_blas_threads(limit: int | None) -> Iterator[None]:
    """numpy's BLAS/LAPACK on at most ``limit`` threads inside the block (None: unchanged).

    For loops of small eigh/QR calls, which a shared machine otherwise slows by orders of magnitude (eigh of a
    12×12 matrix: 60 µs on one thread, 40 ms on two with the cores busy). Switching costs a few µs.
    """
    libs = _blas_libraries() if limit is not None else ()
    before = [lib.get_num_threads() for lib in libs]
    for lib, n in zip(libs, before, strict=True):
        lib.set_num_threads(min(limit, n))  # never above a limit the caller set (threadpool_limits)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            lib.set_num_threads(n)
