"""A NaN or inf value in causal linear or separable attention reaches exactly the positions that see it.

A plain ``p @ v`` with causally masked weights p takes 0 · v_j for the positions before j, which is NaN for a
non-finite v_j: such a value reached the earlier positions of its chunk (64 on CPU), in one call but not when
fed one position at a time. ``causal_product`` forms those products over the visible terms only.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theorylab.attention import (
    EluFeatures,
    PositiveRandomFeatures,
    ReluFeatures,
    TrigRandomFeatures,
    linear_attention,
    separable_attention,
)
from theorylab.attention import linear as linear_module
from theorylab.attention import separable as separable_module
from theorylab.attention._checks import causal_product
from theorylab.attention.linear import linear_attention_log_reference, linear_attention_reference
from theorylab.attention.separable import separable_attention_reference

F64 = torch.float64
D = 4
KINDS = ["elu", "relu", "favor", "trig", "separable"]


def _brute(p: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Σ over the visible j of p_ij v_j, as an explicit (I, J, E) tensor of terms."""
    terms = p[..., :, :, None] * v[..., None, :, :]
    return torch.where(hidden[..., None], 0.0, terms).sum(-2)


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12, *, which_nonfinite: bool = True) -> None:
    """Equal up to tol, non-finite in the same places (and there, with ``which_nonfinite``, NaN where NaN and the
    same infinities)."""
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    if which_nonfinite:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[a.isinf()], b[b.isinf()])
    torch.testing.assert_close(a[finite], b[finite], atol=tol, rtol=tol)


@settings(max_examples=200, deadline=None)
@given(I=st.integers(1, 6), J=st.integers(1, 6), E=st.integers(1, 4), seed=st.integers(0, 2**16),
       causal=st.booleans())
def test_causal_product_sums_only_the_visible_terms(I, J, E, seed, causal):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(2, I, J, generator=g, dtype=F64)
    p[torch.rand(p.shape, generator=g) < 0.2] = 0.0  # visible zero weights: 0 · inf is NaN there
    hidden = (torch.ones(I, J, dtype=torch.bool).triu(1) if causal
              else torch.rand(I, J, generator=g) < 0.4)
    p = p.masked_fill(hidden, 0.0)
    v = torch.randn(2, J, E, generator=g, dtype=F64)
    r = torch.rand(v.shape, generator=g)
    v[r < 0.1], v[(r >= 0.1) & (r < 0.2)], v[(r >= 0.2) & (r < 0.3)] = math.nan, math.inf, -math.inf
    _same(causal_product(p, v, hidden), _brute(p, v, hidden))


def test_causal_product_is_the_matmul_for_finite_values_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.ones(5, 5, dtype=torch.bool).triu(1)
    p = torch.rand(3, 5, 5, generator=g, dtype=F64).masked_fill(hidden, 0.0).requires_grad_()
    v = torch.randn(3, 5, 2, generator=g, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda p, v: causal_product(p, v, hidden), (p, v))
    torch.testing.assert_close(causal_product(p, v, hidden), p @ v, atol=1e-15, rtol=1e-15)


MAPS = {"elu": EluFeatures(D), "relu": ReluFeatures(D), "favor": PositiveRandomFeatures(D, 16, seed=0).double(),
        "trig": TrigRandomFeatures(D, 16, seed=0).double()}  # one object each: a state belongs to its map


def _attend(kind: str, q, k, v, **kwargs):
    if kind == "separable":
        return separable_attention(q, k, v, causal=True, **kwargs)
    return linear_attention(q, k, v, MAPS[kind], causal=True, **kwargs)


def _reference(kind: str, q, k, v):
    if kind == "separable":
        return separable_attention_reference(q, k, v, causal=True)
    if kind == "favor":  # the log-domain reference: exact for keys of any scale
        return linear_attention_log_reference(q, k, v, MAPS[kind], causal=True)
    return linear_attention_reference(q, k, v, MAPS[kind], causal=True)


def _qkv(N: int, seed: int, scale: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(2, 2, N, D, generator=g, dtype=F64) for _ in range(3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_a_non_finite_value_reaches_only_the_positions_that_see_it(kind, bad, chunk_size):
    N, j = 40, 21  # j inside a chunk, after its first position: chunks of 8, of 40 (the default, cut to N)
    q, k, v = _qkv(N, seed=1)
    clean = _attend(kind, q, k, v, chunk_size=chunk_size)
    v[0, 1, j, 2] = bad
    out = _attend(kind, q, k, v, chunk_size=chunk_size)
    torch.testing.assert_close(out[0, 1, :j], clean[0, 1, :j], atol=1e-12, rtol=1e-12)  # had been NaN
    # from the value on its column is not finite, but where a query gives every key weight 0 (ReLU features):
    # such a query's output is 0, as when it sees no key
    weighted = clean[0, 1, j:].abs().sum(-1) > 0
    assert not torch.isfinite(out[0, 1, j:, 2][weighted]).any() and not out[0, 1, j:][~weighted].any()
    others = [0, 1, 3]
    torch.testing.assert_close(out[0, 1, j:, others], clean[0, 1, j:, others], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[1], clean[1], atol=1e-12, rtol=1e-12)  # the other sequence
    torch.testing.assert_close(out[0, 0], clean[0, 0], atol=1e-12, rtol=1e-12)  # the other head
    # the references agree on which entries are finite. Not always on NaN against inf: the kernels sum the
    # features' products with an inf value, Σ_r φ_r(q_i) (φ_r(k_j) · inf), where a zero or negative feature (ReLU,
    # trigonometric) gives NaN; the references form the weight first, (Σ_r φ_r(q_i) φ_r(k_j)) · inf
    positive = kind in ("elu", "favor", "separable")  # weights > 0 wherever representable
    _same(out, _reference(kind, q, k, v), tol=1e-10, which_nonfinite=positive)
    # one position at a time through the recurrent state: the same outputs
    pieces, state = [], None
    for t in range(N):
        piece, state = _attend(kind, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state=state,
                               return_state=True)
        pieces.append(piece)
    _same(torch.cat(pieces, dim=2), out, tol=1e-10, which_nonfinite=positive)  # the state sums feature by feature


@pytest.mark.parametrize("kind", ["favor", "separable"])
def test_a_non_finite_value_in_a_chunk_redone_per_query(kind, monkeypatch):
    """Keys that rise steeply inside a chunk send it down the per-query path, which has its own products."""
    module, name = (separable_module, "_chunk_explicit") if kind == "separable" else (linear_module, "_chunk_per_query")
    original, calls = getattr(module, name), []
    N, j = 16, 11
    q, k, v = _qkv(N, seed=2)
    if kind == "favor":  # keys of norm 110 have features ~e^-3000 (the e^{-|k|²/(2√D)} factor): the rise is at 8
        k[:, :, :8] = k[:, :, :8] / k[:, :, :8].norm(dim=-1, keepdim=True) * 110.0
    else:
        k[:, :, 8:] += 400.0  # beyond float64's limit for one reference (0.45 · 708)
    clean = _attend(kind, q, k, v, chunk_size=16)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or original(*a))
    v[0, 0, j, 1] = math.nan
    out = _attend(kind, q, k, v, chunk_size=16)
    torch.testing.assert_close(out[0, 0, :j], clean[0, 0, :j], atol=1e-12, rtol=1e-12)
    assert out[0, 0, j:, 1].isnan().all()
    assert calls  # the chunk was redone per query
    _same(out, _reference(kind, q, k, v), tol=1e-9)


def test_a_nan_value_beside_padding_reaches_only_the_positions_that_see_it():
    q, k, v = _qkv(24, seed=4)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[0, 3] = pad[1, 10:] = True
    clean = linear_attention(q, k, v, EluFeatures(D), causal=True, key_padding_mask=pad)
    v[0, :, 12, 0] = math.nan
    v[0, :, 3] = math.inf  # padded: seen by no one
    out = linear_attention(q, k, v, EluFeatures(D), causal=True, key_padding_mask=pad)
    torch.testing.assert_close(out[0, :, :12], clean[0, :, :12], atol=1e-12, rtol=1e-12)
    assert out[0, :, 12:, 0].isnan().all() and torch.isfinite(out[0, :, :, 1:]).all()
    torch.testing.assert_close(out[1], clean[1], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------- found by the review of the fixes
@pytest.mark.parametrize("kind", ["trig", "favor"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_key_in_a_chunk_redone_per_query_reaches_only_the_positions_that_see_it(kind, bad):
    """The per-query path multiplied a NaN key's features by its 0 decay for the rows before it (NaN · 0): with
    trigonometric features every earlier position of the chunk was NaN."""
    q, k, v = _qkv(16, seed=6)
    k[:, :, 8:] *= 60.0  # a steep rise at 8: the chunk is redone per query
    clean = _attend(kind, q, k, v, chunk_size=16)
    k[0, 0, 11, 0] = bad
    out = _attend(kind, q, k, v, chunk_size=16)
    torch.testing.assert_close(out[0, 0, :11], clean[0, 0, :11], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[1], clean[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["elu", "relu", "separable"])
def test_heads_of_width_zero_give_zeros_on_every_path(kind):
    """D = 0: linear attention raised IndexError (amax over no features); separable attention's stateful path made
    every position NaN for one NaN value (an (N, N) matrix of zeros times v), its chunked path only some."""
    q = torch.zeros(1, 2, 10, 0, dtype=F64)
    v = torch.randn(1, 2, 10, 3, dtype=F64)
    v[0, 0, 5, 1] = math.nan
    fm = {"elu": EluFeatures(), "relu": ReluFeatures()}.get(kind)  # maps for heads of width 0

    def attend(**kwargs):
        if fm is None:
            return separable_attention(q, q, v, causal=True, **kwargs)
        return linear_attention(q, q, v, fm, causal=True, **kwargs)

    for kwargs in ({}, {"chunk_size": 4}, {"return_state": True}):
        out = attend(**kwargs)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.equal(out, torch.zeros(1, 2, 10, 3, dtype=F64)), kwargs
    reference = (separable_attention_reference(q, q, v, causal=True) if fm is None
                 else linear_attention_reference(q, q, v, fm, causal=True))
    assert torch.equal(reference, torch.zeros(1, 2, 10, 3, dtype=F64))
