"""Shape checks and masks shared by every attention function (SDPA layout: q (B, H, Nq, D), k (B, H, Nk, D),
v (B, H, Nk, Dv); ``key_padding_mask`` bool (B, Nk), True = padding, ignored)."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar, overload

import torch
from torch import Tensor

_P = ParamSpec("_P")
_R = TypeVar("_R")


def lowest(dtype: torch.dtype) -> float:
    """The most negative finite value of ``dtype``: the running maxima's "no key seen yet".

    No finite key lies below it (a fixed constant such as -1e30 would clip real keys of -1e31), exp(lowest - m)
    underflows to 0 for every real m > lowest, and exp(lowest - lowest) = 1 only ever multiplies an all-zero
    state; unlike -inf, lowest - lowest is never NaN."""
    return -torch.finfo(dtype).max


def check_factory_dtype(dtype: object, name: str) -> None:
    """A module's ``dtype=`` keyword: None or a floating torch.dtype (its parameters must carry gradients)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name}: dtype must be a floating torch.dtype (as torch's modules take it); got {dtype!r}")


def positive_int(value: object, *, what: str, name: str) -> int:
    """``value`` as an int; TypeError naming it unless it is an integer (bool excluded), ValueError unless > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: {what} must be a positive integer; got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name}: {what} must be positive; got {value}")
    return int(value)


def positive_finite(value: object, *, what: str, name: str) -> float:
    """``value`` as a float; TypeError unless it is a real number, ValueError unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: {what} must be a positive finite number; got {value!r} ({type(value).__name__})")
    try:  # checked as the float it becomes: Fraction(1, 10**400) is > 0 but rounds to 0.0
        x = float(value)
    except OverflowError:  # an int or Fraction beyond float's range
        x = math.inf
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name}: {what} must be a positive finite number; got {value!r}")
    return x


def check_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
              *, name: str) -> tuple[int, int, int, int, int, int]:
    """Validate the SDPA layout and the padding mask; return (B, H, Nq, Nk, D, Dv)."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    for label, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_floating_point():  # integer attention would be computed and truncated, complex is undefined
            raise TypeError(f"{name}: q, k and v must be floating point (float16, bfloat16, float32, float64); "
                            f"{label} is {x.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: expected 4-D tensors (B, H, N, D); got {shapes}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"{name}: batch and head dimensions differ: {shapes}")
    if k.shape[-1] != D:
        raise ValueError(f"{name}: query and key head dims differ (q has D={D}, k has D={k.shape[-1]}): {shapes}")
    Nk = k.shape[2]
    if v.shape[2] != Nk:
        raise ValueError(f"{name}: keys and values have different lengths ({Nk} vs {v.shape[2]}): {shapes}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Nk):
            raise ValueError(f"{name}: key_padding_mask must have shape (B, Nk) = {(B, Nk)}; "
                             f"got {tuple(key_padding_mask.shape)} with {shapes}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{name}: key_padding_mask must be bool (True = padding); "
                             f"got {key_padding_mask.dtype}")
    return B, H, Nq, Nk, D, v.shape[-1]


def empty_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The (B, H, Nq, Dv) zeros of attention with nothing to compute (B, H, Nq or Nk is 0, or no features), as SDPA
    returns for Nk = 0: a contraction over an empty dimension, so q, k and v still receive (zero) gradients. The
    empty dimension is contracted last: (q kᵀ) v would be an (Nq, Nk) matrix of zeros times v, NaN wherever v
    holds a NaN or inf."""
    return q[..., :0] @ (k[..., :0].mT @ v)  # (B, H, Nq, 0) @ ((B, H, 0, Nk) @ (B, H, Nk, Dv))


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` (a no-op where it is not on). The chunked kernels choose
    their own precision (float32 for half inputs): under autocast their projections ran in bfloat16, which made
    trigonometric features thousands off and non-causal FAVOR+ raise."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (meta)
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def compiler_disabled(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``torch.compiler.disable(fn)``, applied on the first call that may be compiled: applying it imports
    torch._dynamo (~1 s), which ``import theorylab`` should not pay. Before anything imports torch._dynamo no
    torch.compile can be tracing, so fn is called as it is. The first call traced by torch.compile breaks the
    graph at the (skipped) ``torch.compiler.disable`` call and runs eagerly; later traces break at fn's call."""
    disabled: Callable[_P, _R] | None = None

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        nonlocal disabled
        if disabled is None:
            if not torch.compiler.is_compiling() and "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
            _never_compile(wrapper)
        return disabled(*args, **kwargs)

    return wrapper


def _never_compile(wrapper: Callable[..., Any]) -> None:
    """Tell dynamo never to compile a frame of ``wrapper``'s code, which every :func:`compiler_disabled` function
    shares: it compiled that frame once per wrapped function, on its first call, and after eight (two models
    compiled in one process) warned that it "hit config.recompile_limit". Its calls still break the graph, as a
    disabled function's do. ``skip_code`` is private (torch 2.4 to 2.14 have it); without it nothing changes."""
    skip_code = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
    if skip_code is not None:
        skip_code(wrapper.__code__)


def readable(x: Tensor) -> Tensor:
    """The plain tensor beneath ``x``'s torch.func wrappers, for reading values back to Python.

    Under ``torch.func.vmap`` a tensor holds one example's values and ``.item()`` is refused; the plain tensor
    beneath holds every example's. A range check that reduces it over all its entries decides for the whole
    vmapped batch at once, as it does for the batch dimension of an ordinary call (the path it picks is exact for
    every example; only its cost differs). Outside torch.func this is ``x`` itself. The query uses torch's private
    functorch bindings (present from torch 2.0), so it is looked up defensively."""
    functorch = getattr(torch._C, "_functorch", None)
    if torch.compiler.is_compiling() or functorch is None or not hasattr(functorch, "get_unwrapped"):
        return x  # torch.compile cannot trace the bindings (and breaks the graph at the read-back anyway)
    while functorch.is_functorch_wrapped_tensor(x):
        x = functorch.get_unwrapped(x)
    return x


def can_inspect(x: Tensor) -> bool:
    """Whether a data-dependent branch (reading a value back to Python) is possible: not while torch.compile
    traces, nor on meta tensors (FLOP counting)."""
    return not torch.compiler.is_compiling() and x.device.type != "meta"


def is_exporting() -> bool:
    """Whether torch.export is tracing (``torch.compiler.is_exporting`` appeared in torch 2.5; 2.4 has no such
    query, and there export takes the graph break's error, as before)."""
    query = getattr(torch.compiler, "is_exporting", None)
    return bool(query()) if query is not None else False


def finite_values(v: Tensor) -> bool:
    """Whether a causal kernel may form its products with masked weights as plain matmuls: True unless ``v`` holds
    a NaN or inf (see :func:`causal_product`). One read-back per call, of a sum: finite values whose sum overflows
    also give False, which costs only the slower exact path. Not checked (True) where nothing can be read back:
    under torch.compile or torch.export, and on meta tensors (FLOP counting)."""
    if not can_inspect(v) or is_exporting():
        return True
    return bool(torch.isfinite(readable(v).sum()))


def causal_product(p: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
    """Σ_{j visible to i} p_ij v_j for weights p (..., I, J) that are 0 where ``hidden`` (broadcastable to p; True:
    query i does not see key j), and values v (..., J, E) that may hold NaN or inf.

    ``p @ v`` would take 0 · v_j at the hidden j, which is NaN for a non-finite v_j: a NaN or inf value would
    reach the queries that do not see it (in a causal kernel, the earlier positions). Here each reaches exactly
    the queries that see it, as the sum over the visible terms gives: an entry is NaN where a visible term is
    NaN (a NaN value, or 0 · inf) or where +inf meets -inf, else ±inf where a visible term is, else the finite
    sum. The finite values go through one matmul; the non-finite terms are counted with matmuls of indicator
    matrices (no (I, J, E) tensor), so this costs about seven matmuls instead of one."""
    bad = ~torch.isfinite(v)
    out = p @ v.masked_fill(bad, 0.0)
    w, seen = p.detach(), ~hidden
    pos, neg, zero = ((seen & sign).to(p.dtype) for sign in (w > 0, w < 0, w == 0))
    up, down = (v.detach() == math.inf).to(p.dtype), (v.detach() == -math.inf).to(p.dtype)
    nans = seen.to(p.dtype) @ torch.isnan(v).to(p.dtype) + zero @ (up + down)
    ups, downs = pos @ up + neg @ down, pos @ down + neg @ up
    out = out.masked_fill(ups > 0, math.inf).masked_fill(downs > 0, -math.inf)
    return out.masked_fill((nans > 0) | ((ups > 0) & (downs > 0)), math.nan)


@overload
def keep_mask(Nq: int, Nk: int, *, causal: Literal[True], key_padding_mask: Tensor | None,
              device: torch.device) -> Tensor: ...
@overload
def keep_mask(Nq: int, Nk: int, *, causal: bool, key_padding_mask: Tensor, device: torch.device) -> Tensor: ...
@overload
def keep_mask(Nq: int, Nk: int, *, causal: bool, key_padding_mask: Tensor | None,
              device: torch.device) -> Tensor | None: ...
def keep_mask(Nq: int, Nk: int, *, causal: bool, key_padding_mask: Tensor | None,
              device: torch.device) -> Tensor | None:
    """Bool (B or 1, 1, Nq, Nk), True where query i may attend to key j; None when every pair may.

    Causal is top-left aligned (key j visible to query i iff j <= i), as SDPA's ``is_causal``."""
    keep = None
    if causal:
        keep = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, Nq, Nk)
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        keep = pad if keep is None else keep & pad
    return keep


def zero_padded(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """x (B, H, Nk, ·) with the rows of padded keys set to 0. Masking the attention weights alone is not enough: a
    weight of exactly 0 times an inf or NaN value is NaN, in the output or in the gradient of the other inputs."""
    return x if key_padding_mask is None else x.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def masked_softmax(x: Tensor, keep: Tensor | None, dim: int) -> Tensor:
    """Softmax of ``x`` over ``dim`` restricted to ``keep``; all-zero where nothing is kept (never NaN)."""
    if x.shape[dim] == 0:  # nothing to normalise over (no key): amax would raise
        return x.new_zeros(x.shape)
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where |den| <= sqrt(smallest normal) (~1e-19 in float32): a query that sees no key, or
    whose normaliser underflowed. The threshold keeps den² and so every gradient finite. A NaN normaliser (a NaN
    among the keys the query sees) gives NaN, never a silent 0."""
    nonzero = ~(den.abs() <= torch.finfo(den.dtype).tiny ** 0.5)
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (accumulate in float32), float64 when any input is float64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


class ChunkOutputs:
    """Per-chunk outputs along the sequence (dim 2) assembled into one (B, H, N, Dv) tensor.

    Without autograd they are written in place into one preallocated tensor (no extra copy: the forward pass
    then holds only the output). With autograd they are concatenated once at the end: writing slices in place
    would make autograd clone the whole output gradient once per chunk in the backward pass (O(n²/C))."""

    def __init__(self, like: Tensor, shape: tuple[int, ...]) -> None:
        self.like, self.shape = like, shape
        self.parts: list[Tensor] = []
        self.out = None if torch.is_grad_enabled() else like.new_empty(shape)

    def write(self, start: int, stop: int, value: Tensor) -> None:
        if self.out is None:
            self.parts.append(value)
        else:
            self.out[:, :, start:stop] = value

    def result(self) -> Tensor:
        if self.out is not None:
            return self.out
        return torch.cat(self.parts, dim=2) if self.parts else self.like.new_zeros(self.shape)
