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
    TrigRandomFeatures,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.attention import linear as linear_module
from theorylab.attention.exact import softmax_attention_reference
from theorylab.attention.linear import linear_attention_log_reference

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


FAVOR, TRIG = PositiveRandomFeatures(4, 8, seed=0).double(), TrigRandomFeatures(4, 8, seed=0).double()
VMAP_KINDS = {  # random feature maps drawn outside vmap (a draw inside it is vmap's randomness error)
    "softmax": softmax_attention,
    "separable": lambda q, k, v, **kw: separable_attention(q, k, v, chunk_size=4, **kw),
    "linear elu": lambda q, k, v, **kw: linear_attention(q, k, v, EluFeatures(4), chunk_size=4, **kw),
    "favor": lambda q, k, v, **kw: linear_attention(q, k, v, FAVOR, chunk_size=4, **kw),
    "trig": lambda q, k, v, **kw: linear_attention(q, k, v, TRIG, chunk_size=4, **kw),
}


def _examples(n=3, length=11, dtype=F64):
    """n distinct (q, k, v, key padding) examples of shape (H=2, N, 4) and (N,), stacked along a first dim; each
    pads a different number of keys (none in the first), so a batching rule that mixed examples would show."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, length, 4, dtype=dtype, generator=gen) for _ in range(3))
    pad = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        pad[i, length - i:] = True
    return q, k, v, pad


def _vmapped_and_looped(fn, q, k, v, pad, **kw):
    """fn over examples (H, N, D) with a batch of one added inside, by vmap and by a Python loop."""
    def one(q, k, v, pad):
        return fn(q[None], k[None], v[None], key_padding_mask=pad[None], **kw)[0]
    return torch.func.vmap(one)(q, k, v, pad), torch.stack([one(*ex) for ex in zip(q, k, v, pad, strict=True)])


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("kind", list(VMAP_KINDS))
@pytest.mark.parametrize("causal", [False, True])
def test_vmap_equals_a_loop_for_every_kind(kind, causal, monkeypatch):
    """torch.func.vmap over distinct padded examples equals a loop (several blocks of chunks); the range checks
    of FAVOR+, trigonometric features and causal separable attention read every example's values (they had
    raised "vmap: ... .item()")."""
    monkeypatch.setattr(linear_module, "CAUSAL_BLOCK_ELEMENTS", 1)
    batched, looped = _vmapped_and_looped(VMAP_KINDS[kind], *_examples(), causal=causal)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the chunked kernels write their outputs in place without autograd
        batched, _ = _vmapped_and_looped(VMAP_KINDS[kind], *_examples(), causal=causal)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["separable", "favor"])
def test_vmap_sends_a_chunk_down_the_per_query_path_when_any_example_rises_steeply(kind, monkeypatch):
    """One example's keys jump far above its earlier ones (separable: +500 after position 5; FAVOR+: long keys
    first, whose log-features lie hundreds below the later ones'). Under vmap the steep chunk is redone per query
    for every example: still exact for each, so vmap equals the loop, in which only that example takes the path."""
    calls = []
    if kind == "separable":
        import theorylab.attention.separable as module
        name = "_chunk_explicit"
    else:
        module, name = linear_module, "_chunk_per_query"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    q, k, v, pad = _examples()
    if kind == "separable":
        k[1, :, 6:] = k[1, :, 6:] + 500.0
    else:
        k[1, :, :6] = 50.0 * k[1, :, :6] / k[1, :, :6].norm(dim=-1, keepdim=True)
    batched, looped = _vmapped_and_looped(VMAP_KINDS[kind], q, k, v, pad, causal=True)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    assert calls  # the per-query path ran (in the loop for example 1 alone, under vmap for all three)
    if kind == "favor":  # the log-domain reference: exact at any scale
        want = linear_attention_log_reference(q[1:2], k[1:2], v[1:2], FAVOR, causal=True,
                                              key_padding_mask=pad[1:2])
        torch.testing.assert_close(batched[1:2], want, rtol=1e-10, atol=1e-12)


def test_vmap_switches_float32_favor_to_float64_when_any_example_needs_it():
    """Float32 FAVOR+ works in float64 where the features' log-scale is too large for float32's rounding; under
    vmap one example with |x| = 300 decides for all, so it keeps its float64 accuracy (5e-8 off the float64
    reference; 1.8e-4 in float32)."""
    q, k, v, pad = _examples(dtype=torch.float32)
    q[1], k[1] = 300.0 * q[1] / q[1].norm(dim=-1, keepdim=True), 300.0 * k[1] / k[1].norm(dim=-1, keepdim=True)
    favor32 = PositiveRandomFeatures(4, 8, seed=0)  # float32 features: float32 work unless the check says not
    batched, looped = _vmapped_and_looped(lambda *a, **kw: linear_attention(*a, favor32, **kw), q, k, v, pad)
    want = linear_attention_log_reference(q[1:2].double(), k[1:2].double(), v[1:2].double(),
                                          favor32.double(), key_padding_mask=pad[1:2])
    assert batched.dtype == torch.float32
    assert (batched[1:2].double() - want).abs().max() < 1e-6
    torch.testing.assert_close(batched, looped)  # the others, float64 under vmap and float32 in the loop: close


def test_vmap_still_refuses_inputs_whose_log_scale_overflows_float64():
    q, k, v, pad = _examples()
    k[2] = 1e160
    with pytest.raises(ValueError, match="overflows even float64"):
        _vmapped_and_looped(VMAP_KINDS["favor"], q, k, v, pad)


@pytest.mark.parametrize("kind", ["separable", "favor", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_per_example_gradients_by_vmap_of_grad_equal_a_loop(kind, causal):
    """The per-example gradients of a MultiheadAttention's weights (the DP-SGD pattern: vmap(grad(...)) over
    functional_call) equal one torch.func.grad per example."""
    torch.manual_seed(0)
    m = MultiheadAttention(8, 2, kind=kind, causal=causal, seed=0, num_features=8, chunk_size=4).double()
    params = {name: p.detach() for name, p in m.named_parameters()}
    xs = torch.randn(3, 10, 8, dtype=F64, generator=torch.Generator().manual_seed(1))

    def loss(params, x):
        return torch.func.functional_call(m, params, (x[None],)).pow(2).sum()

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        for name, g in torch.func.grad(loss)(params, x).items():
            torch.testing.assert_close(per_example[name][i], g, rtol=1e-10, atol=1e-12)


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
