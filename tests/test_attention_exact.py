import pytest
import torch
from attention_helpers import assert_same_outputs_and_grads, padding_mask, qkv

from theorylab.attention import softmax_attention
from theorylab.attention.exact import (
    batched_heads_attention,
    sequential_heads_attention,
    softmax_attention_reference,
)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("Nk", [19, 11, 27])  # self, cross shorter, cross longer (causal: top-left aligned)
def test_sdpa_path_equals_reference(causal, masked, Nk):
    q, k, v = qkv(Nq=19, Nk=Nk, Dv=5)
    mask = padding_mask(2, Nk) if masked else None

    def fast(q, k, v):
        return softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)

    def ref(q, k, v):
        return softmax_attention_reference(q, k, v, causal=causal, key_padding_mask=mask)

    assert_same_outputs_and_grads(fast, ref, (q, k, v))


def test_scale_argument():
    q, k, v = qkv()
    out = softmax_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, softmax_attention_reference(q, k, v, scale=0.3))
    torch.testing.assert_close(out, softmax_attention_reference(q * 0.3 * 8**0.5, k, v))


def test_query_with_no_visible_key_gives_zeros_and_finite_grads():
    q, k, v = qkv(B=1, Nq=6)
    mask = torch.tensor([[True, True, False, False, True, False]])
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = softmax_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.all(out[:, :, :2] == 0)  # queries 0 and 1 see only padding
    torch.testing.assert_close(out, softmax_attention_reference(q, k, v, causal=True, key_padding_mask=mask))
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_padded_values_are_ignored():
    q, k, v = qkv(B=1, Nq=10)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 7:] = True
    k2, v2 = k.clone(), v.clone()
    k2[..., 7:, :] = 1e4
    v2[..., 7:, :] = -1e4
    out = softmax_attention(q, k2, v2, key_padding_mask=mask)
    torch.testing.assert_close(out, softmax_attention(q, k[..., :7, :], v[..., :7, :]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(dtype):
    q, k, v = qkv(dtype=torch.float32, Nq=64)
    out = softmax_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), softmax_attention(q, k, v, causal=True), atol=tol, rtol=tol)


def test_bad_shapes_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dims differ"):
        softmax_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\)"):
        softmax_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        softmax_attention(q, k, v, key_padding_mask=torch.zeros(2, 19))
    with pytest.raises(ValueError, match="4-D"):
        softmax_attention(q[0], k[0], v[0])


def test_sequential_heads_equal_batched_heads():
    g = torch.Generator().manual_seed(0)
    n, dm, h, d = 33, 12, 3, 4
    x = torch.randn(n, dm, generator=g, dtype=torch.float64)
    w_q, w_k, w_v = (torch.randn(h, dm, d, generator=g, dtype=torch.float64) for _ in range(3))
    w_o = torch.randn(h * d, dm, generator=g, dtype=torch.float64)
    seq = sequential_heads_attention(x, w_q, w_k, w_v, w_o)
    torch.testing.assert_close(seq, batched_heads_attention(x, w_q, w_k, w_v, w_o))
    # and both equal SDPA on the projected heads
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # (h, n, d)
    heads = softmax_attention(q[None], k[None], v[None])[0]  # (h, n, d)
    torch.testing.assert_close(seq, heads.transpose(0, 1).reshape(n, h * d) @ w_o)


@pytest.mark.parametrize("kw", [{}, {"causal": True},
                                {"key_padding_mask": torch.tensor([[False, True, False, False]])}],
                         ids=["plain", "causal", "padded"])
def test_mixed_dtypes_are_computed_in_the_widest_and_returned_in_qs(kw):
    """SDPA takes one dtype: float32 q and v with float64 k raised a RuntimeError of torch's, where the other kinds
    (and the KV cache after its first step) compute in the widest dtype and return q's."""
    gen = torch.Generator().manual_seed(0)
    q, v = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(2))
    k = torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64)
    out = softmax_attention(q, k, v, **kw)
    ref = softmax_attention_reference(q.double(), k, v.double(), **kw)
    assert out.dtype == torch.float32 and softmax_attention_reference(q, k, v, **kw).dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(softmax_attention_reference(q, k, v, **kw).double(), ref, rtol=1e-6, atol=1e-6)
