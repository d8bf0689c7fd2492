import pytest
import torch
from attention_helpers import assert_same_outputs_and_grads, padding_mask, qkv

from theorylab.attention import separable_attention
from theorylab.attention.separable import separable_attention_matrix, separable_attention_reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 32])
def test_equals_reference(causal, masked, chunk_size):
    q, k, v = qkv(Nq=23, Dv=6)
    mask = padding_mask(2, 23) if masked else None

    def fast(q, k, v):
        return separable_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=chunk_size)

    def ref(q, k, v):
        return separable_attention_reference(q, k, v, causal=causal, key_padding_mask=mask)

    assert_same_outputs_and_grads(fast, ref, (q, k, v))


def test_cross_attention_equals_reference():
    q, k, v = qkv(Nq=7, Nk=29)
    mask = padding_mask(2, 29)
    assert_same_outputs_and_grads(lambda q, k, v: separable_attention(q, k, v, key_padding_mask=mask),
                                  lambda q, k, v: separable_attention_reference(q, k, v, key_padding_mask=mask),
                                  (q, k, v))


def test_rows_are_distributions_of_rank_at_most_d():
    q, k, _ = qkv(Nq=40, D=6)
    a = separable_attention_matrix(q, k)  # (B, H, 40, 40)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    assert int(torch.linalg.matrix_rank(a).max()) <= 6


@pytest.mark.parametrize("causal", [False, True])
def test_padding_equals_truncation_whatever_the_padded_values(causal):
    q, k, v = qkv(B=1, Nq=20)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 14:] = True
    k2, v2 = k.clone(), v.clone()
    k2[..., 14:, :] = 500.0  # would dominate every column softmax if it leaked
    v2[..., 14:, :] = 1e6
    out = separable_attention(q, k2, v2, causal=causal, key_padding_mask=mask, chunk_size=4)
    trunc = separable_attention(q[..., :14, :], k[..., :14, :], v[..., :14, :], causal=causal, chunk_size=4)
    if causal:
        torch.testing.assert_close(out[..., :14, :], trunc)
    else:
        torch.testing.assert_close(out, separable_attention(q, k[..., :14, :], v[..., :14, :]))


def test_causal_never_sees_the_future_even_with_huge_future_keys():
    q, k, v = qkv(Nq=40)
    t = 17
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1:, :] = k[..., t + 1:, :] * 100 + 300  # future keys far above every past key
    v2[..., t + 1:, :] = torch.randn_like(v2[..., t + 1:, :]) * 1e3
    for chunk in (8, 32, 64):
        a = separable_attention(q, k, v, causal=True, chunk_size=chunk)
        b = separable_attention(q, k2, v2, causal=True, chunk_size=chunk)
        torch.testing.assert_close(a[..., : t + 1, :], b[..., : t + 1, :], atol=1e-12, rtol=1e-12)
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_close_to_float32(dtype, causal):
    q, k, v = qkv(dtype=torch.float32, Nq=50, scale=3.0)
    out = separable_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = separable_attention(*(x.to(dtype).float() for x in (q, k, v)), causal=causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_large_norm_inputs_stay_finite(causal):
    q, k, v = qkv(dtype=torch.float32, Nq=30, scale=1e3)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    out = separable_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_bad_input():
    q, k, v = qkv(Nq=9, Nk=12)
    with pytest.raises(ValueError, match="head dims differ"):
        separable_attention(q[..., :3], k, v)
    with pytest.raises(ValueError, match=r"\(B, Nk\)"):
        separable_attention(q, k, v, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("Nq, Nk", [(5, 12), (12, 5), (7, 2), (0, 7), (1, 1), (40, 33)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_with_nq_ne_nk_is_top_left_aligned_like_sdpa(Nq, Nk, padded):
    """Causal with Nq != Nk had raised; it is now top-left aligned like softmax_attention and SDPA's is_causal
    (query i sees keys j <= i; from Nk on, every key), equal to the reference in outputs and gradients."""
    q, k, v = qkv(B=2, H=2, Nq=Nq, Nk=Nk, D=4)
    mask = None
    if padded and Nk > 2:
        mask = torch.zeros(2, Nk, dtype=torch.bool)
        mask[1, 1] = mask[0, -1] = True
    assert_same_outputs_and_grads(
        lambda q, k, v: separable_attention(q, k, v, causal=True, key_padding_mask=mask, chunk_size=3),
        lambda q, k, v: separable_attention_reference(q, k, v, causal=True, key_padding_mask=mask), (q, k, v))


@pytest.mark.parametrize("fallback_elements", [1, 200, 1 << 22])
@pytest.mark.parametrize("masked", [False, True])
def test_the_per_query_fallback_in_steps_of_rows_equals_the_reference(monkeypatch, fallback_elements, masked):
    """A key far above the earlier ones sends its chunk down the per-query path, which forms its (rows, C, D)
    weights a few rows at a time (one row, a few, all): outputs and gradients equal the reference's."""
    from theorylab.attention import separable

    calls = []
    real = separable._chunk_explicit
    monkeypatch.setattr(separable, "_chunk_explicit", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(separable, "FALLBACK_ELEMENTS", fallback_elements)
    q, k, v = qkv(Nq=40, Dv=6)
    k[:, :, 13] = 2000.0  # a rise of 2000 > 0.45 log(1/tiny) ~ 319 in float64, inside the second chunk
    mask = padding_mask(2, 40) if masked else None
    assert_same_outputs_and_grads(
        lambda q, k, v: separable_attention(q, k, v, causal=True, key_padding_mask=mask, chunk_size=10),
        lambda q, k, v: separable_attention_reference(q, k, v, causal=True, key_padding_mask=mask), (q, k, v))
    assert calls


def test_default_chunk_is_the_cpu_one_on_cpu_and_meta_and_larger_on_an_accelerator():
    from theorylab.attention import separable

    assert separable._default_chunk(torch.device("cpu")) == separable.SEPARABLE_CHUNK
    assert separable._default_chunk(torch.device("meta")) == separable.SEPARABLE_CHUNK
    assert separable._default_chunk(torch.device("cuda")) == separable.ACCELERATOR_SEPARABLE_CHUNK \
        > separable.SEPARABLE_CHUNK


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_the_causal_cost_is_the_docstrings_formula(chunk):
    """4 n D Dv for the state, 2 n C (D + Dv) for the intra-chunk products (B = H = 1): linear in n."""
    from theorylab.cost import count_flops

    n, d, dv = 1024, 16, 8
    q, k = (torch.empty(1, 1, n, d, device="meta") for _ in range(2))
    v = torch.empty(1, 1, n, dv, device="meta")
    assert count_flops(separable_attention, q, k, v) == 4 * n * d * dv
    causal = count_flops(separable_attention, q, k, v, causal=True, chunk_size=chunk)
    assert causal == 4 * n * d * dv + 2 * n * chunk * (d + dv)
