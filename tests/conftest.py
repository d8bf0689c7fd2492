"""Test-wide settings.

Under pytest-xdist every worker shares the machine's cores with the others: one intra-op thread per worker (and
per subprocess it starts, through OMP_NUM_THREADS) keeps torch's idle threads from spin-waiting for a core, which
on a 2-core machine made some kernels 5-100x slower.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
