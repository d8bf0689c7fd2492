"""Exact (softmax) attention: torch SDPA as the fast path, and the naive n x n reference it is tested against.

``softmax_attention(q, k, v) = softmax_row(q kᵀ · scale) v`` with scale = 1/sqrt(D) by default (Vaswani et al.
2017). The naive references here also serve claim 3.1, which measures the cost of the n x n score matrix.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_qkv, keep_mask, masked_softmax, zero_padded
from .state import KVCache


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Exact attention through ``torch.nn.functional.scaled_dot_product_attention``.

    For each batch b and head h (Vaswani et al. 2017),

        out = softmax_row(s · q kᵀ + mask) v,    mask_ij = −inf where key j is hidden from query i, else 0,

    with q, k, v the (Nq, D), (Nk, D), (Nk, Dv) slices, s = ``scale`` (None -> 1/sqrt(D)) and the softmax over the
    Nk keys of each row. Key j is hidden from query i when ``causal`` and j > i (top-left aligned: query i sees
    keys 0..i whatever Nq and Nk, so queries from Nk on see every key), or when ``key_padding_mask[b, j]`` is
    True. A row in which every key is hidden gives zeros (see Returns).

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv).
        causal: key j is visible to query i iff j <= i (top-left aligned when Nq != Nk, as SDPA's is_causal).
        key_padding_mask: bool (B, Nk), True = padding (ignored, whatever its keys and values hold).
        scale: multiplies q kᵀ; None -> 1/sqrt(D).

    Returns:
        (B, H, Nq, Dv) in q's dtype. A query that sees no key at all (every visible key padded) gets zeros, not
        NaN. Mixed dtypes are computed in the widest of the three (SDPA takes one), as the other kinds do.

    Raises:
        TypeError: q, k or v is not floating point.
        ValueError: the shapes do not match (B, H, N, D) as above, the mask is not a bool (B, Nk) tensor, or
            scale is not a finite number.
    """
    _, _, Nq, Nk, _, _ = check_qkv(q, k, v, key_padding_mask, name="softmax_attention")
    scale = _check_scale(scale, "softmax_attention")
    if not q.dtype == k.dtype == v.dtype:  # SDPA refused them with a RuntimeError of its own
        common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        out = softmax_attention(q.to(common), k.to(common), v.to(common), causal=causal,
                                key_padding_mask=key_padding_mask, scale=scale)
        return out.to(q.dtype)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = keep_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)  # inf/NaN there would reach dq, out
    empty = ~keep.any(-1, keepdim=True)  # (B, 1, Nq or 1, 1): rows with nothing to attend to
    # SDPA gives NaN on an all-masked row; let such rows attend everywhere, then zero them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


def _check_scale(scale: float | None, name: str) -> float | None:
    """``scale`` as a float (SDPA takes floats only: a Fraction raised TypeError there), or None; ValueError unless
    it is None or a finite real number (SDPA turned a NaN scale into finite outputs; 10**400 overflowed)."""
    if scale is None:
        return None
    value = math.nan
    if not isinstance(scale, bool) and isinstance(scale, numbers.Real):
        try:
            value = float(scale)
        except OverflowError:
            pass
    if not math.isfinite(value):
        raise ValueError(f"{name}: scale must be a finite number or None; got {scale!r}")
    return value


def softmax_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                                key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The naive reference of :func:`softmax_attention`: forms the (B, H, Nq, Nk) score matrix."""
    _, _, Nq, Nk, D, _ = check_qkv(q, k, v, key_padding_mask, name="softmax_attention_reference")
    scale = _check_scale(scale, "softmax_attention_reference")
    scale = D ** -0.5 if scale is None else scale
    common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # mixed dtypes: the widest
    k, v = zero_padded(k, key_padding_mask).to(common), zero_padded(v, key_padding_mask).to(common)
    scores = (q.to(common) @ k.mT) * scale  # (B, H, Nq, Nk)
    keep = keep_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    return (masked_softmax(scores, keep, dim=-1) @ v).to(q.dtype)


def sequential_heads_attention(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor) -> Tensor:
    """Multi-head self-attention as the textbook writes it, one head after another (claim 3.1).

    head_i = softmax_row(X W_i^Q (X W_i^K)ᵀ / sqrt(d)) X W_i^V and out = [head_1, ..., head_h] W^O.

    Args:
        x: (n, d_model) inputs.
        w_q, w_k, w_v: (h, d_model, d) per-head projections.
        w_o: (h * d, d_model) output projection.

    Only one head's (n, n) score matrix is alive at a time, so peak memory is Θ(n² + hnd + hd²) rather than
    Θ(hn²) as when the heads are batched.
    """
    h, _, d = w_q.shape
    heads = []
    for i in range(h):
        q, k, v = x @ w_q[i], x @ w_k[i], x @ w_v[i]  # (n, d) each
        scores = (q @ k.mT) * d ** -0.5  # (n, n)
        heads.append(torch.softmax(scores, dim=-1) @ v)  # (n, d)
        del q, k, v, scores
    return torch.cat(heads, dim=-1) @ w_o  # (n, h*d) @ (h*d, d_model)


def batched_heads_attention(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor) -> Tensor:
    """The same as :func:`sequential_heads_attention` with all heads batched: h score matrices alive at once."""
    h, _, d = w_q.shape
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # (h, n, d) each
    heads = torch.softmax((q @ k.mT) * d ** -0.5, dim=-1) @ v  # (h, n, n) scores -> (h, n, d)
    return heads.transpose(0, 1).reshape(x.shape[0], h * d) @ w_o


def cached_softmax_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, *,
                             key_padding_mask: Tensor | None = None,
                             scale: float | None = None) -> tuple[Tensor, KVCache]:
    """Causal :func:`softmax_attention` over the positions after ``cache``'s (Nq == Nk new ones): query i of this
    call sees the cached keys and the new keys j <= i (bottom-right aligned). Returns the outputs and the cache with
    the new keys and values appended; a sequence fed in pieces gives one causal call's outputs.

    Raises:
        TypeError, ValueError: as :func:`softmax_attention`; a cache that is not a KVCache, of other B, H, D or
            Dv, or on another device; Nq != Nk.
    """
    B, H, Nq, Nk, D, Dv = check_qkv(q, k, v, key_padding_mask, name="softmax_attention")
    if Nq != Nk:
        raise ValueError(f"softmax_attention: a KV cache takes as many new queries as keys; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    out_dtype = q.dtype
    if cache is not None:
        ck, cv = _check_cache(cache, B=B, H=H, D=D, Dv=Dv, device=q.device)
        past = cache.length
        # never narrower than the cache: float64 keys stay float64 after a float32 piece, as the recurrent states do
        work = torch.promote_types(torch.promote_types(ck.dtype, cv.dtype), torch.promote_types(q.dtype, v.dtype))
        q, k, v = q.to(work), k.to(work), v.to(work)
        keys, values = torch.cat([ck.to(work), k], dim=2), torch.cat([cv.to(work), v], dim=2)
        pads = [cache.padding, key_padding_mask]
    else:
        past, keys, values, pads = 0, k, v, [None, key_padding_mask]
    padding = None
    if any(p is not None for p in pads):
        lengths = (past, Nk)
        padding = torch.cat([p if p is not None else q.new_zeros(B, n, dtype=torch.bool)
                             for p, n in zip(pads, lengths, strict=True)], dim=1)
    new_cache = KVCache(keys, values, padding)
    if past == 0:
        out = softmax_attention(q, keys, values, causal=True, key_padding_mask=padding, scale=scale)
        return out.to(out_dtype), new_cache
    if Nq == 1 and padding is None:  # one new position sees every key: no mask (SDPA's fastest path)
        return softmax_attention(q, keys, values, scale=scale).to(out_dtype), new_cache
    keep = torch.ones(Nq, past + Nk, dtype=torch.bool, device=q.device).tril(past)[None, None]  # j <= past + i
    if padding is not None:
        keep = keep & ~padding[:, None, None, :]
    scale = _check_scale(scale, "softmax_attention")
    keys, values = zero_padded(keys, padding), zero_padded(values, padding)
    empty = ~keep.any(-1, keepdim=True)  # rows whose every visible key is padded: zeros, as softmax_attention
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep | empty, scale=scale)
    return out.masked_fill(empty, 0.0).to(out_dtype), new_cache


def _check_cache(cache: object, *, B: int, H: int, D: int, Dv: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The cache's keys and values, checked against this call: TypeError for what is not a KVCache of tensors,
    ValueError naming what does not fit."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"softmax_attention: the state of exact attention is a KVCache; got {type(cache).__name__}")
    ck, cv, pad = cache.keys, cache.values, cache.padding
    if not isinstance(ck, Tensor) or not isinstance(cv, Tensor) or not (pad is None or isinstance(pad, Tensor)):
        raise TypeError(f"softmax_attention: a KVCache holds tensors (keys, values, padding or None); got "
                        f"{type(ck).__name__}, {type(cv).__name__}, {type(pad).__name__}")
    n = ck.shape[2] if ck.dim() == 4 else -1
    fits = ck.dim() == 4 and (ck.shape[0], ck.shape[1], ck.shape[3]) == (B, H, D) and tuple(cv.shape) == (B, H, n, Dv)
    if pad is not None and (pad.dtype != torch.bool or tuple(pad.shape) != (B, n)):
        fits = False
    if not fits or any(t.device != device for t in (ck, cv) + ((pad,) if pad is not None else ())):
        got = f"padding {pad.dtype} {tuple(pad.shape)}" if pad is not None else "no padding"
        raise ValueError(f"softmax_attention: the KV cache does not fit this call: keys {tuple(ck.shape)}, values "
                         f"{tuple(cv.shape)}, {got}, on {ck.device}; expected (B={B}, H={H}, n, D={D}), "
                         f"(B, H, n, Dv={Dv}) and bool (B, n) on {device}")
    return ck, cv
