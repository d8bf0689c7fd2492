r"""Separable attention: softmax_row(Q) softmax_col(K)ᵀ V, computed as softmax_row(Q) (softmax_col(K)ᵀ V).

A = softmax over the D features of each query (rows sum to 1), B = softmax over the keys of each feature column
(columns sum to 1), so every row of A Bᵀ is a categorical distribution over keys — of rank <= D. Computing
Bᵀ V (D x Dv) first costs Θ(n D Dv) time and Θ(n D + D Dv) space. No scale is applied.

Causal: query i uses the column softmax over keys j <= i only,
B⁽ⁱ⁾_jc = exp(k_jc - m_ic) / Z_ic with m_ic = max_{j' <= i} k_j'c and Z_ic = Σ_{j' <= i} exp(k_j'c - m_ic).
It is computed in chunks of C positions: across chunks a (D, Dv) state of prefix sums with a per-column running
max is carried (and rescaled as the max grows). Inside a chunk, weights are taken relative to the chunk's final
max M_c, which makes the chunk two matmuls and a cumsum; that is exact as long as the running max rises by less
than ~40 (float32) inside the chunk, which is checked. A chunk where it rises more (a key far above all earlier
ones) is done with each query's own reference: the weights exp(k_jc - m_ic), j <= i, are formed as a (C, C, D)
tensor, every factor <= 1, so a later key can never underflow an earlier query's weights. The chunks cost
Θ(n C (D + Dv)) more than the state's Θ(n D Dv): at the CPU default C = 128 and D = Dv = 16, 9× the non-causal
FLOPs. Never n x n.
"""

from __future__ import annotations

import math
from typing import Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (
    ChunkOutputs,
    accumulation_dtype,
    causal_product,
    check_qkv,
    compiler_disabled,
    empty_attention,
    finite_values,
    is_exporting,
    keep_mask,
    lowest,
    masked_softmax,
    no_autocast,
    positive_int,
    readable,
    safe_divide,
    zero_padded,
)
from .state import LinearAttentionState, check_state, check_width, widened

# Causal chunk on CPU: a chunk costs ~15 small ops, so longer chunks pay off until the (C, C) products dominate. At
# B=1, H=8, D=64, float32 (2026-11-26, Intel Xeon, medians of 5; forward / forward+backward, n=16384): chunks of 32
# 370 / 1344 ms on 1 thread and 226 / 916 ms on 2; of 64: 302 / 1027 and 209 / 661; of 128: 323 / 1020 and
# 130 / 513. Peak memory is the same for the three (~300 MiB forward+backward).
SEPARABLE_CHUNK = 128
# On a GPU each chunk costs kernel launches, not memory traffic: an H200 ran causal separable attention at
# n=65536 (B=1, H=8, D=64, float32) in 786 ms with chunks of 32 and 70 ms with chunks of 512 (SDPA causal:
# 126 ms), 2026-11-26, when each chunk also read a value back (now one read-back per call).
ACCELERATOR_SEPARABLE_CHUNK = 512
FALLBACK_ELEMENTS = 1 << 22  # entries of the (rows, C, D) weights per step of a chunk's per-query fallback


@overload
def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                        state: LinearAttentionState | None = None, return_state: Literal[False] = False) -> Tensor: ...
@overload
def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                        state: LinearAttentionState | None = None,
                        return_state: Literal[True]) -> tuple[Tensor, LinearAttentionState]: ...
@overload
def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                        state: LinearAttentionState | None = None,
                        return_state: bool = False) -> Tensor | tuple[Tensor, LinearAttentionState]: ...
def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                        state: LinearAttentionState | None = None,
                        return_state: bool = False) -> Tensor | tuple[Tensor, LinearAttentionState]:
    """softmax_row(Q) (softmax_col(K)ᵀ V) without forming n x n.

    For each batch and head, with Q, K, V the (Nq, D), (Nk, D), (Nk, Dv) slices of q, k, v:

        out = A (Bᵀ V),    A = softmax_row(Q),    B = softmax_col(K),

    where the row softmax A_ic = exp(Q_ic) / Σ_c' exp(Q_ic') is over the D features of each query (each row of
    A sums to 1), and the column softmax B_jc = exp(K_jc) / Σ_j' exp(K_j'c) is over the keys, separately for each
    feature column c (each column of B sums to 1 over the keys that are not padded; with ``causal``, query i uses
    the column softmax over keys j <= i only). No scale is applied: there is no 1/sqrt(D) (nor any other factor)
    on Q or K. Each row of A Bᵀ is a distribution over keys, of rank <= D; the cost is Θ(n D Dv) (causal:
    Θ(n (D Dv + C (D + Dv))) with C = ``chunk_size``, the intra-chunk products: 4 n D Dv + 2 n C (D + Dv)
    FLOPs), never n x n.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv).
        causal: query i uses the column softmax over keys j <= i only (top-left aligned when Nq != Nk, as
            SDPA's is_causal and :func:`softmax_attention`: queries from Nk on see every key).
        key_padding_mask: bool (B, Nk), True = padding: removed from the key softmax.
        chunk_size: positions per chunk in causal mode (None: 128 on CPU, 512 on a GPU).
        state: causal only (Nq == Nk): the :class:`~theorylab.attention.state.LinearAttentionState` of the
            positions before this call's (from ``return_state=True``): the column softmax's running sums and
            maxima. Feeding a sequence in pieces (a prompt, then one token at a time) gives one call's outputs
            up to rounding, at a cost per position that does not grow with the prefix.
        return_state: causal only: also return the state after this call's positions.

    Returns:
        (B, H, Nq, Dv) in the dtype of q (with ``return_state=True``, a tuple (output, state)); zeros where a
        query sees no key (in particular when Nk = 0). A NaN or inf key or value reaches only the queries that
        see it (causal: the positions from its own on; a value under torch.compile or torch.export: from its
        chunk's start).

    Raises:
        TypeError: q, k or v is not floating point, chunk_size is not an integer, return_state not a bool, or
            state not a LinearAttentionState.
        ValueError: the shapes do not match (B, H, N, D) as above, the mask is not a bool (B, Nk) tensor, or
            chunk_size <= 0; state or return_state without causal or with Nq != Nk; a state of other shapes,
            on another device, or made by linear_attention.
    """
    B, H, Nq, Nk, D, Dv = check_qkv(q, k, v, key_padding_mask, name="separable_attention")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, what="chunk_size", name="separable_attention")
    if not isinstance(return_state, bool):
        raise TypeError(f"separable_attention: return_state must be a bool; got {return_state!r}")
    if state is not None or return_state:
        if not causal or Nq != Nk:
            raise ValueError("separable_attention: state and return_state apply to causal attention over as many "
                             f"queries as keys; got causal={causal}, q {tuple(q.shape)}, k {tuple(k.shape)}")
        out, new_state = _stateful(q, k, v, key_padding_mask, chunk_size, state)
        return (out, new_state) if return_state else out  # as linear_attention: the state only when asked for
    if causal and Nq < Nk:  # keys after the last query are seen by none
        mask = None if key_padding_mask is None else key_padding_mask[:, :Nq]
        return separable_attention(q, k[:, :, :Nq], v[:, :, :Nq], causal=True, key_padding_mask=mask,
                                   chunk_size=chunk_size)
    if causal and Nq > Nk:  # queries from Nk on see every key: the non-causal result
        head = separable_attention(q[:, :, :Nk], k, v, causal=True, key_padding_mask=key_padding_mask,
                                   chunk_size=chunk_size)
        tail = separable_attention(q[:, :, Nk:], k, v, key_padding_mask=key_padding_mask)
        return torch.cat([head, tail], dim=2)
    out_dtype = q.dtype
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype)
    q, k, v = q.to(acc), k.to(acc), zero_padded(v.to(acc), key_padding_mask)
    if B * H * Nq * Nk == 0 or D == 0:  # nothing to attend to (or no query: the softmax over keys has no
        # maximum; or no feature, over which each query's empty softmax sums to nothing)
        return empty_attention(q, k, v).to(out_dtype)
    with no_autocast(q.device):  # float32 for half inputs, under autocast too
        a = torch.softmax(q, dim=-1)  # (B, H, Nq, D): rows sum to 1
        logits = k
        if key_padding_mask is not None:
            logits = k.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        if not causal:
            keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]
            b = masked_softmax(logits, keep, dim=-2)  # (B, H, Nk, D): columns sum to 1 over the kept keys
            return (a @ (b.mT @ v)).to(out_dtype)  # (B, H, Nq, D) @ (B, H, D, Dv)
        return _causal(a, logits, v, chunk_size or _default_chunk(q.device))[0].to(out_dtype)


def _stateful(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, chunk_size: int | None,
              state: LinearAttentionState | None) -> tuple[Tensor, LinearAttentionState]:
    """Causal separable attention over the positions after ``state``'s (Nq == Nk), and the state after them."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    if state is not None:
        state = check_state(state, None, kind="separable", B=B, H=H, Dv=Dv, W=D, device=q.device)
        check_width(state.kv, k)  # M = D
    out_dtype = q.dtype
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, *(() if state is None else (state.kv.dtype,)))
    q, k, v = q.to(acc), k.to(acc), zero_padded(v.to(acc), key_padding_mask)
    kv, ref = (None, None) if state is None else widened(state, acc)
    length = (0 if state is None else state.length) + N
    if B * H * N == 0 or D == 0:  # nothing to attend to: the state passes on
        kv = kv if kv is not None else q.new_zeros(B, H, Dv + 1, D)
        ref = ref if ref is not None else q.new_full((B, H, D), lowest(acc))
        return empty_attention(q, k, v).to(out_dtype), LinearAttentionState(kv, ref, length, kind="separable")
    with no_autocast(q.device):
        logits = k if key_padding_mask is None else k.masked_fill(key_padding_mask[:, None, :, None], float("-inf"))
        a = torch.softmax(q, dim=-1)
        if N == 1:  # one position (decoding a token): no chunk, no read-back
            out, kv, ref = _causal_step(a, logits, v, kv, ref)
        else:
            out, kv, ref = _causal(a, logits, v, chunk_size or _default_chunk(q.device), kv, ref)
    return out.to(out_dtype), LinearAttentionState(kv, ref, length, kind="separable")


def _causal_step(a: Tensor, logits: Tensor, v: Tensor, kv: Tensor | None,
                 ref: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Causal separable attention at one position i, from the state of the positions before it:
    m_ic = max(m_{i-1,c}, k_ic), S_i = S_{i-1} e^{m_{i-1} - m_i} + [v_i, 1] e^{k_i - m_i} (per column c), and
    out_i = Σ_c a_ic S_ic[:Dv] / S_ic[Dv]: the chunked path's sums without its bookkeeping and read-backs.
    a, logits (B, H, 1, D) (logits -inf where padded), v (B, H, 1, Dv); returns (out, S_i, m_i)."""
    Dv = v.shape[-1]
    key = logits[:, :, 0]  # (B, H, D)
    top = torch.where(torch.isnan(key), float("-inf"), key.detach())  # a NaN key stays out of the maxima
    new_ref = top.clamp_min(lowest(a.dtype)) if ref is None else torch.maximum(ref, top)
    v1 = F.pad(v, (0, 1), value=1.0).mT  # (B, H, Dv + 1, 1): with the column weights an outer product
    ek = torch.exp(key - new_ref)[:, :, None, :]  # (B, H, 1, D) <= 1; 0 where padded
    kv = v1 * ek if kv is None else torch.addcmul(kv * torch.exp(cast(Tensor, ref) - new_ref)[:, :, None], v1, ek)
    a_over_z = safe_divide(a[:, :, 0], kv[:, :, Dv])  # (B, H, D): a_ic / Z_ic
    return a_over_z[:, :, None] @ kv[:, :, :Dv].mT, kv, new_ref  # (B, H, 1, D) @ (B, H, D, Dv)


def _default_chunk(device: torch.device) -> int:
    """The causal chunk length on ``device``: CPU (and meta, for FLOP counting) or an accelerator."""
    return SEPARABLE_CHUNK if device.type in ("cpu", "meta") else ACCELERATOR_SEPARABLE_CHUNK


def _causal(a: Tensor, logits: Tensor, v: Tensor, chunk: int, kv: Tensor | None = None,
            ref_in: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The outputs, and the state (B, H, Dv + 1, D) and reference (B, H, D) after the last position, from those
    before the first (``kv``, ``ref_in``; None: none)."""
    B, H, N, D = a.shape
    Dv = v.shape[-1]
    chunk = min(chunk, N)  # a chunk_size set for long sequences must not cost (chunk, chunk) memory on short ones
    # m_ic: running max per column over keys j <= i (the lowest finite value before the first non-padded key:
    # a finite floor keeps lowest - lowest = 0, and no finite key lies below it). Only its value at each chunk's
    # end (M_c) and first position are needed, except in chunks redone per query: a max per chunk and a running
    # max over the chunks (torch.cummax over all N positions took half of a causal call at n = 16384 on CPU)
    floor = lowest(a.dtype)
    exporting = is_exporting()
    inspect = a.device.type != "meta" and not exporting  # torch.export can neither read back nor break the graph
    keys = logits.detach()
    tops = _chunk_maxima(keys, chunk)  # (B, H, g, D)
    if inspect and _holds_nan(tops):
        # the maxima without the NaN key: a chunk's reference (its last maximum) would otherwise be NaN for the
        # chunk's earlier queries too; the key itself still enters the sums from its position on, as NaN
        keys = torch.where(torch.isnan(keys), float("-inf"), keys)
        tops = _chunk_maxima(keys, chunk)
    ref = a.new_full((B, H, D), floor) if ref_in is None else ref_in  # m before the first position
    ends = torch.maximum(torch.cummax(tops, dim=2).values.clamp_min(floor), ref[:, :, None])  # M_c per chunk
    # Within a chunk, weights taken relative to the chunk's final max M_c stay >= e^{-limit} where they matter
    # as long as the running max rises by at most `limit` inside the chunk (then Z >= e^{-limit} is far from
    # the safe-division threshold sqrt(smallest normal) = e^{-0.5 log(1/tiny)}).
    limit = 0.45 * -math.log(torch.finfo(a.dtype).tiny)
    if not inspect or D == 0:
        # meta tensors (FLOP counting): the matmul path is what is counted; torch.export traces the per-query path,
        # which is right for any keys
        steep = set() if a.device.type == "meta" or D == 0 else set(range(ends.shape[2]))
    else:  # m at each chunk's first position (fmax: a NaN first key leaves the maximum before it)
        starts = torch.fmax(torch.cat([ref[:, :, None], ends[:, :, :-1]], dim=2), keys[:, :, ::chunk])
        steep = _steep_chunks(ends - starts, limit)
    out = ChunkOutputs(a, (B, H, N, Dv))
    if kv is None:
        state = a.new_zeros(B, H, D, Dv)  # Σ_{j < s} exp(k_jc - ref_c) v_j
        norm = a.new_zeros(B, H, D)  # Σ_{j < s} exp(k_jc - ref_c)
    else:  # kv holds [state, norm] transposed, as LinearAttentionState keeps them
        state, norm = kv[:, :, :Dv].mT, kv[:, :, Dv]
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).triu(1)  # j > i
    finite = finite_values(v)  # else the products with masked weights go through causal_product
    # chunks via split, not slicing: a slice's backward writes its gradient into a zero tensor of the full length
    chunks = zip(range(0, N, chunk), logits.split(chunk, dim=2), v.split(chunk, dim=2), a.split(chunk, dim=2),
                 ends.unbind(2), strict=True)
    for c, (s, k_c, v_c, a_c, new_ref) in enumerate(chunks):  # new_ref (B, H, D): M_c, the max at the chunk's end
        e = s + k_c.shape[2]
        carry = torch.exp(ref - new_ref)  # (B, H, D) <= 1: rescales the carried sums to M_c
        ek = torch.exp(k_c - new_ref[:, :, None, :])  # (B, H, C, D) <= 1, 0 where padded
        if c not in steep:
            out.write(s, e, _chunk_matmul(a_c, ek, v_c, carry, norm, state, above, finite))
        else:  # a key far above the earlier ones inside this chunk: per-query references m_ic
            m = torch.maximum(torch.cummax(keys[:, :, s:e], dim=2).values, ref[:, :, None, :]).clamp_min(floor)
            out.write(s, e, _chunk_explicit(a_c, k_c, v_c, m, ref, norm, state, finite))
        state = state * carry[..., None] + ek.mT @ v_c
        norm = norm * carry + ek.sum(-2)
        ref = new_ref
    return out.result(), torch.cat([state.mT, norm[:, :, None]], dim=2), ref


def _chunk_maxima(keys: Tensor, chunk: int) -> Tensor:
    """The largest key of each chunk of ``chunk`` positions, per column: (B, H, N, D) -> (B, H, ceil(N / C), D)."""
    N = keys.shape[2]
    whole = N - N % chunk
    tops = keys[:, :, :whole].unflatten(2, (whole // chunk, chunk)).amax(3)
    return tops if whole == N else torch.cat([tops, keys[:, :, whole:].amax(2, keepdim=True)], dim=2)


@compiler_disabled  # data-dependent: torch.compile breaks the graph here rather than skip the check (skipped,
# a key far above the earlier ones zeroed the earlier queries' weights: outputs depended on later keys)
def _steep_chunks(rise: Tensor, limit: float) -> set[int]:
    """The chunks where the running max rises by more than ``limit``, in any (batch, head, column); rise
    (B, H, g, D). One read-back for all chunks (under torch.func.vmap: a chunk is steep if it is in any example)."""
    # A NaN rise (a NaN key) counts as 0: its outputs are NaN on either path, and a NaN max would hide the other
    # sequences' steep rises
    plain = readable(rise).nan_to_num(nan=0.0)
    flagged = plain.movedim(-2, 0).flatten(1).amax(1) > limit  # (g,)
    return {int(c) for c in flagged.cpu().nonzero().flatten()}


@compiler_disabled  # data-dependent, as _steep_chunks
def _holds_nan(x: Tensor) -> bool:
    """Whether any entry is NaN; one read-back (under torch.func.vmap, for every example at once)."""
    return bool(torch.isnan(readable(x)).any())


def _chunk_matmul(a: Tensor, ek: Tensor, v: Tensor, carry: Tensor, norm: Tensor, state: Tensor,
                  above: Tensor, finite: bool) -> Tensor:
    """One chunk with every weight relative to the chunk's final max M_c: two matmuls and a cumsum.

    Z_ic = carry_c norm_c + Σ_{j <= i} ek_jc, out_i = Σ_j (Σ_c a_ic ek_jc / Z_ic) v_j + Σ_c (a_ic carry_c / Z_ic)
    state_c."""
    C = a.shape[-2]
    z = ek.cumsum(-2) + (carry * norm)[:, :, None, :]  # (B, H, C, D): Z_ic relative to M_c
    a_over_z = safe_divide(a, z)
    p = (a_over_z @ ek.mT).masked_fill_(above[:C, :C], 0.0)  # (B, H, C, C)
    intra = p @ v if finite else causal_product(p, v, above[:C, :C])
    return intra + (a_over_z * carry[:, :, None, :]) @ state


def _chunk_explicit(a: Tensor, k: Tensor, v: Tensor, m: Tensor, ref: Tensor, norm: Tensor,
                    state: Tensor, finite: bool) -> Tensor:
    """One chunk with each query's own reference m_ic: the (C, C, D) weights exp(k_jc - m_ic), j <= i, formed
    explicitly (every factor <= 1, so no overflow and no underflow caused by later keys), in steps of rows that
    keep them within FALLBACK_ELEMENTS."""
    B, H, C, D = a.shape
    future = torch.ones(C, C, dtype=torch.bool, device=a.device).triu(1)[:, :, None]
    carry = torch.exp(ref[:, :, None, :] - m)  # (B, H, C, D): rescales the carried sums to m_i
    step = max(1, FALLBACK_ELEMENTS // max(1, B * H * C * D))
    parts = []
    for i in range(0, C, step):
        j = min(C, i + step)  # rows i..j-1 see keys 0..j-1
        w = torch.exp((k[:, :, None, :j] - m[:, :, i:j, None]).masked_fill(future[i:j, :j], float("-inf")))
        z = w.sum(-2) + carry[:, :, i:j] * norm[:, :, None, :]  # (B, H, R, D): Z_ic
        a_over_z = safe_divide(a[:, :, i:j], z)
        p = torch.einsum("bhic,bhijc->bhij", a_over_z, w)  # (B, H, R, j)
        intra = p @ v[:, :, :j] if finite else causal_product(p, v[:, :, :j], future[i:j, :j, 0])
        parts.append(intra + (a_over_z * carry[:, :, i:j]) @ state)
    return torch.cat(parts, dim=2)


def separable_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                                  key_padding_mask: Tensor | None = None) -> Tensor:
    """The naive reference: forms the (Nq, Nk) matrix A Bᵀ (causal: one column softmax per query, O(n² D))."""
    _, _, Nq, Nk, D, _ = check_qkv(q, k, v, key_padding_mask, name="separable_attention_reference")
    if D == 0:  # A (Bᵀ V) sums over the D features: nothing, whatever v holds
        return empty_attention(q, k, v)
    k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)
    a = torch.softmax(q, dim=-1)  # (B, H, Nq, D)
    if not causal:
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]
        return (a @ masked_softmax(k, keep, dim=-2).mT) @ v
    keep = keep_mask(Nq, Nk, causal=True, key_padding_mask=key_padding_mask, device=q.device)  # (., 1, Nq, Nk)
    # b[i, j, c] = softmax over j <= i of k_jc: (B, H, Nq, Nk, D)
    b = masked_softmax(k[:, :, None, :, :].expand(-1, -1, Nq, -1, -1), keep[..., None], dim=-2)
    weights = torch.einsum("bhic,bhijc->bhij", a, b)  # (B, H, Nq, Nk)
    return causal_product(weights, v, ~keep)  # a NaN or inf value reaches only the queries that see it


def separable_attention_matrix(q: Tensor, k: Tensor) -> Tensor:
    """The implied (B, H, Nq, Nk) attention matrix softmax_row(Q) softmax_col(K)ᵀ (non-causal, for claim 3.2)."""
    return torch.softmax(q, dim=-1) @ torch.softmax(k, dim=-2).mT
