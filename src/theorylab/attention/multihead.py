"""Multi-head attention (batch first) over any of the package's attention kinds."""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor, nn

from ._checks import check_factory_dtype, positive_int
from .exact import cached_softmax_attention, softmax_attention
from .features import EluFeatures, PositiveRandomFeatures
from .linear import check_feature_map, linear_attention
from .separable import separable_attention
from .state import KVCache, LinearAttentionState

DecodingState = LinearAttentionState | KVCache  # what a causal call passes on to the next piece of its sequence

KINDS = ("softmax", "separable", "linear", "favor")


class MultiheadAttention(nn.Module):
    """Like ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``, but ``forward`` returns only the
    output tensor and the attention itself is chosen by ``kind``. ``forward`` takes no ``attn_mask`` or
    ``need_weights`` (the linear kinds never form attention weights); causality is the constructor's ``causal``,
    or a call's. To put it inside ``nn.TransformerEncoderLayer`` and friends, wrap it in
    :class:`~theorylab.attention.swap.DropInMultiheadAttention`, or call
    :func:`~theorylab.attention.swap.swap_attention` on the model.

    * ``"softmax"``: exact attention (torch SDPA);
    * ``"separable"``: softmax_row(Q) softmax_col(K)ᵀ V;
    * ``"linear"``: kernelised attention with φ = elu + 1, or the ``feature_map`` given;
    * ``"favor"``: kernelised attention with FAVOR+ positive orthogonal random features (``num_features`` of them,
      shared by the heads; ``redraw_features()`` draws new ones).

    Args:
        embed_dim: E, the model width; num_heads must divide it (head dim D = E / num_heads).
        num_heads: H, the number of heads.
        kind: the attention, one of "softmax" (default), "separable", "linear", "favor" (above).
        causal: every position attends to itself and earlier positions only (top-left aligned when query and
            key lengths differ; kinds "linear" and "favor" need them equal).
        num_features: M, the random features of ``kind="favor"``.
        dropout: probability of zeroing an entry of the attention output before the output projection, during
            training (linear kinds never form attention weights to drop).
        bias: biases in the four projections.
        seed: seed of the random features (``kind="favor"``).
        chunk_size: chunk length of the causal/chunked kernels (None: their defaults).
        recompute: kinds ``"linear"`` and ``"favor"``: recompute the attention's features block by block in the
            backward pass instead of keeping them (see :func:`linear_attention`; ~3x less memory for
            forward+backward, ~1.4x the time).
        feature_map: ``kind="linear"`` only: φ, an ``nn.Module`` mapping (..., N, D) -> (..., N, M) applied to
            every head's queries and keys (default ``EluFeatures(D)``; what a map may provide: see
            :func:`~theorylab.attention.linear_attention`). It becomes a submodule: its parameters train with the
            model's.
        device, dtype: as torch's modules take them: where the parameters and buffers go, and their floating
            dtype (default: torch's defaults). The module is built on the CPU and then moved (``.to``), so a seed
            gives the same weights and features on every device.

    Raises:
        TypeError: embed_dim, num_heads, num_features or chunk_size is not an integer, dropout not a real number,
            causal or recompute not a bool, dtype not a floating torch.dtype.
        ValueError: an unknown kind; num_heads not positive or not dividing embed_dim; num_features or
            chunk_size <= 0; dropout outside [0, 1); recompute with a kind other than "linear" or "favor";
            a feature_map with a kind other than "linear", or whose ``head_dim`` is not D. TypeError: a
            feature_map that is not an ``nn.Module``.
    """

    embed_dim: int
    num_heads: int
    head_dim: int
    kind: str
    causal: bool
    chunk_size: int | None
    recompute: bool
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    dropout: nn.Dropout
    feature_map: nn.Module | None  # EluFeatures ("linear"), PositiveRandomFeatures ("favor"), else None

    def __init__(self, embed_dim: int, num_heads: int, *, kind: str = "softmax", causal: bool = False,
                 num_features: int = 256, dropout: float = 0.0, bias: bool = True, seed: int | None = None,
                 chunk_size: int | None = None, recompute: bool = False,
                 feature_map: nn.Module | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_factory_dtype(dtype, "MultiheadAttention")
        if kind not in KINDS:
            raise ValueError(f"MultiheadAttention: kind must be one of {KINDS}; got {kind!r}")
        for what, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_features", num_features)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"MultiheadAttention: {what} must be a positive integer; got {value!r}")
        if chunk_size is not None:
            chunk_size = positive_int(chunk_size, what="chunk_size", name="MultiheadAttention")
        if embed_dim <= 0:  # 0 is divisible by every num_heads: name it before the divisibility check
            raise ValueError(f"MultiheadAttention: embed_dim must be positive; got {embed_dim}")
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: num_heads ({num_heads}) must be positive and divide embed_dim "
                             f"({embed_dim})")
        if num_features <= 0:
            raise ValueError(f"MultiheadAttention: num_features must be positive; got {num_features}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"MultiheadAttention: dropout must be a number in [0, 1); got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1); got {dropout}")
        if not isinstance(causal, bool):  # causal="False" would be truthy
            raise TypeError(f"MultiheadAttention: causal must be a bool; got {causal!r}")
        if not isinstance(recompute, bool):
            raise TypeError(f"MultiheadAttention: recompute must be a bool; got {recompute!r}")
        if recompute and kind not in ("linear", "favor"):
            raise ValueError(f"MultiheadAttention: recompute applies to kinds 'linear' and 'favor'; got kind={kind!r}")
        if feature_map is not None and kind != "linear":
            raise ValueError(f"MultiheadAttention: a feature_map is for kind='linear'; got kind={kind!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        if feature_map is not None:
            check_feature_map(feature_map, self.head_dim, "MultiheadAttention")
        self.kind, self.causal, self.chunk_size, self.recompute = kind, causal, chunk_size, recompute
        # built on the CPU, then moved: the same weights and features on any device (a device given inside a
        # torch.device("meta") context is built there, as torch's modules are, not on meta); on meta directly,
        # drawing nothing, as torch's modules do
        on_meta = device is not None and torch.device(device).type == "meta"
        with torch.device("meta" if on_meta else "cpu") if device is not None else contextlib.nullcontext():
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.dropout = nn.Dropout(dropout)
            self.feature_map = None
            if kind == "linear":
                self.feature_map = EluFeatures(self.head_dim) if feature_map is None else feature_map
            elif kind == "favor":
                self.feature_map = PositiveRandomFeatures(self.head_dim, num_features, seed=seed)
            self._init_projections()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_projections(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def reset_parameters(self) -> None:
        """Initialise as at construction: the projections (Xavier-uniform weights, zero biases) and the feature
        map (its ``reset_parameters``: a seeded FAVOR+ map draws its seed's first features again, an unseeded one
        draws from torch's global generator; a map of one's own without one, each of its submodules'
        ``reset_parameters``, which is its construction only if it was built so). What a module built on the
        meta device needs after ``to_empty()``, as torch's own modules do. (Calling ``reset_parameters`` of every
        submodule instead would give the projections ``nn.Linear``'s own initialisation.)"""
        self._init_projections()
        feature_map = self.feature_map
        if feature_map is None:
            return
        reset = getattr(feature_map, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for m in feature_map.modules():  # a map of one's own without one: its submodules' (an nn.Linear's)
            reset = getattr(m, "reset_parameters", None)
            if m is not feature_map and callable(reset):
                reset()

    _reset_parameters = reset_parameters  # nn.MultiheadAttention's name for it

    def redraw_features(self) -> None:
        """Draw new random features (``kind="favor"``); a no-op for the other kinds."""
        feature_map: Any = self.feature_map  # duck-typed: any map with a redraw() method
        if hasattr(feature_map, "redraw"):
            feature_map.redraw()

    def _heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        B, N, _ = x.shape
        return proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    @overload
    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, *, causal: bool | None = None,
                state: DecodingState | None = None, return_state: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, *, causal: bool | None = None,
                state: DecodingState | None = None,
                return_state: Literal[True]) -> tuple[Tensor, DecodingState]: ...
    @overload
    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, *, causal: bool | None = None,
                state: DecodingState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, DecodingState]: ...
    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, *, causal: bool | None = None,
                state: DecodingState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, DecodingState]:
        """query (B, Nq, E), key (B, Nk, E) (default: query), value (B, Nk, E) (default: key),
        key_padding_mask bool (B, Nk), True = padding -> (B, Nq, E). ``causal`` overrides the constructor's
        setting for this call (None: keep it).

        ``state`` / ``return_state`` (causal, as many queries as keys): incremental decoding. ``out, state =
        mha(prompt, return_state=True)``, then ``out, state = mha(next_token, state=state, return_state=True)``:
        the outputs equal one call on the whole sequence up to rounding. Kinds "linear", "favor" and "separable"
        carry a :class:`~theorylab.attention.state.LinearAttentionState` (a cost per token that does not grow with
        the prefix), kind "softmax" a :class:`~theorylab.attention.state.KVCache` (every key and value so far).

        Args:
            query: (B, Nq, E), E = ``embed_dim``; floating point, in the dtype of the projections.
            key: (B, Nk, E); None: ``query`` (self-attention).
            value: (B, Nk, E); None: ``key``.
            key_padding_mask: bool (B, Nk), True = padding (that key is ignored); None: no padding.
            causal: query i sees keys j <= i only (top-left aligned; kinds "linear" and "favor" need Nq == Nk);
                None (default): the constructor's ``causal``.
            state: causal only, Nq == Nk: the state of the positions before this call's, from an earlier call with
                ``return_state=True`` (None: none; the sequence starts here). With H = ``num_heads``,
                D = E / H and n the positions consumed so far, it is, by kind:

                * "softmax": a :class:`~theorylab.attention.state.KVCache` with ``keys`` (B, H, n, D),
                  ``values`` (B, H, n, D) and ``padding`` bool (B, n) or None; this call's query i sees the n
                  cached keys and its own keys j <= i;
                * "linear", "favor", "separable": a :class:`~theorylab.attention.state.LinearAttentionState`
                  with ``kv`` (B, H, D + 1, M) and ``ref`` (B, H, W), ``length`` = n: M = W = ``num_features``
                  for "favor", W = 1 and M = D for "linear" (M features of a ``feature_map`` given), M = W = D for
                  "separable".
            return_state: causal only: also return the state after this call's positions (default False).

        Returns:
            (B, Nq, E), in the dtype of the projections; with ``return_state=True`` a tuple (output, state), the
            state as described under ``state``, now covering n + Nq positions.

        Raises:
            TypeError: causal is not a bool or None, return_state not a bool; ``state`` of the wrong type for
                the kind (not a KVCache for "softmax", not a LinearAttentionState for the other kinds).
            ValueError: query, key or value is not (B, N, E); query, key and value of different batch sizes, or
                key and value of different lengths; key_padding_mask not a bool (B, Nk) tensor; ``state`` or
                ``return_state`` without causal, or with Nq != Nk; kinds "linear" and "favor": causal with
                Nq != Nk; a state that does not fit this call (other B, H, D or width, on another device), made by
                the other function (a "separable" state given to "linear" or "favor", or the reverse), or (kind
                "favor") made before the random features changed (``redraw_features()``, ``load_state_dict``,
                ``.to()``); kinds "linear" and "favor": inputs so large that the features' log-scale overflows
                float64.
            RuntimeError: (torch's, from the projections) inputs of another dtype than the projections' weights,
                integer inputs included.
        """
        if causal is None:
            causal = self.causal
        elif not isinstance(causal, bool):
            raise TypeError(f"MultiheadAttention: causal must be a bool or None; got {causal!r}")
        if not isinstance(return_state, bool):
            raise TypeError(f"MultiheadAttention: return_state must be a bool; got {return_state!r}")
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"MultiheadAttention: {name} must be (B, N, {self.embed_dim}); got "
                                 f"{tuple(x.shape)}")
        q, k, v = self._heads(query, self.q_proj), self._heads(key, self.k_proj), self._heads(value, self.v_proj)
        mask = key_padding_mask
        result: Tensor | tuple[Tensor, DecodingState]
        if self.kind == "softmax" and (state is not None or return_state):
            if not causal:
                raise ValueError("MultiheadAttention: state and return_state apply to causal attention")
            result = cached_softmax_attention(q, k, v, cast(KVCache | None, state), key_padding_mask=mask)
            if not return_state:
                result = result[0]
        elif self.kind == "softmax":
            result = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        elif self.kind == "separable":
            result = separable_attention(q, k, v, causal=causal, key_padding_mask=mask, chunk_size=self.chunk_size,
                                         state=cast(LinearAttentionState | None, state), return_state=return_state)
        else:
            feature_map = cast(nn.Module, self.feature_map)  # kinds "linear" and "favor" always have one
            result = linear_attention(q, k, v, feature_map, causal=causal, key_padding_mask=mask,
                                      chunk_size=self.chunk_size, recompute=self.recompute,
                                      state=cast(LinearAttentionState | None, state), return_state=return_state)
        if isinstance(result, tuple):
            return self._project(result[0]), result[1]
        return self._project(result)

    def _project(self, out: Tensor) -> Tensor:
        """(B, H, Nq, D) heads -> (B, Nq, E): merged, dropout, output projection."""
        B, _, Nq, _ = out.shape
        return self.out_proj(self.dropout(out.transpose(1, 2).reshape(B, Nq, self.embed_dim)))

    def extra_repr(self) -> str:
        extra = (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else "") + (
            ", recompute=True" if self.recompute else "")
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kind={self.kind!r}, causal={self.causal}"
                f"{extra}")
