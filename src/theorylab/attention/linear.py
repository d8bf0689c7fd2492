r"""Kernelised (linear) attention: D⁻¹ φ(Q) (φ(K)ᵀ V) with D = diag(φ(Q) φ(K)ᵀ 1), never forming n x n.

Katharopoulos et al. 2020 ("Transformers are RNNs"); Choromanski et al. 2021 (Performers, FAVOR+).

Non-causal: φ(K)ᵀ[V, 1] is accumulated chunk by chunk ((M, Dv+1) state), then each chunk of queries reads it.
Causal: the sequence is cut into chunks of C positions; inside a chunk the (C, C) lower-triangular part is a
matmul, across chunks an (M, Dv+1) state holds the prefix sums. Chunks are processed G at a time (a block) with
batched ops, the states entering a block's chunks coming from one small matmul; only the state crosses blocks.
O(n) memory in forward and backward, O(n C M + n M Dv) time.

Stabilisation (feature maps that expose ``log_features_rowwise``, i.e. positive random features). exp(ωᵀk' - |k'|²/2)
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

from ._checks import FLOOR, ChunkOutputs, accumulation_dtype, check_qkv, keep_mask, safe_divide

# Default chunk lengths, tuned on CPU at B=1, H=8, D=64, M=256. Causal: the (C, C) intra-chunk matmul costs
# 2nCM, so C is kept small. Non-causal: about 2M feature entries per chunk (8 MB in float32).
CAUSAL_CHUNK = 64
CAUSAL_BLOCK_ELEMENTS = 1 << 19  # feature entries per block of chunks (2 MB in float32)
NONCAUSAL_FEATURE_ELEMENTS = 1 << 21


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
    stabilised = hasattr(feature_map, "log_features_rowwise")
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


def _ratio(num: Tensor, Dv: int, stabilised: bool) -> Tensor:
    """num[..., :Dv] / num[..., Dv:], the normalised output of a chunk of queries.

    Positive features (the stabilised path) have a normaliser >= 0: clamping it at sqrt(smallest normal) keeps
    the output bounded and the gradients finite in one cheap pass over a column. Other maps (trigonometric
    features can make it negative) go through :func:`safe_divide`."""
    if stabilised:
        return num[..., :Dv] / num[..., Dv:].clamp_min(torch.finfo(num.dtype).tiny ** 0.5)
    return safe_divide(num[..., :Dv], num[..., Dv:])


def _accumulate(state: Tensor | None, decay: Tensor | None, kf: Tensor, v1: Tensor) -> Tensor:
    """state · decay + kfᵀ v1 ((B, H, M, Dv + 1); decay broadcastable, None = 1). Without autograd the state is
    updated in place (one batched addmm, no temporaries of the state's size)."""
    if state is None:
        return kf.mT @ v1
    if torch.is_grad_enabled():
        return (state if decay is None else state * decay) + kf.mT @ v1
    if decay is not None:
        state.mul_(decay)
    B, H, C, M = kf.shape
    flat = state.view(B * H, M, -1)
    torch.baddbmm(flat, kf.reshape(B * H, C, M).mT, v1.reshape(B * H, C, -1), out=flat)  # seen by FLOP counters
    return state


def _query_features(fm: nn.Module, x: Tensor, stabilised: bool) -> Tensor:
    """φ(x) for a chunk of queries; stabilised: divided by each row's maximum (a factor that cancels in the
    ratio, so the |x'|²/2 offset is not even needed). Every feature is then <= 1."""
    if not stabilised:
        return fm(x)
    proj, _ = fm.log_features_rowwise(x)  # (B, H, C, M)
    return proj.sub_(proj.detach().amax(-1, keepdim=True)).exp_()


def _key_log_features(fm: nn.Module, x: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """For a chunk of keys: (ωᵀx' with padded rows at -inf, the per-row offset, the row max of log φ (detached)).
    log φ(x) = proj + offset[..., None]."""
    proj, offset = fm.log_features_rowwise(x)  # (B, H, C, M), (B, H, C)
    if pad is not None:
        proj = proj.masked_fill(pad[..., None], float("-inf"))
    return proj, offset, proj.detach().amax(-1) + offset.detach()


def _noncausal(q: Tensor, k: Tensor, v: Tensor, fm: nn.Module, pad: Tensor | None, stabilised: bool,
               chunk: int) -> Tensor:
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    state = None  # (B, H, M, Dv + 1): φ(K)ᵀ[V, 1], relative to exp(ref)
    ref = q.new_full((B, H, 1), FLOOR)  # running max of the key log-features (stabilised maps)
    # chunks via split, not slicing: a slice's backward writes its gradient into a zero tensor of the full length
    pads = pad.split(chunk, dim=2) if pad is not None else [None] * len(range(0, Nk, chunk))
    for k_c, v_c, pad_c in zip(k.split(chunk, dim=2), v.split(chunk, dim=2), pads, strict=True):
        if stabilised:
            proj, offset, row_max = _key_log_features(fm, k_c, pad_c)
            new_ref = torch.maximum(ref, row_max.amax(-1, keepdim=True))  # (B, H, 1)
            kf = proj.sub_((new_ref - offset)[..., None]).exp_()  # exp(log φ - ref) <= 1; 0 where padded
        else:
            kf = fm(k_c)  # (B, H, C, M)
            if pad_c is not None:
                kf = kf.masked_fill(pad_c[..., None], 0.0)
        decay = torch.exp(ref - new_ref)[..., None] if stabilised and state is not None else None
        state = _accumulate(state, decay, kf, _with_ones(v_c))  # (B, H, M, Dv + 1)
        if stabilised:
            ref = new_ref
    if state is None:  # Nk == 0
        return q.new_zeros(B, H, Nq, Dv)
    out = ChunkOutputs(q, (B, H, Nq, Dv))
    for s, q_c in zip(range(0, Nq, chunk), q.split(chunk, dim=2), strict=True):
        qf = _query_features(fm, q_c, stabilised)  # (B, H, C, M)
        out.write(s, s + q_c.shape[2], _ratio(qf @ state, Dv, stabilised))  # (B, H, C, Dv + 1) -> (B, H, C, Dv)
    return out.result()


def _causal(q: Tensor, k: Tensor, v: Tensor, fm: nn.Module, pad: Tensor | None, stabilised: bool,
            chunk: int) -> Tensor:
    """Causal chunked attention, G chunks of C positions at a time (a block).

    Inside a block every step is one batched op over its G chunks — features, the (C, C) intra-chunk products,
    each chunk's contribution kᵀ[v, 1] — and the states entering the chunks are one (G+1, G) lower-triangular
    matmul over those contributions. So the Python loop (and the number of parallel regions, which is what a
    busy machine punishes) runs over blocks, not chunks; the carried state crosses blocks only.

    Stabilised maps: m_j is the running prefix max of the key log-features, k̂_j = exp(log φ(k_j) - m_j) <= 1 and
    query i weighs key j <= i by (q̂_iᵀk̂_j) exp(m_j - m_i); states are kept relative to the m at a chunk's end,
    so every exponent is <= 0. Other maps use m = 0."""
    B, H, N, _ = q.shape
    Dv = v.shape[-1]
    m_features = getattr(fm, "num_features", None) or q.shape[-1]
    G = max(1, CAUSAL_BLOCK_ELEMENTS // max(1, B * H * m_features * chunk))  # chunks per block
    block = G * chunk
    out = ChunkOutputs(q, (B, H, N, Dv))
    state = None  # (B, H, M, Dv + 1): Σ_{j < block start} k̂_j exp(m_j - ref) [v_j, 1]
    ref = q.new_full((B, H), FLOOR)  # m at the end of the previous block
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # j > i: the future
    pads = pad.split(block, dim=2) if pad is not None else [None] * len(range(0, N, block))
    blocks = zip(range(0, N, block), q.split(block, dim=2), k.split(block, dim=2), v.split(block, dim=2), pads,
                 strict=True)
    for s, q_b, k_b, v_b, pad_b in blocks:
        L = q_b.shape[2]
        extra = -L % chunk  # the last block is padded to whole chunks with masked keys (its outputs dropped)
        if extra:
            q_b, k_b, v_b = (F.pad(x, (0, 0, 0, extra)) for x in (q_b, k_b, v_b))
            pad_b = F.pad(pad_b if pad_b is not None else q_b.new_zeros(B, 1, L, dtype=torch.bool), (0, extra),
                          value=True)
        g = (L + extra) // chunk
        qf = _query_features(fm, q_b, stabilised)  # (B, H, L', M)
        if stabilised:
            proj, offset, row_max = _key_log_features(fm, k_b, pad_b)
            run = torch.maximum(torch.cummax(row_max, dim=-1).values, ref[..., None])  # (B, H, L'): m_j
            kf = proj.sub_((run - offset)[..., None]).exp_()  # k̂_j <= 1; 0 where padded
        else:
            kf = fm(k_b)
            if pad_b is not None:
                kf = kf.masked_fill(pad_b[..., None], 0.0)
            run = kf.new_zeros(B, H, L + extra)
        qf, kf = qf.unflatten(2, (g, chunk)), kf.unflatten(2, (g, chunk))  # (B, H, g, C, M)
        run, v1 = run.unflatten(2, (g, chunk)), _with_ones(v_b).unflatten(2, (g, chunk))  # (B,H,g,C), (..,Dv+1)
        # intra-chunk: (q̂_iᵀk̂_j) exp(m_j - m_i) for j <= i
        decay = (run[..., None, :] - run[..., :, None]).masked_fill_(above, float("-inf")).exp_()  # (B,H,g,C,C)
        num = (qf @ kf.mT).mul_(decay) @ v1  # (B, H, g, C, Dv + 1)
        # each chunk's contribution relative to its own end r_c, then the states entering chunks 0..g
        ends = run[..., -1]  # (B, H, g): r_c
        contrib = kf.mT @ (v1 * torch.exp(run - ends[..., None])[..., None])  # (B, H, g, M, Dv + 1)
        before = torch.cat([ref[..., None], ends], dim=-1)  # (B, H, g + 1): the reference entering chunk c
        lower = torch.ones(g + 1, g, dtype=torch.bool, device=q.device).tril(-1)  # chunk c' < c
        weights = (ends[..., None, :] - before[..., :, None]).masked_fill_(~lower, float("-inf")).exp_()
        states = torch.einsum("bhcd,bhdmv->bhcmv", weights, contrib)  # (B, H, g + 1, M, Dv + 1)
        if state is not None:
            states = states + torch.exp(ref[..., None] - before)[..., None, None] * state[:, :, None]
        carried = (qf @ states[:, :, :-1]) * torch.exp(before[..., :-1, None] - run)[..., None]
        result = _ratio(num + carried, Dv, stabilised).flatten(2, 3)  # (B, H, L', Dv)
        out.write(s, s + L, result[:, :, :L] if extra else result)
        state, ref = states[:, :, -1], before[..., -1]
        del qf, kf, decay, num, contrib, states, carried, result
    return out.result()


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
