"""Hostile input over the public API: every case gives a finite result or a ValueError naming the problem —
never a NaN, never an unrelated exception. The table of what was tried (docs/hostile-input.md, sampled in the
README) comes from this file."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theorylab.attention import (
    EluFeatures,
    MultiheadAttention,
    PositiveRandomFeatures,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.optim import SGD, Adam, RunningAverageSGD, SGDMomentum
from theorylab.rnn import RNN, log_jacobian_norms, lyapunov_spectrum

ATTENTIONS = {
    "softmax": lambda q, k, v, **kw: softmax_attention(q, k, v, **kw),
    "separable": lambda q, k, v, **kw: separable_attention(q, k, v, **kw),
    "favor": lambda q, k, v, **kw: linear_attention(q, k, v, PositiveRandomFeatures(q.shape[-1], 16, seed=0), **kw),
    "elu": lambda q, k, v, **kw: linear_attention(q, k, v, EluFeatures(), **kw),
}


def qkv(b, h, n, d, *, scale=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3)]


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(ATTENTIONS)), b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 9),
       d=st.integers(1, 6), causal=st.booleans(), log_scale=st.floats(-3, 4),
       pad_all_but=st.one_of(st.none(), st.integers(0, 8)))
def test_attention_outputs_are_finite(kind, b, h, n, d, causal, log_scale, pad_all_but):
    """Any size from length 1, norms from 1e-3 to 1e4, and masks that pad everything but one key."""
    q, k, v = qkv(b, h, n, d, scale=10**log_scale)
    mask = None
    if pad_all_but is not None:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[:, min(pad_all_but, n - 1)] = False
    out = ATTENTIONS[kind](q, k, v, causal=causal, key_padding_mask=mask)
    assert out.shape == (b, h, n, d)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_attention_one_visible_key_returns_its_value(kind):
    """With every key but one padded, every query must return that key's value (non-causal)."""
    q, k, v = qkv(1, 2, 5, 4, seed=1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, 3] = False
    out = ATTENTIONS[kind](q, k, v, key_padding_mask=mask)
    assert torch.allclose(out, v[:, :, 3:4].expand_as(out), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_precision_is_finite(kind, dtype):
    q, k, v = qkv(1, 2, 33, 8, scale=3.0, dtype=dtype)
    out = ATTENTIONS[kind](q, k, v, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
@pytest.mark.parametrize("shapes, match", [
    (((1, 2, 4, 8), (1, 2, 4, 7), (1, 2, 4, 8)), "head dim"),
    (((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 4, 8)), "lengths"),
    (((2, 4, 8), (2, 4, 8), (2, 4, 8)), "4-D"),
])
def test_attention_bad_shapes_name_the_shapes(kind, shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ATTENTIONS[kind](q, k, v)


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_attention_bad_mask_is_named(kind):
    q, k, v = qkv(2, 1, 4, 3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ATTENTIONS[kind](q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ATTENTIONS[kind](q, k, v, key_padding_mask=torch.zeros(2, 4))


@pytest.mark.parametrize("bad", [0, -3])
def test_feature_count_must_be_positive(bad):
    with pytest.raises(ValueError, match=str(bad)):
        PositiveRandomFeatures(8, bad)


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear", "favor"])
def test_multihead_length_one_and_bad_kind(kind):
    mha = MultiheadAttention(8, 2, kind=kind, causal=True, num_features=8)
    out = mha(torch.randn(3, 1, 8))
    assert out.shape == (3, 1, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="nonsense"):
        MultiheadAttention(8, 2, kind="nonsense")


@settings(max_examples=40, deadline=None)
@given(act=st.sampled_from(["tanh", "sigmoid", "relu", "gelu", "silu"]), form=st.sampled_from(["h", "g"]),
       t=st.integers(1, 30), hidden=st.integers(1, 6), log_scale=st.floats(-2, 1.5))
def test_rnn_diagnostics_never_nan(act, form, t, hidden, log_scale):
    torch.manual_seed(0)
    rnn = RNN(2, hidden, activation=act, form=form).double()
    with torch.no_grad():
        rnn.W.mul_(10**log_scale)
    x = torch.randn(2, t, 2, dtype=torch.float64)
    logn = log_jacobian_norms(rnn, x, None)
    assert logn.shape == (2, t) and not torch.isnan(logn).any()
    lyap = lyapunov_spectrum(rnn, x, None, 1)
    assert not torch.isnan(lyap).any()


@pytest.mark.parametrize("make, match", [
    (lambda: RNN(3, 0), "hidden_size"),
    (lambda: RNN(3, 4, activation="softsign"), "softsign"),
    (lambda: RNN(3, 4, form="z"), "z"),
])
def test_rnn_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rnn_bad_inputs_are_named():
    rnn = RNN(3, 4)
    with pytest.raises(ValueError, match="5"):
        rnn(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="h0"):
        rnn(torch.randn(2, 7, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="k"):
        lyapunov_spectrum(rnn, torch.randn(1, 5, 3, dtype=torch.float64), None, 9)


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=-1.0), lambda p: Adam(p, lr=-1e-3), lambda p: Adam(p, betas=(0.9, 1.0)),
    lambda p: Adam(p, eps=0.0), lambda p: Adam(p, weight_decay=-0.1), lambda p: Adam(p, decay="sideways"),
    lambda p: SGDMomentum(p, lr=0.1, momentum=-1.0), lambda p: RunningAverageSGD(p, lr=0.1, beta=1.0),
])
def test_optimizer_bad_hyperparameters(make):
    with pytest.raises(ValueError, match="Invalid"):
        make([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=1e-2), lambda p: SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: RunningAverageSGD(p, lr=0.1, beta=0.9, debias=True)])
def test_nan_gradient_is_not_absorbed(make):
    p = torch.ones(3, requires_grad=True)
    opt = make([p])
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))  # nothing was touched
