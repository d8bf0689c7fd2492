"""Second derivatives (a gradient penalty) through every attention kind, and what torch.func can and cannot do.

From a review that compared each kind with the float64 references under gradgradcheck, vmap and functional_call.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from theorylab.attention import (
    EluFeatures,
    MultiheadAttention,
    PositiveRandomFeatures,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.attention import linear as linear_module
from theorylab.attention.exact import softmax_attention_reference

F64 = torch.float64


def _qkv(n=9, d=3, dv=3, heads=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple((0.5 * torch.randn(1, heads, n, w, dtype=F64, generator=gen)).requires_grad_() for w in (d, d, dv))


def _pad(n=9):
    pad = torch.zeros(1, n, dtype=torch.bool)
    pad[0, 7:] = True
    return pad


KINDS = {
    "separable": lambda q, k, v, **kw: separable_attention(q, k, v, chunk_size=3, **kw),
    "linear elu": lambda q, k, v, **kw: linear_attention(q, k, v, EluFeatures(3), chunk_size=3, **kw),
    "favor": lambda q, k, v, **kw: linear_attention(
        q, k, v, PositiveRandomFeatures(3, 4, seed=0).double(), chunk_size=3, **kw),
    "favor recompute": lambda q, k, v, **kw: linear_attention(
        q, k, v, PositiveRandomFeatures(3, 4, seed=0).double(), chunk_size=3, recompute=True, **kw),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("causal", [False, True])
def test_second_derivatives_of_the_kernelised_kinds(kind, causal, monkeypatch):
    monkeypatch.setattr(linear_module, "CAUSAL_BLOCK_ELEMENTS", 1)  # several blocks of chunks at n = 9
    fn = KINDS[kind]
    q, k, v = _qkv()
    assert torch.autograd.gradgradcheck(lambda q, k, v: fn(q, k, v, causal=causal, key_padding_mask=_pad()),
                                        (q, k, v), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_gradient_penalty_under_the_math_backend(causal):
    """torch's fused CPU kernel has no double backward when q and v share a head dim (as in every multi-head
    module); the README's cure is the math backend, which must then equal the reference."""
    def penalty(fn):
        q, k, v = _qkv(n=13, d=4, dv=4, heads=2)  # q and v share a head dim: torch's fused kernel would fail
        (gq,) = torch.autograd.grad(fn(q, k, v, causal=causal).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum(), (q, k, v))

    want = penalty(softmax_attention_reference)
    with sdpa_kernel(SDPBackend.MATH):
        got = penalty(softmax_attention)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_multihead_softmax_gradient_penalty_under_the_math_backend():
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, kind="softmax").double()
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
    assert torch.isfinite(m.q_proj.weight.grad).all() and m.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_vmap_over_the_kinds_without_range_checks():
    """softmax, elu linear and non-causal separable attention take vmap (over distinct inputs, so a batching rule
    that mixed or dropped elements would show); the README lists the kinds that do not."""
    triples = [tuple(t.detach() for t in _qkv(seed=s)) for s in range(3)]
    q, k, v = (torch.stack([t[i] for t in triples]) for i in range(3))  # (3, 1, 1, n, d): a vmapped dim first
    for fn in (softmax_attention, lambda q, k, v: linear_attention(q, k, v, EluFeatures(3), causal=True),
               separable_attention):
        batched = torch.func.vmap(fn)(q, k, v)
        looped = torch.stack([fn(*t) for t in triples])
        torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("causal", [False, True])
def test_functional_call_with_recompute_gives_the_plain_paths_gradients(causal, monkeypatch):
    """functional_call puts the module's own tensors back when it returns, before backward recomputes: the
    recomputation must still use the forward's (it had raised "the feature map changed")."""
    monkeypatch.setattr(linear_module, "CAUSAL_BLOCK_ELEMENTS", 1)  # several blocks: recomputation is active
    torch.manual_seed(0)
    m = MultiheadAttention(16, 2, kind="favor", causal=causal, seed=0, num_features=8, chunk_size=4,
                           recompute=True).double()
    own = m.feature_map.projection
    grads = {}
    for recompute in (True, False):
        m.recompute = recompute
        new = torch.randn(own.shape, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        x = torch.randn(1, 12, 16, dtype=F64, generator=torch.Generator().manual_seed(6), requires_grad=True)
        y = torch.func.functional_call(m, {"feature_map.projection": new}, (x,))
        y.pow(2).sum().backward()
        grads[recompute] = (x.grad, new.grad)
        assert m.feature_map.projection is own  # the module's own tensor is back
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_reassigned_buffer_between_forward_and_backward_keeps_the_forwards_features(monkeypatch):
    monkeypatch.setattr(linear_module, "CAUSAL_BLOCK_ELEMENTS", 1)
    fm = PositiveRandomFeatures(3, 4, seed=0).double()
    q, k, v = _qkv()
    want = torch.autograd.grad(linear_attention(q, k, v, fm, causal=True).sum(), (q, k, v))
    out = linear_attention(q, k, v, fm, causal=True, chunk_size=3, recompute=True)
    fm.projection = torch.randn_like(fm.projection)  # a new tensor, not an in-place change
    got = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
