"""Test-wide settings.

Under pytest-xdist every worker shares the machine's cores with the others: one intra-op thread per worker (and
per subprocess it starts, through OMP_NUM_THREADS) keeps torch's idle threads from spin-waiting for a core, which
on a 2-core machine made some kernels 5-100x slower.

Hypothesis: in CI (``CI`` set) the examples are derandomised, so a run of the same commit draws the same cases and
a red CI is a reproducible one; locally every run explores new cases (a failure found there is replayed from
``.hypothesis/`` and becomes a fixed test).
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
