"""Shared fixtures for the optimizer tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def make_problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A non-trivial objective: a tanh MLP on a 3-class problem, with a weight, a bias and a matrix of each kind."""
    gen = torch.Generator().manual_seed(seed)  # drawn in float64 then cast: the same problem in every dtype
    x = torch.randn(128, 12, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (128,), generator=gen)
    params = [torch.randn(12, 24, generator=gen, dtype=torch.float64) * 0.4, torch.zeros(24, dtype=torch.float64),
              torch.randn(24, 3, generator=gen, dtype=torch.float64) * 0.4, torch.zeros(3, dtype=torch.float64)]
    params = [p.to(dtype).requires_grad_() for p in params]

    def loss_fn(ps):
        w1, b1, w2, b2 = ps
        return F.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y)

    return params, loss_fn


@pytest.fixture(autouse=True)
def single_thread():
    """These problems are tiny: one intra-op thread avoids thread synchronisation, which on a busy 2-core machine
    costs more than the arithmetic (the optimizer tests run 5× faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
