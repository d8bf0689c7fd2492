"""Test-wide settings.

Under pytest-xdist every worker shares the machine's cores with the others: one intra-op thread per worker (and
per subprocess it starts, through OMP_NUM_THREADS) keeps torch's idle threads from spin-waiting for a core, which
on a 2-core machine made some kernels 5-100x slower.

Hypothesis: in CI (``CI`` set) the examples are derandomised, so a run of the same commit draws the same cases and
a red CI is a reproducible one; locally every run explores new cases (a failure found there is replayed from
``.hypothesis/`` and becomes a fixed test).
"""

import os
import sys

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402 - after the thread settings, which the OpenMP runtime reads when torch loads it

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _subnormals_kept():
    """Each test starts with subnormal floats on. On torch 2.4 a CPU kernel from torch.compile (built with
    -ffast-math) turns on flush-to-zero for the whole process at every call: the tests after it in the same worker
    ran in another floating-point mode (and hypothesis refuses to draw floats in it)."""
    yield
    if sys.float_info.min / 2 == 0.0:
        torch.set_flush_denormal(False)
