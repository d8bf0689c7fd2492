r"""Kernelised (linear) attention: D⁻¹ φ(Q) (φ(K)ᵀ V) with D = diag(φ(Q) φ(K)ᵀ 1), never forming n x n.

Katharopoulos et al. 2020 ("Transformers are RNNs"); Choromanski et al. 2021 (Performers, FAVOR+).

Non-causal: φ(K)ᵀ[V, 1] is accumulated chunk by chunk ((M, Dv+1) state), then each chunk of queries reads it.
Causal: the sequence is cut into chunks of C positions; inside a chunk the (C, C) lower-triangular part is a
matmul, across chunks a carried (M, Dv+1) state holds the prefix sums — O(n) memory in forward and backward,
O(n C M + n M Dv) time.

Stabilisation (feature maps that expose ``log_features``, i.e. positive random features). exp(ωᵀk' - |k'|²/2)
overflows or underflows for keys of large norm, and the anchors subtract a *global* maximum over all keys, which
in causal mode lets a future key change past outputs (it sets which past features underflow). Here:

* each query's features are divided by their own maximum — a per-row factor that cancels between the numerator
  and the denominator;
* each key's features are divided by exp(m_j), m_j = max over keys j' <= j (non-padded) and features of the key
  log-features — the running prefix maximum. Query i then weighs key j by (q̂_iᵀ k̂_j) exp(m_j - m_i), a scalar
  decay <= 1 (the algebra of decay-gated linear attention); the common factor exp(m_i) cancels in the ratio.
  Nothing after position i enters the output at i. Non-causal mode uses the maximum over all non-padded keys,
  kept online across chunks.

The stabiliser is detached: the output does not depend on it mathematically, so its gradient is exactly zero.
Padding removes keys from φ(K) — numerator and denominator alike — and from the maximum. Half-precision inputs
are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import FLOOR, accumulation_dtype, check_qkv, keep_mask, safe_divide

# Default chunk lengths (tuned on 2 CPU cores at B=1, H=8, D=64, M=256): large enough that the matmuls are
# efficient, small enough that a chunk's features stay around a megabyte.
CAUSAL_CHUNK = 128
NONCAUSAL_FEATURE_ELEMENTS = 1 << 19


def _check_feature_map(feature_map: nn.Module, D: int) -> None:
    fm_dim = getattr(feature_map, "head_dim", None)
    if fm_dim is not None and fm_dim != D:
        raise ValueError(f"linear_attention: the feature map's head_dim is {fm_dim} but q and k have head dim "
                         f"D={D}")


def _feature_dtype(feature_map: nn.Module) -> torch.dtype:
    for b in feature_map.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float32


def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Kernelised attention out_i = Σ_j φ(q_i)ᵀφ(k_j) v_j / Σ_j φ(q_i)ᵀφ(k_j), in O(n) time and memory.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv).
        feature_map: φ, a module mapping (..., N, D) -> (..., N, M) (e.g. PositiveRandomFeatures, EluFeatures).
        causal: query i sees keys j <= i only (needs Nq == Nk).
        key_padding_mask: bool (B, Nk), True = padding (removed from φ(K)).
        chunk_size: positions per chunk (None: a default that keeps a chunk's features small).

    Returns:
        (B, H, Nq, Dv) in the dtype of q. A query whose normaliser is zero (no visible key) gets zeros.
    """
    B, H, Nq, Nk, D, Dv = check_qkv(q, k, v, key_padding_mask, name="linear_attention")
    _check_feature_map(feature_map, D)
    if causal and Nq != Nk:
        raise ValueError(f"linear_attention: causal needs Nq == Nk; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"linear_attention: chunk_size must be positive; got {chunk_size}")
    out_dtype = q.dtype
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, _feature_dtype(feature_map))
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    pad = key_padding_mask[:, None, :] if key_padding_mask is not None else None  # (B, 1, Nk)
    stabilised = hasattr(feature_map, "log_features")
    if causal:
        out = _causal(q, k, v, feature_map, pad, stabilised, chunk_size or CAUSAL_CHUNK)
    else:
        m = getattr(feature_map, "num_features", None) or D
        chunk = chunk_size or max(16, NONCAUSAL_FEATURE_ELEMENTS // max(1, B * H * m))
        out = _noncausal(q, k, v, feature_map, pad, stabilised, chunk)
    return out.to(out_dtype)


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1]: (..., N, Dv) -> (..., N, Dv + 1); the last column accumulates the normaliser."""
    return F.pad(v, (0, 1), value=1.0)


def _noncausal(q: Tensor, k: Tensor, v: Tensor, fm: nn.Module, pad: Tensor | None, stabilised: bool,
               chunk: int) -> Tensor:
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    state = None  # (B, H, M, Dv + 1): φ(K)ᵀ[V, 1], relative to exp(ref)
    ref = q.new_full((B, H, 1, 1), FLOOR)  # running max of the key log-features (stabilised maps)
    for s in range(0, Nk, chunk):
        e = min(s + chunk, Nk)
        if stabilised:
            lk = fm.log_features(k[:, :, s:e])  # (B, H, C, M)
            if pad is not None:
                lk = lk.masked_fill(pad[:, :, s:e, None], float("-inf"))
            new_ref = torch.maximum(ref, lk.detach().amax((-2, -1), keepdim=True))
            kf = torch.exp(lk - new_ref)
        else:
            kf = fm(k[:, :, s:e])  # (B, H, C, M)
            if pad is not None:
                kf = kf.masked_fill(pad[:, :, s:e, None], 0.0)
        contrib = kf.mT @ _with_ones(v[:, :, s:e])  # (B, H, M, Dv + 1)
        if state is None:
            state = contrib
        elif stabilised:
            state = state * torch.exp(ref - new_ref) + contrib
        else:
            state = state + contrib
        if stabilised:
            ref = new_ref
    if state is None:  # Nk == 0
        return q.new_zeros(B, H, Nq, Dv)
    out = q.new_empty(B, H, Nq, Dv)
    for s in range(0, Nq, chunk):
        e = min(s + chunk, Nq)
        qf = _query_features(fm, q[:, :, s:e], stabilised)  # (B, H, C, M)
        num = qf @ state  # (B, H, C, Dv + 1)
        out[:, :, s:e] = safe_divide(num[..., :Dv], num[..., Dv:])
    return out


def _query_features(fm: nn.Module, x: Tensor, stabilised: bool) -> Tensor:
    if not stabilised:
        return fm(x)
    lq = fm.log_features(x)
    return torch.exp(lq - lq.detach().amax(-1, keepdim=True))  # per-row factor: cancels in the ratio


def _causal(q: Tensor, k: Tensor, v: Tensor, fm: nn.Module, pad: Tensor | None, stabilised: bool,
            chunk: int) -> Tensor:
    B, H, N, _ = q.shape
    Dv = v.shape[-1]
    out = q.new_empty(B, H, N, Dv)
    state = None  # (B, H, M, Dv + 1): Σ_{j < s} k̂_j exp(m_j - ref) [v_j, 1]
    ref = q.new_full((B, H), FLOOR)  # m at the end of the previous chunk
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        C = e - s
        qf = _query_features(fm, q[:, :, s:e], stabilised)  # (B, H, C, M)
        v1 = _with_ones(v[:, :, s:e])  # (B, H, C, Dv + 1)
        if stabilised:
            lk = fm.log_features(k[:, :, s:e])  # (B, H, C, M)
            if pad is not None:
                lk = lk.masked_fill(pad[:, :, s:e, None], float("-inf"))
            # m_j: running prefix max of the key log-features (padded keys leave it unchanged)
            run = torch.maximum(torch.cummax(lk.detach().amax(-1), dim=-1).values, ref[..., None])  # (B, H, C)
            kf = torch.exp(lk - run[..., None])  # <= 1
            log_decay = (run[..., None, :] - run[..., :, None]).masked_fill(~tril[:C, :C], float("-inf"))
            scores = (qf @ kf.mT) * torch.exp(log_decay)  # (B, H, C, C): (q̂_iᵀk̂_j) exp(m_j - m_i), j <= i
        else:
            kf = fm(k[:, :, s:e])
            if pad is not None:
                kf = kf.masked_fill(pad[:, :, s:e, None], 0.0)
            scores = (qf @ kf.mT).masked_fill(~tril[:C, :C], 0.0)
        num = scores @ v1  # (B, H, C, Dv + 1)
        if state is not None:
            carried = qf @ state  # (B, H, C, Dv + 1)
            num = num + (carried * torch.exp(ref[..., None] - run)[..., None] if stabilised else carried)
        out[:, :, s:e] = safe_divide(num[..., :Dv], num[..., Dv:])
        if e < N:  # carry the state to the next chunk, relative to its new reference m_{e-1}
            if stabilised:
                new_ref = run[..., -1]
                v1 = v1 * torch.exp(run - new_ref[..., None])[..., None]
                contrib = kf.mT @ v1
                state = contrib if state is None else state * torch.exp(ref - new_ref)[..., None, None] + contrib
                ref = new_ref
            else:
                contrib = kf.mT @ v1
                state = contrib if state is None else state + contrib
    return out


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *,
                               causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
    """The naive reference: A = φ(Q) φ(K)ᵀ as an explicit (Nq, Nk) matrix, masked, then D⁻¹ A V.

    No stabilisation (use moderate inputs, float64)."""
    _, _, Nq, Nk, D, _ = check_qkv(q, k, v, key_padding_mask, name="linear_attention_reference")
    _check_feature_map(feature_map, D)
    a = feature_map(q) @ feature_map(k).mT  # (B, H, Nq, Nk)
    keep = keep_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if keep is not None:
        a = a.masked_fill(~keep, 0.0)
    return safe_divide(a @ v, a.sum(-1, keepdim=True))
