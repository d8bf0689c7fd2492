"""Twenty-first session: the NaN check's fast path and its exact re-check."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theorylab.optim.base import _all_finite, _finiteness_sum

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@st.composite
def gradient_lists(draw):
    """A few tensors of mixed dtypes and magnitudes up to each dtype's max, some with a NaN or inf planted."""
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        n = draw(st.integers(1, 300))
        top = torch.finfo(torch.float32 if dtype.is_complex else dtype).max
        scale = draw(st.sampled_from([1e-3, 1.0, top / 4, top]))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        t = ((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(dtype)
        for _ in range(draw(st.integers(0, 2))):
            t[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors.append(t)
    return tensors


@settings(max_examples=200, deadline=None)
@given(gradient_lists())
def test_the_finite_check_agrees_with_isfinite_on_every_mix(tensors):
    """Sums that overflow (entries near the dtype's max) are false alarms that the exact re-check clears; a planted
    NaN or inf is always found, whichever tensor of the list holds it."""
    assert _all_finite(tensors) == all(bool(torch.isfinite(t).all()) for t in tensors)


def test_bfloat16_is_summed_in_its_own_dtype_and_float16_in_float32():
    """bfloat16 has float32's range, so its own sum (accumulated in float32 by torch) raises no more false alarms
    and skips a slow converting path; float16's range ends at 65504, where ordinary sums would overflow."""
    assert _finiteness_sum(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert _finiteness_sum(torch.full((100,), 60000.0, dtype=torch.float16)).item() == 6e6  # no overflow
    big = torch.full((4,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert not torch.isfinite(_finiteness_sum(big)) and _all_finite([big])  # overflow: re-checked, still finite


def test_only_the_tensors_whose_sum_is_not_finite_are_re_read(monkeypatch):
    """The exact re-check costs a full read per tensor (isfinite is ~15× a sum): a false alarm in one tensor must
    not re-read the others."""
    seen = []
    real = torch.isfinite

    def counting(t):
        seen.append(t.numel())
        return real(t)

    monkeypatch.setattr(torch, "isfinite", counting)
    big = torch.full((7,), torch.finfo(torch.float32).max)
    assert _all_finite([torch.ones(5), big, torch.ones(11)])
    assert seen == [3, 7]  # the stacked sums, then the overflowing tensor alone
