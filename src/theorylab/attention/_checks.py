"""Shape checks and masks shared by every attention function (SDPA layout: q (B, H, Nq, D), k (B, H, Nk, D),
v (B, H, Nk, Dv); ``key_padding_mask`` bool (B, Nk), True = padding, ignored)."""

from __future__ import annotations

import torch
from torch import Tensor

# A finite stand-in for "no key seen yet" in the running maxima: exp(FLOOR - m) underflows to 0 for every real m,
# and exp(FLOOR - FLOOR) = 1 only ever multiplies an all-zero state.
FLOOR = -1e30


def check_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
              *, name: str) -> tuple[int, int, int, int, int, int]:
    """Validate the SDPA layout and the padding mask; return (B, H, Nq, Nk, D, Dv)."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
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


def masked_softmax(x: Tensor, keep: Tensor | None, dim: int) -> Tensor:
    """Softmax of ``x`` over ``dim`` restricted to ``keep``; all-zero where nothing is kept (never NaN)."""
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    s = e.sum(dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where |den| <= sqrt(smallest normal) (~1e-19 in float32): a query that sees no key, or
    whose normaliser underflowed. The threshold keeps den² and so every gradient finite."""
    nonzero = den.abs() > torch.finfo(den.dtype).tiny ** 0.5
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
