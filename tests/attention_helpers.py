"""Shared helpers of the attention tests: seeded inputs, and outputs + gradients of a fast path vs its reference."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import pytest
import torch

# torch.compile's CPU backend (inductor) builds C++ with $CXX, else g++ (clang++ on macOS): slim images lack one
_CXX = (shlex.split(os.environ.get("CXX", "")) or ["clang++" if sys.platform == "darwin" else "g++"])[0]  # "ccache g++"
needs_cxx_compiler = pytest.mark.skipif(shutil.which(_CXX) is None,
                                        reason=f"torch.compile's CPU backend needs a C++ compiler ({_CXX})")


def qkv(B=2, H=3, Nq=19, Nk=None, D=8, Dv=None, *, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(B, Nk, *, seed=0):
    """Right padding in batch 0, left padding in batch 1, scattered padding beyond."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Nk, generator=g) < 0.3
    mask[0] = False
    mask[0, Nk - Nk // 3:] = True
    if B > 1:
        mask[1] = False
        mask[1, : Nk // 4] = True
    return mask


def assert_same_outputs_and_grads(fast, reference, inputs, *, atol=1e-10, rtol=1e-8):
    """fast(*inputs) == reference(*inputs), and so are the gradients of a random projection of the output."""
    a = [x.detach().clone().requires_grad_(True) for x in inputs]
    b = [x.detach().clone().requires_grad_(True) for x in inputs]
    out_fast, out_ref = fast(*a), reference(*b)
    torch.testing.assert_close(out_fast, out_ref, atol=atol, rtol=rtol)
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=out_ref.dtype)
    (out_fast * w).sum().backward()
    (out_ref * w).sum().backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=rtol)
