r"""Kernelised (linear) attention: D⁻¹ φ(Q) (φ(K)ᵀ V) with D = diag(φ(Q) φ(K)ᵀ 1), never forming n x n.

Katharopoulos et al. 2020 ("Transformers are RNNs"); Choromanski et al. 2021 (Performers, FAVOR+).

Non-causal: φ(K)ᵀ[V, 1] is accumulated chunk by chunk ((M, Dv+1) state, stored transposed), then each chunk of
queries reads it.
Causal: the sequence is cut into chunks of C positions; inside a chunk the (C, C) lower-triangular part is a
matmul, across chunks an (M, Dv+1) state holds the prefix sums. Chunks are processed G at a time (a block) with
batched ops; only the (M, Dv+1) states are scanned chunk by chunk (two small ops each), and one crosses blocks.
O(n) memory in forward and backward, O(n C M + n M Dv) time.

Stabilisation. The output out_i = Σ_j w_ij v_j / Σ_j w_ij, w_ij = Σ_r φ_r(q_i) φ_r(k_j), is unchanged when
φ(q_i) is multiplied by any per-query factor, and when feature column r of every key is multiplied by the same
factor e^{-c_r} while column r of every query is multiplied by e^{c_r}. Feature maps that expose log-features
are never exponentiated unshifted:

* positive random features (``log_features_rowwise``; log φ_r(x) = ωᵣᵀx' - |x'|²/2 - log(M)/2 = ℓ_r(x)): the key
  shift is per feature column, c_r = max_j ℓ_r(k_j) over the keys a query may see (non-padded; causal: j <= i, a
  running prefix maximum), as separable attention's column softmax. Then
  k̂_jr = exp(ℓ_r(k_j) - c_r) <= 1, and q̂_ir = exp(ωᵣᵀq_i' + c_r - t_i) <= 1 with t_i = max_r (ωᵣᵀq_i' + c_r),
  the query offset -|q'|²/2 cancelling. At the maximising r the key column holds a 1 and q̂_ir = 1, so the
  normaliser Σ_r q̂_ir Σ_j k̂_jr is >= 1: no query ever loses all its weight to underflow, whatever the scale of
  q and k. (A single shift per key row, or per query row alone, is not enough: at |x| ~ 100 the dominant
  (key, feature) pair differs between queries and every other product underflows.) Two paths trade some of
  that margin for speed: non-causal queries are divided by their row sum (one fused softmax), so there it is
  >= 1/M; causal chunks read their queries against the chunk's final reference, so there it is >= e^-39 in
  float32 (``RISE_FRACTION``; steeper chunks are redone per query, where it is >= 1).
* trigonometric features (``log_scaled_features``; φ(x) = bounded(x) · exp(|x'|²/2)): the query factor cancels
  and is dropped; key j is scaled by exp(|k_j'|²/2 - c) with c the maximum over the keys a query may see.
* other maps (elu + 1, relu, ...) are used as they are.

Causal chunks take their keys relative to the reference at the chunk's end (every factor <= 1). That is exact as
long as the reference rises by less than ~40 (float32) inside the chunk, which is checked; a chunk where it rises
more is redone with each query's own reference (a (C, C, W) tensor of decays exp(c_jr - c_ir), W = M or 1).
Nothing after position i ever enters the output at i. Under torch.compile the check runs eagerly: the causal path
breaks the graph twice per block of chunks, at the check's two steps (so ``fullgraph=True`` works for the
non-causal path only).

The stabilisers are detached: the output does not depend on them mathematically, so their gradient is exactly
zero. Padding removes keys from φ(K) — numerator and denominator alike — and from the maxima; so does a NaN or +inf
key log-scale from the causal references (it still enters the sums, from its position on). Half-precision
inputs are computed in float32 and cast back; where scale·|x|² of a query or non-padded key would overflow the
working dtype (|x| beyond ~1e19 in float32), the call is computed in float64, and if even float64 overflows a
ValueError is raised. That switch is not made while torch.compile traces (inputs beyond ~1e19 then overflow), and
neither check runs on meta tensors (FLOP counting). On a GPU each check is a read-back: the float64 switch once per
call, and on the causal path whether the values are finite once per call and the steep-rise and non-finite-key
flags together once per block of chunks (a block with a NaN or +inf key reads back once more, and each chunk the
flags mark as possibly steep once more).

Recurrent form: the causal kernel takes the state and reference of the positions before q's and returns those
after its last (``state=`` / ``return_state=True``, :mod:`theorylab.attention.state`), so a sequence fed in
pieces gives one call's outputs; a one-position piece (decoding) takes a path without chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._checks import (
    ChunkOutputs,
    accumulation_dtype,
    can_inspect,
    causal_product,
    check_qkv,
    compiler_disabled,
    empty_attention,
    finite_values,
    keep_mask,
    lowest,
    masked_softmax,
    no_autocast,
    positive_int,
    readable,
    safe_divide,
    zero_padded,
)
from .features import PositiveRandomFeatures
from .state import LinearAttentionState, MapFingerprint, check_state, check_width, widened

# Default chunk lengths, tuned on CPU at B=1, H=8, D=64, M=256. Causal: the (C, C) intra-chunk matmul costs
# 2nCM, so C is kept small. Non-causal: about 1M feature entries per chunk (4 MB in float32: with the
# column stabiliser a chunk is read four times, and at 8 MB it ran ~10% slower on the 2-core EPYC, 2026-11-25).
CAUSAL_CHUNK = 64
CAUSAL_BLOCK_ELEMENTS = 1 << 19  # feature entries per block of chunks (2 MB in float32)
NONCAUSAL_FEATURE_ELEMENTS = 1 << 20
# On a GPU every op is a kernel launch and each causal block reads one value back to the host, while memory
# bandwidth is plentiful: far larger chunks and blocks win. Measured on an H200 (B=1, H=8, D=64, M=256, float32,
# n=65536, `benchmarks/gpu_attention.py`, 2026-11-26): causal forward 192 -> 12.8 ms (SDPA: 129 ms), non-causal
# 44 -> 8.4 ms (SDPA: 255 ms). A block's features, and its (C, C) products, then take up to 64 MiB each in
# float32.
ACCELERATOR_CAUSAL_CHUNK = 256
ACCELERATOR_FEATURE_ELEMENTS = 1 << 24
# A causal chunk is read relative to its final reference while that reference rises by at most
# RISE_FRACTION·log(1/tiny) inside it (~39 in float32): the normaliser is then >= e^-39, far above the
# sqrt(tiny) = e^-43.7 clamp of the ratio, and terms lost to underflow are below e^-48 of it.
RISE_FRACTION = 0.45
FALLBACK_ELEMENTS = 1 << 22  # entries of the (rows, C, W) decay tensor per step of a chunk's per-query fallback


def _default_sizes(device: torch.device) -> tuple[int, int, int]:
    """(causal chunk, feature entries per causal block, feature entries per non-causal chunk) on ``device``: the
    CPU sizes on CPU and meta tensors (FLOP counting), the accelerator sizes elsewhere."""
    if device.type in ("cpu", "meta"):
        return CAUSAL_CHUNK, CAUSAL_BLOCK_ELEMENTS, NONCAUSAL_FEATURE_ELEMENTS
    return ACCELERATOR_CAUSAL_CHUNK, ACCELERATOR_FEATURE_ELEMENTS, ACCELERATOR_FEATURE_ELEMENTS


def check_feature_map(feature_map: object, D: int, name: str = "linear_attention") -> None:
    """TypeError unless ``feature_map`` is an nn.Module, with ``num_features`` where it gives
    ``log_features_rowwise``; ValueError where its ``head_dim`` is not D."""
    if not isinstance(feature_map, nn.Module):
        raise TypeError(f"{name}: feature_map must be an nn.Module (a function can be wrapped in one); got "
                        f"{type(feature_map).__name__}")
    count = getattr(feature_map, "num_features", None)
    if hasattr(feature_map, "log_features_rowwise") and (isinstance(count, bool)
                                                          or not isinstance(count, numbers.Integral)):
        raise TypeError(f"{name}: a feature map with log_features_rowwise must give its number of features M as an "
                        f"int attribute num_features; {type(feature_map).__name__} has none")
    fm_dim = getattr(feature_map, "head_dim", None)
    if fm_dim is not None and fm_dim != D:
        raise ValueError(f"{name}: the feature map's head_dim is {fm_dim} but q and k have head dim D={D}")


def _map_dtype(feature_map: nn.Module) -> torch.dtype | None:
    """The dtype of the map's first floating parameter, else of its first floating buffer (the stock maps' random
    features), else None (a map of no tensors, such as elu + 1)."""
    for tensors in (feature_map.parameters(), feature_map.buffers()):  # loops: torch 2.4's dynamo cannot trace
        for t in tensors:                                                # next() with a default
            if t.is_floating_point():
                return t.dtype
    return None


class _RowwiseLogFeatures(Protocol):
    """What :class:`_ColumnShifted` reads of a feature map besides the nn.Module: PositiveRandomFeatures' methods
    (duck-typed; ``project`` is called only on that stock map)."""

    num_features: int

    def log_features_rowwise(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def project(self, x: Tensor) -> Tensor: ...


class _LogFeatures(Protocol):
    """A positive map that gives log φ (PositiveRandomFeatures, or any map with the same method)."""

    def log_features(self, x: Tensor) -> Tensor: ...


class _ColumnShifted:
    """Positive maps exposing log φ = ωᵀx' + offset(x): one stabiliser c_r per feature column (W = M)."""

    positive = True
    scaled = True

    def __init__(self, fm: nn.Module, map_dtype: torch.dtype | None) -> None:
        log_map = cast(_RowwiseLogFeatures, fm)  # _terms checked that it has log_features_rowwise
        count = int(log_map.num_features)  # any integer type (check_feature_map): torch's sizes want an int
        self.fm, self.width, self.num_features = fm, count, count
        # queries need ωᵀq' alone (their offset is a per-row factor and cancels): ``project`` gives it without the
        # offset, but only the stock map is known to return project(x) first; a map that overrides
        # log_features_rowwise (or merely has a ``project`` attribute) goes through log_features_rowwise
        stock = getattr(type(fm), "log_features_rowwise", None) is PositiveRandomFeatures.log_features_rowwise
        # a custom map may return its input (or a view of it) as the projection: the kernel works in place on
        # what it is given, so such a projection is copied first (the stock map's is always a new tensor)
        self.stock = stock
        # a map of one's own is checked, and given float32 inputs in its own half precision (the stock map casts)
        rowwise = log_map.log_features_rowwise if stock else _checked_pair(
            _in_dtype(log_map.log_features_rowwise, _half(map_dtype)), fm, "log_features_rowwise", count)
        self.rowwise = rowwise
        self.project = log_map.project if stock else (lambda x: rowwise(x)[0].clone())

    def keys(self, k: Tensor, pad: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """(None, ℓ(k) of shape (B, H, C, M), -inf where padded): φ(k) = exp(ℓ)."""
        proj, offset = self.rowwise(k)  # (B, H, C, M), (B, H, C)
        logw = proj.add_(offset[..., None]) if self.stock else proj + offset[..., None]
        if pad is not None:
            logw = logw.masked_fill_(pad[..., None], float("-inf"))
        return None, logw

    def prepare_queries(self, q: Tensor) -> Tensor:
        return self.project(q)

    def query_features(self, proj: Tensor, ref: Tensor, *, sum_to_one: bool = False) -> Tensor:
        """q̂ = exp(ωᵀq' + c - t), t the row max, for references c broadcastable to proj's (..., W = M);
        overwrites proj. ``sum_to_one``: q̂ / Σ_r q̂ instead (one fused softmax rather than three passes; the
        output's normaliser is then >= 1/M instead of >= 1, which the non-causal path can afford)."""
        # max_r c_r, a per-row constant, leaves first: ωᵀq' is then added to numbers of its own size, not to
        # c_r ~ -|k'|²/2, which would round it at the ulp of |k'|²
        shifted = proj.add_(ref - ref.amax(-1, keepdim=True))  # in place: proj is this call's own
        if sum_to_one:
            return torch.softmax(shifted, dim=-1)
        return shifted.sub_(shifted.detach().amax(-1, keepdim=True)).exp_()


#: a map's ``log_scaled_features``: x -> (bounded features, per-row log-scale)
_Split = Callable[[Tensor], tuple[Tensor, Tensor]]


class _RowScaled:
    """Maps φ(x) = bounded(x) · exp(log-scale(x)) with a per-row log-scale (``log_scaled_features``; W = 1), and
    maps used as they are (no log-scale)."""

    positive = False
    width = 1
    #: ``log_scaled_features`` of the map (split into bounded features and per-row log-scale), or None
    split: _Split | None
    num_features: int

    def __init__(self, fm: nn.Module, D: int, map_dtype: torch.dtype | None) -> None:
        self.fm = fm
        split = getattr(fm, "log_scaled_features", None)
        # a map kept in half precision (model.to(torch.bfloat16)) is given its float32 inputs in its own dtype: the
        # features, not the map, are accumulated in float32 (float64 inputs are not narrowed: the map refuses
        # them as torch's layers do)
        self.half = _half(map_dtype)
        self.split = None if split is None else _checked_pair(_in_dtype(split, self.half), fm, "log_scaled_features")
        self.scaled = self.split is not None
        self.num_features = int(getattr(fm, "num_features", None) or D)

    def keys(self, k: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """(bounded features (B, H, C, M), 0 where padded; log-scale (B, H, C, 1), -inf where padded)."""
        if self.split is not None:  # i.e. self.scaled
            base, log_scale = self.split(k)
            logw = log_scale[..., None].clone()  # not a view: _key_features works on it in place (see _causal_block)
        else:
            base = self._features(k)
            logw = base.new_zeros(base.shape[:-1] + (1,))
        if pad is not None:
            base = base.masked_fill(pad[..., None], 0.0)
            logw = logw.masked_fill(pad[..., None], float("-inf"))
        return base, logw

    def prepare_queries(self, q: Tensor) -> Tensor:
        if self.split is not None:
            return self.split(q)[0]  # the query's own scale cancels
        # a plain map: each query's features scaled to max-abs 1 (its scale cancels too), so that small inputs
        # (relu features of q, k ~ 1e-10 in float32) do not put φ(q)ᵀΣφ(k) under safe_divide's threshold
        f = self._features(q)
        if f.shape[-1] == 0:  # no features (heads of width 0, or a map that gives none): every normaliser is 0
            return f
        return f / f.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)

    def query_features(self, prepared: Tensor, ref: Tensor, *, sum_to_one: bool = False) -> Tensor:
        return prepared

    def _features(self, x: Tensor) -> Tensor:
        f = self.fm(x if self.half is None or x.dtype != torch.float32 else x.to(self.half))
        _check_features(f, x, self.fm, "its output")
        return f.to(x.dtype)


def _half(dtype: torch.dtype | None) -> torch.dtype | None:
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _in_dtype(split: _Split, half: torch.dtype | None) -> _Split:
    """``split`` called on float32 inputs cast to ``half`` (a map kept in half precision), its outputs cast back."""
    if half is None:
        return split

    def call(x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dtype != torch.float32:
            return split(x)
        first, second = split(x.to(half))
        return first.to(x.dtype), second.to(x.dtype)

    return call


def _checked_pair(split: _Split, fm: nn.Module, hook: str, count: int | None = None) -> _Split:
    """``split`` whose pair of outputs is checked: (..., N, M) features, M = ``count`` when given, and (..., N)."""

    def call(x: Tensor) -> tuple[Tensor, Tensor]:
        out = split(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"linear_attention: the feature map's {hook} must return a pair of tensors; "
                             f"{type(fm).__name__}'s returned {type(out).__name__}")
        first, second = out
        _check_features(first, x, fm, f"{hook}'s first tensor", count)
        if not isinstance(second, Tensor) or second.shape != x.shape[:-1]:
            got = _shape_text(second.shape) if isinstance(second, Tensor) else f"a {type(second).__name__}"
            raise ValueError(f"linear_attention: the feature map's {hook} must return a second tensor of one value "
                             f"per row, (..., n); for inputs {_shape_text(x.shape)} {type(fm).__name__}'s is {got}")
        return first.to(x.dtype), second.to(x.dtype)

    return call


def _check_features(f: object, x: Tensor, fm: nn.Module, what: str, count: int | None = None) -> None:
    """ValueError naming the map unless ``f`` is a floating tensor of shape (*x.shape[:-1], M) (M = count)."""
    ok = (isinstance(f, Tensor) and f.is_floating_point() and f.dim() == x.dim() and f.shape[:-1] == x.shape[:-1]
          and (count is None or f.shape[-1] == count))
    if not ok:
        got = f"{_shape_text(f.shape)} {f.dtype}" if isinstance(f, Tensor) else f"a {type(f).__name__}"
        want = f"M = {count}" if count is not None else "M"
        raise ValueError(f"linear_attention: the feature map {type(fm).__name__} must map (..., n, D) to "
                         f"floating-point features (..., n, {want}); for inputs {_shape_text(x.shape)} {what} is "
                         f"{got}")


def _shape_text(shape: torch.Size) -> str:
    """The last two sizes of a shape, as the feature maps see them: the kernels call them on chunks."""
    return "(..., " + ", ".join(map(str, tuple(shape)[-2:])) + ")" if len(shape) > 2 else str(tuple(shape))


def _terms(fm: nn.Module, D: int, map_dtype: torch.dtype | None) -> _ColumnShifted | _RowScaled:
    if hasattr(fm, "log_features_rowwise"):
        return _ColumnShifted(fm, map_dtype)
    return _RowScaled(fm, D, map_dtype)


def _key_features(terms: _ColumnShifted | _RowScaled, base: Tensor | None, logw: Tensor, ref: Tensor) -> Tensor:
    """k̂ = base · exp(logw - ref) (in place on logw), ref broadcastable to logw; every factor <= 1."""
    if not terms.scaled:
        return cast(Tensor, base)  # maps without a log-scale always give their features as base
    e = logw.sub_(ref).exp_()
    return e if base is None else base * e


#: float32 serves while the features' log-scale, rounded at float32's ulp, is off by at most this (nats; in
#: weights, relative). Measured (FAVOR+, D = 8, M = 32, q and k of one norm): the output's largest error against
#: the float64 log-domain reference is ~0.1 of the bound below: 2.7e-5 at |x| = 30, 2e-4 at 100, 3e-3 at 1000; at
#: |x| = 1e6, where -|k|²/2 (5e11) swamps the ωᵀk (1e6) that tells keys apart, it was 3.2 (review, 2026-11-26)
FLOAT32_LOG_SCALE_ERROR = 2.0**-10


def _working_dtype(q: Tensor, k: Tensor, pad: Tensor | None, fm: nn.Module, acc: torch.dtype) -> torch.dtype:
    """acc, or float64 where scale·|x|² (the log-scale of the features) of a query or a non-padded key is so large
    that acc's rounding of it exceeds :data:`FLOAT32_LOG_SCALE_ERROR` (float32 and narrower) or could overflow
    acc; ValueError where it could overflow float64 too."""
    scale = float(getattr(fm, "scale", 1.0))
    limit = torch.finfo(acc).max / 16
    if acc != torch.float64:
        limit = min(limit, FLOAT32_LOG_SCALE_ERROR / torch.finfo(acc).eps)

    def bound(top: float) -> float:
        """>= scale·|x|² for every row with entries of magnitude <= top (Python floats: inf, never an error)."""
        return top * top * q.shape[-1] * scale

    # whole-tensor reductions (one read-back): ~10x faster than per-row ones, which cost a few % of a FAVOR+
    # call; they decide alone unless the keys are large and some are padded (padded keys must not count)
    # under torch.func.vmap the reductions read every example's values (readable): one decision for them all
    (q_min, q_max), (k_min, k_max) = torch.aminmax(readable(q).detach()), torch.aminmax(readable(k).detach())
    tops = torch.stack([torch.maximum(q_max, -q_min), torch.maximum(k_max, -k_min)]).cpu()
    q_top, k_top = tops[0].item(), tops[1].item()  # not tolist(): torch 2.4 refuses it under torch.func.grad
    if pad is not None and not bound(k_top) < limit:
        k_min, k_max = torch.aminmax(k.detach(), dim=-1)  # (B, H, Nk) each; no |k| temporary
        k_top = float(readable(torch.maximum(k_max, -k_min).masked_fill(pad, 0.0)).amax())
    big = max(q_top, k_top) if not (math.isnan(q_top) or math.isnan(k_top)) else math.nan
    if not math.isfinite(big):  # inf or NaN inputs: nothing a wider dtype would fix
        return acc
    if bound(big) < limit:
        return acc
    if bound(big) < torch.finfo(torch.float64).max / 16:
        return torch.float64
    raise ValueError(f"linear_attention: inputs too large for {type(fm).__name__}: max |x| = {big:.3g}, so "
                     f"scale·|x|² (the features' log-scale) overflows even float64")


@overload
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                     recompute: bool = False, state: LinearAttentionState | None = None,
                     return_state: Literal[False] = False) -> Tensor: ...
@overload
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                     recompute: bool = False, state: LinearAttentionState | None = None,
                     return_state: Literal[True]) -> tuple[Tensor, LinearAttentionState]: ...
@overload
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                     recompute: bool = False, state: LinearAttentionState | None = None,
                     return_state: bool = False) -> Tensor | tuple[Tensor, LinearAttentionState]: ...
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *, causal: bool = False,
                     key_padding_mask: Tensor | None = None, chunk_size: int | None = None,
                     recompute: bool = False, state: LinearAttentionState | None = None,
                     return_state: bool = False) -> Tensor | tuple[Tensor, LinearAttentionState]:
    """Kernelised attention out_i = Σ_j φ(q_i)ᵀφ(k_j) v_j / Σ_j φ(q_i)ᵀφ(k_j), in O(n) time and memory.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv), floating point.
        feature_map: φ, an nn.Module mapping (..., N, D) -> (..., N, M) (e.g. PositiveRandomFeatures,
            EluFeatures, or one's own: what the kernels read of it, docs/attention.md "A feature map of your own").
        causal: query i sees keys j <= i only (needs Nq == Nk).
        key_padding_mask: bool (B, Nk), True = padding (removed from φ(K)).
        chunk_size: positions per chunk (None: a default that keeps a chunk's features small: cache-sized
            on CPU, larger on a GPU, where launches and read-backs cost more than memory traffic).
        recompute: under autograd, keep only each block of chunks' inputs and entering state for the backward
            pass and recompute its features there (activation checkpointing, block by block). Gradients are
            bit-identical; forward+backward needs ~3x less memory and ~1.4x the time (n=8192, M=256, H=8 on CPU).
            The feature map must not change between forward and backward (a RuntimeError says so if it did)
            nor depend on train/eval mode. Ignored without autograd, under torch.compile and torch.func.
        state: causal only: the :class:`~theorylab.attention.state.LinearAttentionState` of the positions
            before this call's (from ``return_state=True``); q, k, v are the next positions. Feeding a sequence in
            pieces (a prompt, then one token at a time) gives the outputs of one call on the whole sequence, up
            to rounding, at a cost per position that does not grow with the prefix (the recurrent form of
            Katharopoulos et al. 2020). The state is in float64 once any piece needed it (see below); its
            autograd history is kept (``state.detach()`` cuts it).
        return_state: causal only: also return the state after this call's positions.

    Returns:
        (B, H, Nq, Dv) in the dtype of q, and with ``return_state=True`` a tuple (output, state). A query whose
        normaliser is zero (no visible key; Nk = 0), or below √tiny of the dtype in magnitude (each query's
        features scaled to max-abs 1; features of a query and keys that barely overlap), gets zeros. A NaN or
        inf key or value reaches only the queries that see it (causal: the positions from its own on; a value
        under torch.compile or torch.export: from its chunk's start).

    Raises:
        TypeError: feature_map is not an nn.Module (or gives log_features_rowwise without an int
            num_features); q, k or v is not floating point, chunk_size is not an integer, recompute or return_state not
            a bool, or state not a LinearAttentionState.
        ValueError: shapes, mask or chunk_size are wrong; state or return_state without causal; a state of other
            shapes, on another device, or made with other features (another map, or this one redrawn); or the
            inputs are so large that the features' log-scale overflows float64.
    """
    B, H, Nq, Nk, D, Dv = check_qkv(q, k, v, key_padding_mask, name="linear_attention")
    check_feature_map(feature_map, D)
    if causal and Nq != Nk:
        raise ValueError(f"linear_attention: causal needs Nq == Nk; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, what="chunk_size", name="linear_attention")
    for what, flag in (("recompute", recompute), ("return_state", return_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"linear_attention: {what} must be a bool; got {flag!r}")
    if (state is not None or return_state) and not causal:
        raise ValueError("linear_attention: state and return_state apply to causal attention (causal=True)")
    out_dtype = q.dtype
    map_dtype = _map_dtype(feature_map)
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, map_dtype or torch.float32)
    pad = key_padding_mask[:, None, :] if key_padding_mask is not None else None  # (B, 1, Nk)
    terms = _terms(feature_map, D, map_dtype)
    if state is not None:
        state = check_state(state, feature_map, kind="linear", B=B, H=H, Dv=Dv, W=terms.width, device=q.device)
    if B * H * Nq * Nk == 0 or terms.num_features == 0:  # nothing to attend to (or no query, or no feature)
        out = empty_attention(q.to(acc), k.to(acc), v.to(acc)).to(out_dtype)
        if not return_state:
            return out
        state = state if state is not None else _initial_state(terms, k.to(acc), Dv)
        return out, dataclasses.replace(state, length=state.length + Nq)  # B or H = 0: positions still pass
    if terms.scaled and can_inspect(q):
        acc = _working_dtype(q, k, pad, feature_map, acc)
    kv, ref = None, None
    if state is not None:  # a state from float64 pieces keeps later ones in float64
        acc = torch.promote_types(acc, state.kv.dtype)
        kv, ref = widened(state, acc)
    # padded keys are removed from φ(K); their rows are zeroed before the feature map too, or the backward pass
    # multiplies the mask's zero by the map's derivative at a NaN, inf or overflowing key (0·NaN in k.grad)
    q, k, v = q.to(acc), zero_padded(k.to(acc), key_padding_mask), zero_padded(v.to(acc), key_padding_mask)
    causal_chunk, block_elements, noncausal_elements = _default_sizes(q.device)
    with no_autocast(q.device):
        if causal and Nq == 1:  # one position (decoding a token): no chunks, a dozen small ops
            out, kv, ref = _causal_step(q, k, v, terms, pad, kv, ref)
        elif causal:  # chunks no longer than the sequence: a chunk_size set for long ones must not cost memory here
            out, kv, ref = _causal(q, k, v, terms, pad, min(chunk_size or causal_chunk, Nq), recompute,
                                   block_elements, kv, ref)
        else:
            chunk = chunk_size or max(16, noncausal_elements // max(1, B * H * terms.num_features))
            out = _noncausal(q, k, v, terms, pad, min(chunk, max(Nq, Nk)), recompute)
    if not return_state:
        return out.to(out_dtype)
    length = (state.length if state is not None else 0) + Nq
    return out.to(out_dtype), LinearAttentionState(cast(Tensor, kv), cast(Tensor, ref), length,
                                                   fingerprint=MapFingerprint(feature_map))


def _initial_state(terms: _ColumnShifted | _RowScaled, k: Tensor, Dv: int) -> LinearAttentionState:
    """The state before any position: no keys summed, none seen (for a call with nothing to attend to)."""
    base, logw = terms.keys(k[:, :, :0], None)  # the feature width M, from the map itself
    M = (logw if base is None else base).shape[-1]
    B, H = k.shape[:2]
    kv = k.new_zeros(B, H, Dv + 1, M)
    return LinearAttentionState(kv, k.new_full((B, H, terms.width), lowest(k.dtype)), 0,
                                fingerprint=MapFingerprint(terms.fm))


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1]: (..., N, Dv) -> (..., N, Dv + 1); the last column accumulates the normaliser."""
    return F.pad(v, (0, 1), value=1.0)


def _ratio(num: Tensor, Dv: int, positive: bool) -> Tensor:
    """num[..., :Dv] / num[..., Dv:], the normalised output of a chunk of queries.

    Positive features have a normaliser >= 0 (with a visible key: >= 1/M non-causal, >= e^-39 causal in float32):
    clamping it at sqrt(smallest normal) keeps the output bounded and the gradients finite in one cheap pass
    over a column. Other maps (trigonometric features can make it negative) go through :func:`safe_divide`."""
    if positive:
        return num[..., :Dv] / num[..., Dv:].clamp_min(torch.finfo(num.dtype).tiny ** 0.5)
    return safe_divide(num[..., :Dv], num[..., Dv:])


def _accumulate(state: Tensor | None, decay: Tensor | None, kf: Tensor, v1: Tensor) -> Tensor:
    """state · decay + v1ᵀ kf, the state kept transposed ((B, H, Dv + 1, M); decay broadcastable, None = 1):
    with kf the untransposed operand the batched matmul runs ~20% faster on CPU. Without autograd the state is
    updated in place (one batched addmm, no temporaries of the state's size), outside torch.func."""
    if state is None:
        return v1.mT @ kf
    if torch.is_grad_enabled() or _functorch_active():  # vmap has no batching rule for baddbmm's out=
        return (state if decay is None else state * decay) + v1.mT @ kf
    if decay is not None:
        state.mul_(decay)
    B, H, C, M = kf.shape
    flat = state.view(B * H, -1, M)
    torch.baddbmm(flat, v1.reshape(B * H, C, -1).mT, kf.reshape(B * H, C, M), out=flat)  # seen by FLOP counters
    return state


def _noncausal(q: Tensor, k: Tensor, v: Tensor, terms: _ColumnShifted | _RowScaled, pad: Tensor | None,
               chunk: int, recompute: bool) -> Tensor:
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    recompute = recompute and max(Nq, Nk) > chunk and _needs_grad(q, k, v, terms)
    # keys in groups of chunks: a checkpointed group keeps its entering (Dv + 1, M) state for the backward pass,
    # so it must span well over Dv + 1 keys to save memory (a group of one short chunk would add memory)
    group = chunk * (max(1, -(-4 * (Dv + 1) // chunk)) if recompute else 1)
    add_keys = _checkpointed(terms.fm, _add_keys) if recompute else _add_keys
    read_queries = _checkpointed(terms.fm, _read_queries) if recompute else _read_queries
    state = None  # (B, H, Dv + 1, M): Σ_j [v_j, 1] k̂_jᵀ, keys relative to ref
    ref = None  # (B, H, W): the running maximum of the key log-scales (per column, or per row when W = 1)
    # chunks via split, not slicing: a slice's backward writes its gradient into a zero tensor of the full length
    pads = pad.split(group, dim=2) if pad is not None else [None] * len(range(0, Nk, group))
    for k_g, v_g, pad_g in zip(k.split(group, dim=2), v.split(group, dim=2), pads, strict=True):
        state, ref = add_keys(terms, chunk, k_g, v_g, pad_g, state, ref)
    state, ref = cast(Tensor, state), cast(Tensor, ref)  # set by the first group of keys (Nk > 0 here)
    out = ChunkOutputs(q, (B, H, Nq, Dv))
    for s, q_c in zip(range(0, Nq, chunk), q.split(chunk, dim=2), strict=True):
        out.write(s, s + q_c.shape[2], read_queries(terms, q_c, state, ref))
    return out.result()


def _add_keys(terms: _ColumnShifted | _RowScaled, chunk: int, k: Tensor, v: Tensor, pad: Tensor | None,
              state: Tensor | None, ref: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keys added to the state (B, H, Dv + 1, M) chunk by chunk, both relative to the running maximum of the key
    log-scales ref (B, H, W) (per column, or per row when W = 1); returns the new (state, ref)."""
    floor = lowest(k.dtype)
    pads = pad.split(chunk, dim=2) if pad is not None else [None] * len(range(0, k.shape[2], chunk))
    for k_c, v_c, pad_c in zip(k.split(chunk, dim=2), v.split(chunk, dim=2), pads, strict=True):
        base, logw = terms.keys(k_c, pad_c)  # (B, H, C, M) | None, (B, H, C, W)
        top = logw.detach().amax(2).clamp_min_(floor)  # (B, H, W); floor: no visible key yet
        new_ref = top if ref is None else torch.maximum(ref, top)
        kf = _key_features(terms, base, logw, new_ref[:, :, None])  # (B, H, C, M); 0 where padded
        # <= 1; ref is a tensor wherever state is (both None before the first chunk)
        decay = torch.exp(cast(Tensor, ref) - new_ref)[:, :, None] if terms.scaled and state is not None else None
        state = _accumulate(state, decay, kf, _with_ones(v_c))
        ref = new_ref
    return cast(Tensor, state), cast(Tensor, ref)  # k has at least one chunk: both are set


def _read_queries(terms: _ColumnShifted | _RowScaled, q_c: Tensor, state: Tensor, ref: Tensor) -> Tensor:
    """The outputs (B, H, C, Dv) of one chunk of queries reading the final state."""
    qf = terms.query_features(terms.prepare_queries(q_c), ref[:, :, None], sum_to_one=True)  # (B, H, C, M)
    return _ratio(qf @ state.mT, state.shape[2] - 1, terms.positive)  # (B, H, C, Dv + 1) -> Dv


def _checkpointed(fm: nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn under activation checkpointing: autograd keeps only its arguments and calls it again in the backward
    pass (non-reentrant, so the gradients are those of fn itself).

    The recomputation must see the feature map of the forward pass (the plain path keeps the forward's features).
    The map's parameters and buffers are kept as they were when this wrapper was made. If the module holds other
    tensors by then (``torch.func.functional_call`` puts its own back after the call; an assignment), those kept
    are put in place for the recomputation and restored after. If one of them was changed in place (``redraw()``,
    an optimizer step), the forward's features are gone, and the call raises RuntimeError rather than compute
    wrong gradients. (A map whose forward depends on train/eval mode or updates state, such as BatchNorm, is not
    suitable for recomputation at all.)"""
    kept = [*fm.named_parameters(remove_duplicate=False), *fm.named_buffers(remove_duplicate=False)]
    versions = [t._version for _, t in kept]

    def unchanged(*args: Any) -> Any:
        if [t._version for _, t in kept] != versions:
            raise RuntimeError("linear_attention(recompute=True): the feature map changed between the forward and "
                               "the backward pass (redraw() or an in-place update of its parameters or buffers), "
                               "so recomputing its features would give wrong gradients; change it after "
                               "backward(), or use recompute=False")
        with _holding(fm, kept):
            return fn(*args)

    return lambda *args: checkpoint(unchanged, *args, use_reentrant=False)


@contextlib.contextmanager
def _holding(fm: nn.Module, kept: list[tuple[str, Tensor]]) -> Iterator[None]:
    """``fm`` with the tensors ``kept`` (dotted name, tensor) in place of whatever it holds now; restored after."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for name, tensor in kept:
            owner_name, _, attr = name.rpartition(".")
            owner = fm.get_submodule(owner_name)
            slots = cast("dict[str, Any]", owner._parameters if attr in owner._parameters else owner._buffers)
            if attr not in slots:
                raise RuntimeError(f"linear_attention(recompute=True): the feature map no longer has {name!r}, "
                                   f"which the forward pass used; use recompute=False")
            if slots[attr] is not tensor:
                swapped.append((slots, attr, slots[attr]))
                slots[attr] = tensor  # may be a plain tensor where a Parameter sits, as functional_call does
        yield
    finally:
        for slots, attr, previous in reversed(swapped):
            slots[attr] = previous


def _causal(q: Tensor, k: Tensor, v: Tensor, terms: _ColumnShifted | _RowScaled, pad: Tensor | None,
            chunk: int, recompute: bool, block_elements: int, state: Tensor | None,
            ref: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Causal chunked attention, G chunks of C positions at a time (a block of about ``block_elements`` feature
    entries).

    Inside a block the heavy steps are one batched op over its G chunks — features, the (C, C) intra-chunk
    products, each chunk's contribution kᵀ[v, 1], the reads of the entering states. Only the states themselves
    are a scan over the chunks, two small (M, Dv + 1) ops per chunk (T_c = S_c · e^{r_{c-1} - r_c},
    S_{c+1} = T_c + contrib_c). So the Python loop over large ops (and the number of large parallel regions,
    which is what a busy machine punishes) runs over blocks, not chunks. (The scan replaced a (G+1, G)
    lower-triangular einsum over the contributions, whose per-column weights made it B·H·M tiny matmuls: it and
    its broadcasts took ~45% of a causal call at n=16384.)

    With m_j the running prefix maximum of the key log-scales (per column: m_jr) and r_c its value at the end of
    chunk c: chunk c's keys are k̂_j = exp(ℓ(k_j) - r_c) <= 1 and its queries are read relative to r_c; the state
    S_c entering chunk c is kept relative to r_{c-1}, so every exponent is <= 0. Where m rises by more than the
    limit inside a chunk, that chunk is redone with each query's own m_i (:func:`_chunk_per_query`).

    ``state`` (B, H, Dv + 1, M) and ``ref`` (B, H, W) are those of the positions before q's (None: none); returns
    the outputs and the state and reference after the last position."""
    B, H, N, _ = q.shape
    Dv, W, M = v.shape[-1], terms.width, terms.num_features
    # chunks per block: G·C rows of features and the G (C, C) intra-chunk products within the budget (the products
    # outgrow the features when C > M: few features, or a GPU's long chunks), and the G states its queries read,
    # G·M·(Dv + 1), within twice the budget (they outgrow the features for small chunks: C < Dv + 1)
    per_chunk = max(1, B * H * M)
    G = max(1, min(block_elements // (B * H * max(M, chunk) * chunk),
                   2 * block_elements // (per_chunk * (Dv + 1))))
    block = G * chunk
    recompute = recompute and N > block and _needs_grad(q, k, v, terms)
    block_fn = _checkpointed(terms.fm, _causal_block) if recompute else _causal_block
    finite = finite_values(v)  # else the intra-chunk products go through causal_product
    out = ChunkOutputs(q, (B, H, N, Dv))
    # state (B, H, Dv + 1, M): Σ_{j < block start} [v_j, 1] k̂_jᵀ (transposed, see _accumulate), None before any
    # key; ref (B, H, W): m at the end of the previous block
    if ref is None:
        ref = q.new_full((B, H, W), lowest(q.dtype))
    pads = pad.split(block, dim=2) if pad is not None else [None] * len(range(0, N, block))
    blocks = zip(range(0, N, block), q.split(block, dim=2), k.split(block, dim=2), v.split(block, dim=2), pads,
                 strict=True)
    for s, q_b, k_b, v_b, pad_b in blocks:
        result, state, ref = block_fn(terms, chunk, q_b, k_b, v_b, pad_b, state, ref, finite)
        out.write(s, s + q_b.shape[2], result)
        del result  # without autograd, out holds a copy: free this block's before the next one is computed
    return out.result(), cast(Tensor, state), ref  # N >= 1: at least one block set the state


def _causal_step(q: Tensor, k: Tensor, v: Tensor, terms: _ColumnShifted | _RowScaled, pad: Tensor | None,
                 state: Tensor | None, ref: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention at one position i: S_i = S_{i-1} e^{r_{i-1} - r_i} + [v_i, 1] k̂_iᵀ with r_i = max(r_{i-1},
    ℓ(k_i)) and k̂_i = φ(k_i) e^{-r_i}, then out_i = q̂_i S_iᵀ normalised, q̂_i read against r_i (its own
    reference, so never steep). The same sums as :func:`_causal`'s chunks, without their bookkeeping (which
    costs ~10x more than the arithmetic at one position). q, k, v (B, H, 1, ·); returns (out, S_i, r_i)."""
    Dv = v.shape[-1]
    base, logw = terms.keys(k, pad)  # (B, H, 1, M) | None, (B, H, 1, W)
    top = _finite_or_neginf(logw.detach()[:, :, 0])  # (B, H, W); -inf where padded, as the chunks' references
    new_ref = top.clamp_min(lowest(q.dtype)) if ref is None else torch.maximum(ref, top)
    kf = _key_features(terms, base, logw, new_ref[:, :, None])  # (B, H, 1, M) <= 1; 0 where padded
    check_width(state, kf)
    v1 = _with_ones(v).mT  # (B, H, Dv + 1, 1): with kf an outer product
    state = v1 * kf if state is None else torch.addcmul(state * torch.exp(cast(Tensor, ref) - new_ref)[:, :, None],
                                                        v1, kf)
    qf = terms.query_features(terms.prepare_queries(q), new_ref[:, :, None])  # (B, H, 1, M)
    return _ratio(qf @ state.mT, Dv, terms.positive), state, new_ref


def _needs_grad(q: Tensor, k: Tensor, v: Tensor, terms: _ColumnShifted | _RowScaled) -> bool:
    """Whether autograd records this call, outside torch.compile (which plans its own recomputation) and torch.func
    transforms (which do not support the saved-tensor hooks of checkpointing)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _functorch_active():
        return False
    return any(x.requires_grad for x in (q, k, v)) or any(p.requires_grad for p in terms.fm.parameters())


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # private, so looked up defensively
    return bool(active()) if active is not None else False


def _causal_block(terms: _ColumnShifted | _RowScaled, chunk: int, q_b: Tensor, k_b: Tensor, v_b: Tensor,
                  pad_b: Tensor | None, state: Tensor | None, ref: Tensor,
                  finite: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One block of G chunks: its outputs (B, H, L, Dv), the state leaving it and the reference m at its end.

    state (B, H, Dv + 1, M) | None enters relative to ref (B, H, W), m at the end of the previous block; finite:
    False when the values may hold a NaN or inf (:func:`~theorylab.attention._checks.causal_product`)."""
    B, H = q_b.shape[:2]
    Dv = v_b.shape[-1]
    floor = lowest(q_b.dtype)
    limit = RISE_FRACTION * -math.log(torch.finfo(q_b.dtype).tiny)
    # the check reads values back; under torch.compile it runs eagerly (a graph break, see _steep_chunks); on meta
    # tensors (FLOP counting) it is skipped and the fast path is what is counted
    check = terms.scaled and q_b.device.type != "meta"
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=q_b.device).triu(1)  # j > i: the future
    L = q_b.shape[2]
    extra = -L % chunk  # the last block is padded to whole chunks with masked keys (its outputs dropped)
    if extra:
        q_b, k_b, v_b = (F.pad(x, (0, 0, 0, extra)) for x in (q_b, k_b, v_b))
        pad_b = F.pad(pad_b if pad_b is not None else q_b.new_zeros(B, 1, L, dtype=torch.bool), (0, extra),
                      value=True)
    g = (L + extra) // chunk
    # features of the inputs split into chunks, not split afterwards: query_features and _key_features work in
    # place, and in place on a view (an unflattened tensor) autograd copies the whole gradient of what it views,
    # twice (CopySlices: a fifth of causal FAVOR+'s forward+backward at n = 4096, d = 32, m = 256)
    pad_g = None if pad_b is None else pad_b.unflatten(2, (g, chunk))
    prepared = terms.prepare_queries(q_b.unflatten(2, (g, chunk)))  # (B, H, g, C, M)
    base, logw = terms.keys(k_b.unflatten(2, (g, chunk)), pad_g)  # (B, H, g, C, M) | None, (B, H, g, C, W)
    # r_c = m at the end of chunk c: a max per chunk, then a running max over the g chunks (the per-position
    # m_j is needed only in chunks redone per query)
    top = logw.detach().amax(3)  # (B, H, g, W): each chunk's largest key log-scale
    ends, before = _chunk_references(top, ref)
    steep: dict[int, Any] = {}  # chunk -> its m_j
    if check:  # one read-back per block: the chunks that may be steep, and whether a key is NaN or +inf
        flagged, bad = _read_flags(_rise_bound(logw, before) > limit, _nan_or_posinf(top))
        if bad:  # such a key is kept out of the references (rare: a second pass and read-back)
            ends, before = _chunk_references(_finite_or_neginf(logw.detach()).amax(3), ref)
            flagged = _flagged_chunks(_rise_bound(logw, before) > limit)
        steep = _steep_chunks(logw, before, floor, limit, flagged)
    for c in steep:  # keep those chunks' queries: query_features overwrites prepared
        steep[c] = (steep[c], prepared[:, :, c].clone())
    qf = terms.query_features(prepared, ends[:, :, :, None])  # (B, H, g, C, M), relative to r_c
    kf = _key_features(terms, base, logw, ends[:, :, :, None])  # (B, H, g, C, M) <= r_c; overwrites logw
    v1 = _with_ones(v_b).unflatten(2, (g, chunk))  # (B, H, g, C, Dv + 1)
    p = (qf @ kf.mT).masked_fill_(above, 0.0)  # (B, H, g, C, C): intra-chunk weights, j <= i
    num = p @ v1 if finite else causal_product(p, v1, above)  # (B, H, g, C, Dv + 1)
    del p
    contrib = (v1.mT @ kf).unbind(2)  # g x (B, H, Dv + 1, M): each chunk's keys relative to its own r_c
    check_width(state, contrib[0])
    # the scan over the chunks: S_c enters chunk c relative to before[c]; T_c is S_c relative to r_c
    carry = torch.exp(before[:, :, :-1] - ends)[:, :, :, None]  # (B, H, g, 1, W) <= 1: before[c] -> r_c
    entering, read = {}, []  # S_c of the steep chunks, T_c of every chunk
    for c in range(g):
        if c in steep:
            entering[c] = torch.zeros_like(contrib[c]) if state is None else state
        read.append(None if state is None else state * carry[:, :, c])
        state = contrib[c] if state is None else read[c] + contrib[c]  # relative to r_c = before[c + 1]
    if any(t is not None for t in read):  # (B, H, g, C, Dv + 1)
        total = num + qf @ _stack_states(read, contrib[0]).mT
    else:  # the sequence's first chunk alone: no state has entered yet
        total = num
    if steep:  # chunks where m rises too much for one reference: redo them per query
        parts = list(total.unbind(2))
        for c, (run, prepared_c) in steep.items():
            rows = slice(c * chunk, (c + 1) * chunk)
            parts[c] = _chunk_per_query(terms, prepared_c, k_b[:, :, rows],
                                        None if pad_b is None else pad_b[:, :, rows], v1[:, :, c], run,
                                        entering[c].mT, before[:, :, c], finite)
        total = torch.stack(parts, dim=2)
    result = _ratio(total, Dv, terms.positive).flatten(2, 3)  # (B, H, L', Dv)
    return (result[:, :, :L] if extra else result), cast(Tensor, state), before[:, :, -1]  # g >= 1: state set


def _finite_or_neginf(logw: Tensor) -> Tensor:
    """The key log-scales with NaN and +inf (a non-finite key) as -inf, for the references only: a chunk's reference
    must not take such a key's value, or it would reach the chunk's earlier queries (NaN, or all their weights
    lost against +inf). The key itself still enters the sums from its position on, as NaN or inf, as in exact
    attention."""
    return logw.nan_to_num(nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))


def _chunk_references(top: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """From each chunk's largest key log-scale top (B, H, g, W) and m before the block ref (B, H, W): r_c, m at
    each chunk's end (B, H, g, W), and the reference entering each chunk and after the last (B, H, g + 1, W)."""
    ends = torch.maximum(torch.cummax(top, dim=2).values, ref[:, :, None])
    return ends, torch.cat([ref[:, :, None], ends], dim=2)


def _nan_or_posinf(top: Tensor) -> Tensor:
    """Whether any entry is NaN or +inf, as a 0-dim bool tensor (read back with the chunks' flags)."""
    return ~(torch.isfinite(top) | (top == float("-inf"))).all()


def _rise_bound(logw: Tensor, before: Tensor) -> Tensor:
    """(g,): an upper bound, over (batch, head, column), of how far m rises inside each chunk: from its value at
    the chunk's first position to r_c. logw (B, H, g, C, W): the key log-scales; before as _chunk_references.

    A rise that is NaN (a NaN key at a chunk's start) counts as 0: those positions' outputs are NaN whatever path
    they take, and a NaN in the max would hide the other sequences' steep rises from the check (the exact check in
    _steep_chunks skips NaN positions by its run > floor)."""
    start = torch.maximum(before[:, :, :-1], logw[:, :, :, 0].detach())  # m at each chunk's first position
    return (before[:, :, 1:] - start).nan_to_num(nan=0.0).amax(dim=(0, 1, 3))


@compiler_disabled  # data-dependent, as _steep_chunks
def _read_flags(flagged: Tensor, bad: Tensor) -> tuple[list[int], bool]:
    """The indices where ``flagged`` (g,) is True and the value of ``bad`` (0-dim), in one read-back: on a GPU each
    read-back waits for the queued kernels (read apart, a causal FAVOR+ call at n = 65536 on an H200 read back 18
    times instead of 10). Under torch.func.vmap, True where it is for any example (as :func:`_flagged_chunks`)."""
    plain, plain_bad = readable(flagged), readable(bad)
    if plain.dim() != flagged.dim() or plain_bad.dim() != bad.dim():  # vmapped: read them separately
        return _flagged_chunks(flagged), bool(plain_bad.any())
    g = flagged.shape[0]
    # copied first, then searched: nonzero on the GPU would wait for the queue itself (a second read-back); not
    # tolist(): see _working_dtype
    found = [int(i) for i in torch.cat([flagged, bad[None]]).cpu().nonzero().flatten()]
    return [c for c in found if c < g], g in found


def _stack_states(read: list[Tensor | None], like: Tensor) -> Tensor:
    """The states T_c read by each chunk's queries, (B, H, g, Dv + 1, M); zeros where none has entered yet."""
    return torch.stack([torch.zeros_like(like) if t is None else t for t in read], dim=2)


@compiler_disabled  # data-dependent: torch.compile breaks the graph here rather than skip the check
def _steep_chunks(logw: Tensor, before: Tensor, floor: float, limit: float, flagged: list[int]) -> dict[int, Tensor]:
    """The chunks where the running maximum m rises by more than ``limit`` between a query that sees a key and
    the chunk's end (in any (batch, head, column)), each with its m_j (B, H, C, W); a read-back per chunk
    ``flagged`` by :func:`_rise_bound` (its upper bound exceeds the limit), none for the others.

    logw (B, H, g, C, W): the key log-scales; before (B, H, g + 1, W): m entering each chunk (then r_c)."""
    ends = before[:, :, 1:]
    steep = {}
    for c in flagged:
        # exact for the flagged chunks: positions that see no key yet (m = floor) do not count
        run = torch.maximum(torch.cummax(logw[:, :, c].detach(), dim=2).values, before[:, :, c, None])
        if bool(readable(torch.where(run > floor, ends[:, :, c, None] - run, 0.0).amax() > limit).any()):
            steep[c] = run
    return steep


def _flagged_chunks(flagged: Tensor) -> list[int]:
    """The indices c where ``flagged`` (g,) is True. Under torch.func.vmap, where it is True for any example (the
    chunk is then redone per query for every example, which is exact for all of them)."""
    plain = readable(flagged)
    if plain.dim() == flagged.dim():  # not vmapped: one read-back
        return [int(i) for i in plain.cpu().nonzero().flatten()]  # one read-back (as _read_flags)
    if not bool(plain.any()):
        return []
    return [c for c in range(flagged.shape[0]) if bool(readable(flagged[c]).any())]


def _chunk_per_query(terms: _ColumnShifted | _RowScaled, prepared: Tensor, k: Tensor, pad: Tensor | None,
                     v1: Tensor, run: Tensor, state: Tensor, ref: Tensor, finite: bool) -> Tensor:
    """One chunk with each query's own reference m_i: numerator and normaliser (B, H, C, Dv + 1), relative to the
    query's t_i. The weights Σ_r q̂_ir k̂_jr exp(m_jr - m_ir), j <= i, are formed with the (C, C, W) decays
    explicitly (every factor <= 1), in steps of rows that keep that tensor within FALLBACK_ELEMENTS.

    prepared (B, H, C, M): prepared queries; k (B, H, C, D); pad (B, 1, C) | None; run (B, H, C, W): m_i;
    state (B, H, M, Dv + 1) relative to ref (B, H, W), the reference entering the chunk."""
    B, H, C, _ = prepared.shape
    W = run.shape[-1]
    base, logw = terms.keys(k, pad)  # (B, H, C, M) | None, (B, H, C, W)
    qf = terms.query_features(prepared, run)  # (B, H, C, M): query i relative to its own m_i
    carried = (qf * torch.exp(ref[:, :, None] - run)) @ state  # (B, H, C, Dv + 1)
    future = torch.ones(C, C, dtype=torch.bool, device=k.device).triu(1)[..., None]  # (C, C, 1): j > i
    step = max(1, FALLBACK_ELEMENTS // max(1, B * H * C * W))
    parts = []
    for a in range(0, C, step):
        b = min(C, a + step)  # rows a..b-1 see keys 0..b-1
        decay = (logw[:, :, None, :b] - run[:, :, a:b, None]).masked_fill_(future[a:b, :b], float("-inf")).exp_()
        if base is not None and W == 1:  # row-scaled: (B, H, R, b, 1), a scalar per (i, j)
            p = (qf[:, :, a:b] @ base[:, :, :b].mT) * decay[..., 0]
        else:
            weights = decay if base is None else decay * base[:, :, None, :b]
            p = torch.einsum("bhir,bhijr->bhij", qf[:, :, a:b], weights)  # (B, H, R, b)
        p = p.masked_fill(future[a:b, :b, 0], 0.0)  # a NaN or inf key times its 0 decay is NaN: not for rows before it
        parts.append(p @ v1[:, :, :b] if finite else causal_product(p, v1[:, :, :b], future[a:b, :b, 0]))
    return torch.cat(parts, dim=2) + carried


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *,
                               causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
    """The naive reference: A = φ(Q) φ(K)ᵀ as an explicit (Nq, Nk) matrix, masked, then D⁻¹ A V.

    No stabilisation (use moderate inputs, float64)."""
    _, _, Nq, Nk, D, _ = check_qkv(q, k, v, key_padding_mask, name="linear_attention_reference")
    check_feature_map(feature_map, D)
    k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)
    a = feature_map(q) @ feature_map(k).mT  # (B, H, Nq, Nk)
    keep = keep_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if keep is None:
        return safe_divide(a @ v, a.sum(-1, keepdim=True))
    a = a.masked_fill(~keep, 0.0)  # a NaN or inf value reaches only the queries that see it:
    return safe_divide(causal_product(a, v, ~keep), a.sum(-1, keepdim=True))


def linear_attention_log_reference(q: Tensor, k: Tensor, v: Tensor, feature_map: nn.Module, *,
                                   causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
    """The naive reference for positive maps with ``log_features``, in the log domain: the (Nq, Nk) matrix of
    log w_ij = logsumexp_r (log φ_r(q_i) + log φ_r(k_j)), masked, then a softmax over j and the product with V.

    Exact for inputs of any scale (nothing is exponentiated before the softmax's own shift); forms
    (B, H, Nq, Nk, M), so for small inputs (tests, float64)."""
    _, _, Nq, Nk, D, _ = check_qkv(q, k, v, key_padding_mask, name="linear_attention_log_reference")
    check_feature_map(feature_map, D)
    k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)
    log_map = cast(_LogFeatures, feature_map)  # duck-typed: the docstring's "maps with log_features"
    lq, lk = log_map.log_features(q), log_map.log_features(k)  # (B, H, Nq, M), (B, H, Nk, M)
    logits = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], dim=-1)  # (B, H, Nq, Nk)
    keep = keep_mask(Nq, Nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    weights = masked_softmax(logits, keep, dim=-1)
    return weights @ v if keep is None else causal_product(weights, v, ~keep)
