r"""What causal attention carries from one piece of a sequence to the next: a prompt, then one token at a time.

:class:`LinearAttentionState` for the linear-time kinds (a fixed-size state: constant cost per token) and
:class:`KVCache` for exact attention (every key and value so far: cost per token linear in the prefix).

The recurrent form of causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Causal kernelised attention out_i = Σ_{j<=i} φ(q_i)ᵀφ(k_j) v_j / Σ_{j<=i} φ(q_i)ᵀφ(k_j) only ever needs the
prefix sums S_i = Σ_{j<=i} [v_j, 1] φ(k_j)ᵀ, an (Dv + 1, M) matrix per head: S_i = S_{i-1} + [v_i, 1] φ(k_i)ᵀ.
So a sequence can be fed in pieces (a prompt, then one token at a time) at O(1) cost and memory per token,
whatever the length of the prefix, where exact attention reads a key-value cache that grows with it.

:class:`LinearAttentionState` is that S after a prefix, as ``linear_attention(..., causal=True, state=...,
return_state=True)`` passes it on. Its keys are kept relative to ``ref``, the running maximum of the key
log-scales (per feature column for FAVOR+; see :mod:`theorylab.attention.linear`), so the state never overflows
or underflows whatever the inputs' scale; S itself is kv · e^{ref}.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor, nn

from ._checks import lowest


class MapFingerprint:
    """What identifies the features a state was made with: the map object and each of its buffers (by weak
    reference, so a freed buffer whose memory address is reused never passes for it) with its version counter.
    ``redraw()``, ``load_state_dict`` or a ``.to()`` of the map changes it. Inference tensors (a map built or moved
    under ``torch.inference_mode()``) have no version counter: their values are summed instead (a read-back per
    call, on buffers of m·d numbers). Parameters are left out: a trainable map updated by an optimizer between
    pieces of a sequence (truncated backpropagation through time) continues its state, as an RNN's hidden state
    continues across updates. Writes through ``.data`` are invisible here, as they are to autograd.

    A copy of a state (``copy.copy``, ``copy.deepcopy``) belongs to the same map object. Weak references do not
    survive pickling: an unpickled (or ``torch.save``-d and loaded) state carries an empty fingerprint, which
    matches any map, since the map it belongs to has been reloaded too."""

    def __init__(self, feature_map: nn.Module | None) -> None:
        self._map = None if feature_map is None else weakref.ref(feature_map)
        self._buffers = [] if feature_map is None else [(weakref.ref(b), _version(b)) for b in feature_map.buffers()]

    def matches(self, feature_map: nn.Module) -> bool:
        if self._map is None:
            return True
        buffers = list(feature_map.buffers())
        return self._map() is feature_map and len(buffers) == len(self._buffers) and all(
            ref() is b and _version(b) == version for (ref, version), b in zip(self._buffers, buffers, strict=True))

    def __deepcopy__(self, memo: dict) -> MapFingerprint:
        return self  # immutable, and a copied state still belongs to the map that made it

    def __reduce__(self) -> tuple:
        return MapFingerprint, (None,)


def _version(buffer: Tensor) -> int | float | None:
    """The buffer's version counter; for an inference tensor (which has none) the sum of its values; None on
    the meta device (no values)."""
    if not buffer.is_inference():
        return buffer._version
    return None if buffer.is_meta else float(buffer.detach().double().sum())


@dataclasses.dataclass(frozen=True)
class LinearAttentionState:
    """The state of causal linear attention (``kind="linear"``) or separable attention (``kind="separable"``)
    after a prefix of ``length`` positions.

    Attributes:
        kv: (B, H, Dv + 1, M): Σ_j [v_j, 1] k̂_jᵀ over the prefix, transposed as the kernels keep it. Linear
            attention: k̂_j = φ(k_j) e^{-ref} (per feature column, or per row for maps with a per-row log-scale).
            Separable attention: M = D and k̂_jc = e^{k_jc - ref_c}, the unnormalised column softmax, whose sums
            (the last row) are its normalisers. Carries autograd history when the prefix did (``detach()`` cuts
            it, as for an RNN's hidden state).
        ref: (B, H, W): the stabiliser, the running maximum of the key log-scales (W = M for FAVOR+, D for
            separable attention, 1 otherwise); the most negative finite value while no key has been seen.
        length: positions consumed so far (padded ones included).
        kind: ``"linear"`` or ``"separable"``: the function that made it, the only one that takes it.

    A linear-attention state belongs to the feature map that made it: ``linear_attention`` refuses it after that
    map was redrawn, reloaded or moved, and for another map (an unpickled state is checked for its shapes only:
    see :class:`MapFingerprint`). To reorder or repeat the sequences of a batch (beam search), use
    :meth:`index_select`. ``torch.save`` stores a state; ``torch.load``, whose default is ``weights_only=True``,
    needs ``with torch.serialization.safe_globals([LinearAttentionState, MapFingerprint]):`` around it (torch
    >= 2.5; on 2.4, ``torch.serialization.add_safe_globals([...])`` once), or ``weights_only=False`` for a file
    you trust.
    """

    kv: Tensor
    ref: Tensor
    length: int
    kind: str = "linear"
    fingerprint: MapFingerprint = dataclasses.field(default_factory=lambda: MapFingerprint(None), repr=False,
                                                    compare=False)

    def detach(self) -> LinearAttentionState:
        """The same state without autograd history (truncated backpropagation through time)."""
        return dataclasses.replace(self, kv=self.kv.detach(), ref=self.ref.detach())

    def index_select(self, index: Tensor) -> LinearAttentionState:
        """The state of the sequences ``index`` (a 1-D integer tensor of batch rows, repeats allowed), in that
        order: beam search's reorder, ``state.index_select(beam_parents)``. Belongs to the same feature map."""
        index = _batch_index(index, self.kv.shape[0], "LinearAttentionState")
        return dataclasses.replace(self, kv=self.kv.index_select(0, index), ref=self.ref.index_select(0, index))


def check_state(state: object, feature_map: nn.Module | None, *, kind: str, B: int, H: int, Dv: int, W: int,
                device: torch.device) -> LinearAttentionState:
    """``state`` validated against this call of ``kind``'s function: TypeError for a non-state, ValueError naming
    what does not match."""
    name = f"{kind}_attention"
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"{name}: state must be a LinearAttentionState (from return_state=True) or None; got "
                        f"{type(state).__name__}")
    if state.kind != kind:
        raise ValueError(f"{name}: the state was made by {state.kind}_attention; start a new state (state=None)")
    kv, ref = state.kv, state.ref
    if not isinstance(kv, Tensor) or not isinstance(ref, Tensor):
        raise TypeError(f"{name}: the state's kv and ref must be tensors; got {type(kv).__name__} and "
                        f"{type(ref).__name__}")
    if kv.dim() != 4 or tuple(kv.shape[:3]) != (B, H, Dv + 1) or tuple(ref.shape) != (B, H, W):
        raise ValueError(f"{name}: the state does not fit this call: kv {tuple(kv.shape)} and ref "
                         f"{tuple(ref.shape)}, expected ({B}, {H}, {Dv + 1}, M) and ({B}, {H}, {W}) for "
                         f"B={B}, H={H}, Dv={Dv}")
    if kv.device != device or ref.device != device:
        raise ValueError(f"{name}: the state is on {kv.device}, the inputs on {device}")
    if feature_map is not None and not state.fingerprint.matches(feature_map):
        raise ValueError(f"{name}: the state was made with other features (another feature map, or this one "
                         "before redraw(), load_state_dict or .to()); start a new state (state=None)")
    return state


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Exact (softmax) attention's state after a prefix: its keys and values, and which of them are padding.

    Attributes:
        keys: (B, H, n, D); values: (B, H, n, Dv), both carrying autograd history when the prefix did.
        padding: bool (B, n), True = padding, or None when no key so far was padded.

    :meth:`index_select` reorders or repeats the sequences of the batch (beam search). ``torch.load`` of a saved
    cache needs ``with torch.serialization.safe_globals([KVCache]):`` (torch >= 2.5; on 2.4
    ``torch.serialization.add_safe_globals([KVCache])``), or ``weights_only=False``.
    """

    keys: Tensor
    values: Tensor
    padding: Tensor | None = None

    @property
    def length(self) -> int:
        """The number of cached positions (the keys' sequence length)."""
        return self.keys.shape[2]

    def detach(self) -> KVCache:
        """The same cache without autograd history."""
        return dataclasses.replace(self, keys=self.keys.detach(), values=self.values.detach())

    def index_select(self, index: Tensor) -> KVCache:
        """The cache of the sequences ``index`` (a 1-D integer tensor of batch rows, repeats allowed), in that
        order: beam search's reorder, ``cache.index_select(beam_parents)``."""
        index = _batch_index(index, self.keys.shape[0], "KVCache")
        padding = None if self.padding is None else self.padding.index_select(0, index)
        return KVCache(self.keys.index_select(0, index), self.values.index_select(0, index), padding)


def _batch_index(index: object, batch: int, name: str) -> Tensor:
    """``index`` as batch rows of a state of ``batch`` sequences: TypeError unless a 1-D integer tensor, ValueError
    naming a row outside 0..batch−1 (torch's own message names neither)."""
    what = f"{name}.index_select: index must be a 1-D integer tensor of batch rows"
    if not isinstance(index, Tensor):
        raise TypeError(f"{what}; got {type(index).__name__}")
    if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{what}; got a {index.dim()}-D {index.dtype} tensor")
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise ValueError(f"{name}.index_select: index holds rows outside 0..{batch - 1} (the state's batch); got "
                         f"{index.tolist()}")
    return index


def check_width(state: Tensor | None, features: Tensor) -> None:
    """ValueError unless the state (B, H, Dv + 1, M) holds as many feature columns as the map gives (..., M): an
    unpickled state (not tied to its map) with another map."""
    if state is not None and state.shape[-1] != features.shape[-1]:
        raise ValueError(f"linear_attention: the state holds {state.shape[-1]} feature columns, the feature map "
                         f"gives {features.shape[-1]}: it was made with another map; start a new state (state=None)")


def widened(state: LinearAttentionState, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(kv, ref) in ``dtype`` (never narrower than the state's own); "no key seen yet" stays the lowest value of
    the new dtype, so that the kernels still recognise it."""
    kv, ref = state.kv, state.ref
    if ref.dtype == dtype:
        return kv, ref
    unseen = ref == lowest(ref.dtype)
    return kv.to(dtype), ref.to(dtype).masked_fill(unseen, lowest(dtype))
