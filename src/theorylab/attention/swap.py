"""Put the package's attention inside torch's Transformer layers: a drop-in for ``nn.MultiheadAttention``.

``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and ``nn.Transformer`` call their attention as
``self_attn(x, x, x, attn_mask=..., key_padding_mask=..., need_weights=False, is_causal=...)[0]``.
:class:`DropInMultiheadAttention` takes that call and runs a :class:`MultiheadAttention` of any kind;
:func:`swap_attention` replaces every ``nn.MultiheadAttention`` of a model by one, with its weights, so that
``kind="softmax"`` reproduces the model's outputs and the other kinds start from its projections.

What a kernelised attention can do, and so what is accepted: no mask, or the causal mask (as ``attn_mask``, bool
or torch's float 0/−inf form, or the ``is_causal`` hint); key padding masks (bool, or the 0/−inf float form that
``nn.TransformerEncoder`` turns them into). Other masks, additive biases and ``need_weights=True`` raise
``ValueError``: the linear kinds never form the n × n weights they would need.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast, overload

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._checks import readable
from .features import EluFeatures
from .multihead import KINDS, MultiheadAttention


class DropInMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s call signature around a :class:`MultiheadAttention` of any kind.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, None)``, with ``(N, B, E)`` inputs unless
    ``batch_first``, and unbatched ``(N, E)`` inputs as torch allows. The call is causal when the inner module was
    built causal, when ``is_causal`` is set, or when ``attn_mask`` is the causal mask (top-left aligned: query i
    sees keys j ≤ i). ``need_weights`` defaults to False here (torch's default is True), since no kind but
    softmax forms weights; asking for them raises.

    The attributes torch's layers read to pick their fused fast paths are set so that those paths are declined
    (``in_proj_bias`` is None, ``in_proj_weight`` an empty tensor): the layers then call this module's
    ``forward``. The other
    attributes of ``nn.MultiheadAttention`` read as they would there (``embed_dim``, ``num_heads``, ``head_dim``,
    ``kdim``, ``vdim``, ``dropout``, ``batch_first``, ``out_proj``; ``bias_k``, ``bias_v`` and the separate
    ``q_proj_weight``... are None, ``add_zero_attn`` False); the projections are ``attention.q_proj`` (``k_proj``,
    ``v_proj``), and :meth:`to_torch` gives back an ``nn.MultiheadAttention`` with them. Nested tensors (batch
    first), which ``nn.TransformerEncoder`` passes in eval without autograd when its ``use_nested_tensor`` is on,
    are run padded with a key padding mask, and the output is nested as the query.

    Args:
        attention: the :class:`MultiheadAttention` to run (its ``causal`` makes every call causal).
        batch_first: inputs are ``(B, N, E)`` (True) or ``(N, B, E)`` (False, torch's default).
    """

    in_proj_bias = None  # read by torch's layers' fast-path checks: None declines them
    _qkv_same_embed_dim = True
    q_proj_weight = k_proj_weight = v_proj_weight = bias_k = bias_v = None  # as torch's MHA has them here
    add_zero_attn = False

    def __init__(self, attention: MultiheadAttention, *, batch_first: bool = True) -> None:
        super().__init__()
        if not isinstance(attention, MultiheadAttention):
            raise TypeError(f"DropInMultiheadAttention: attention must be a theorylab MultiheadAttention; got "
                            f"{type(attention).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"DropInMultiheadAttention: batch_first must be a bool; got {batch_first!r}")
        self.attention = attention
        self.batch_first = batch_first

    @property
    def in_proj_weight(self) -> Tensor:
        """An empty tensor that requires grad (not a parameter): ``nn.TransformerEncoder``, picking its
        nested-tensor path with autograd on, reads ``requires_grad`` of this, then of ``in_proj_bias`` (None: it
        failed there); this one stops it first, so the encoder takes its padded path. Without autograd it takes
        the nested path, which :meth:`forward` runs."""
        return torch.empty(0, device="cpu", requires_grad=True)  # on no module's weight: a quantized q_proj has none

    @property
    def embed_dim(self) -> int:
        """E, the model dimension (torch's name)."""
        return self.attention.embed_dim

    @property
    def num_heads(self) -> int:
        """The number of heads."""
        return self.attention.num_heads

    @property
    def head_dim(self) -> int:
        """E / num_heads, each head's dimension."""
        return self.attention.head_dim

    @property
    def kdim(self) -> int:
        """The keys' input dimension: E (separate key and value sizes are not supported)."""
        return self.attention.embed_dim

    @property
    def vdim(self) -> int:
        """The values' input dimension: E."""
        return self.attention.embed_dim

    @property
    def dropout(self) -> float:
        """The dropout probability of the attention output (torch's float attribute)."""
        return self.attention.dropout.p

    @property
    def out_proj(self) -> nn.Linear:
        """The output projection (an ``nn.Linear``), torch's attribute."""
        return self.attention.out_proj

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with this module's projections (copied), dropout, ``batch_first``, device,
        dtype, training mode and ``requires_grad``: to save a model trained after :func:`swap_attention` in torch's
        format, or to serve it with plain torch. It computes softmax attention, whatever the kind here (the same
        model for ``kind="softmax"``); a feature map's parameters are not carried over.

        Raises:
            ValueError: this module was built causal (``causal=True``), which ``nn.MultiheadAttention`` cannot be:
                swap with ``causal=False`` first and pass the causal mask at the call.
        """
        inner = self.attention
        _refuse_parametrized(inner)
        if inner.causal:
            raise ValueError("to_torch: this module was built causal (swap_attention(..., causal=True)), which "
                             "nn.MultiheadAttention cannot be; swap_attention(model, kind, causal=False) first, and "
                             "pass the causal mask at the call (attn_mask=..., is_causal=True)")
        projections = (inner.q_proj, inner.k_proj, inner.v_proj)
        weight = inner.q_proj.weight
        with _weights_to_be_copied():
            mha = nn.MultiheadAttention(inner.embed_dim, inner.num_heads, dropout=inner.dropout.p,
                                        bias=inner.q_proj.bias is not None, batch_first=self.batch_first,
                                        device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([proj.weight for proj in projections]))
            mha.out_proj.weight.copy_(inner.out_proj.weight)
            mha.in_proj_weight.requires_grad_(any(proj.weight.requires_grad for proj in projections))
            mha.out_proj.weight.requires_grad_(inner.out_proj.weight.requires_grad)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([cast(Tensor, proj.bias) for proj in projections]))
                mha.in_proj_bias.requires_grad_(any(cast(Tensor, proj.bias).requires_grad for proj in projections))
            if mha.out_proj.bias is not None and inner.out_proj.bias is not None:
                mha.out_proj.bias.copy_(inner.out_proj.bias)
                mha.out_proj.bias.requires_grad_(inner.out_proj.bias.requires_grad)
        return mha.train(self.training)

    @classmethod
    def from_torch(cls, mha: nn.Module, kind: str, **kwargs: Any) -> DropInMultiheadAttention:
        """A :class:`MultiheadAttention` of ``kind`` with ``mha``'s projections, on its device and dtype, in its
        training mode, with each parameter's ``requires_grad``. ``mha`` is an ``nn.MultiheadAttention`` or a
        :class:`DropInMultiheadAttention`, to change the kind of a swapped model: its ``causal``, dropout and
        chunk size are kept (and ``recompute`` and ``num_features`` where the new kind has them), unless given.

        ``kwargs`` go to :class:`MultiheadAttention` (``causal``, ``num_features``, ``seed``, ``chunk_size``,
        ``recompute``, ``dropout``, ``feature_map``; a map given here is moved to ``mha``'s device and dtype).
        ``dropout`` defaults to ``mha``'s; note that here it zeroes entries of the attention output, where torch's
        zeroes attention weights.

        Raises:
            ValueError: ``mha`` has key/value widths other than ``embed_dim`` (``kdim``/``vdim``), ``add_bias_kv``
                or ``add_zero_attn``, which the package's attention does not implement.
        """
        _refuse_parametrized(mha)
        if isinstance(mha, DropInMultiheadAttention):
            new = rebuilt(mha.attention, kind, **kwargs)
        elif isinstance(mha, nn.MultiheadAttention):
            new = cls._from_torch_module(mha, kind, kwargs)
            trainable = {f"{proj}.{part}": getattr(mha, f"in_proj_{part}").requires_grad
                         for proj in ("q_proj", "k_proj", "v_proj") for part in ("weight", "bias")
                         if getattr(mha, f"in_proj_{part}") is not None}
            trainable.update({f"out_proj.{name}": p.requires_grad for name, p in mha.out_proj.named_parameters()})
            for name, p in new.named_parameters():
                if name in trainable:  # frozen stays frozen, weights and biases each as they were
                    p.requires_grad_(trainable[name])
        else:
            raise TypeError(f"from_torch: expected nn.MultiheadAttention or DropInMultiheadAttention; got "
                            f"{type(mha).__name__}")
        drop_in = cls(new, batch_first=mha.batch_first)
        return drop_in.train(mha.training)  # a model swapped in eval mode stays so (no dropout at inference)

    @staticmethod
    def _from_torch_module(mha: nn.MultiheadAttention, kind: str, kwargs: dict[str, Any]) -> MultiheadAttention:
        unsupported = [name for name, on in (("kdim/vdim other than embed_dim", not mha._qkv_same_embed_dim),
                                             ("add_bias_kv", mha.bias_k is not None),
                                             ("add_zero_attn", mha.add_zero_attn)) if on]
        if unsupported:
            raise ValueError(f"from_torch: nn.MultiheadAttention with {', '.join(unsupported)} is not supported")
        kwargs.setdefault("dropout", mha.dropout)
        weight = mha.in_proj_weight
        with _weights_to_be_copied():
            new = MultiheadAttention(mha.embed_dim, mha.num_heads, kind=kind, bias=mha.in_proj_bias is not None,
                                     **kwargs).to(device=weight.device, dtype=weight.dtype)  # before copying
        _draw_unseeded_features(new)
        with torch.no_grad():
            for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), weight.chunk(3), strict=True):
                proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        """torch's call; returns ``(output, None)``. See the class docstring for the masks accepted."""
        if need_weights:
            raise ValueError(f"DropInMultiheadAttention: need_weights=True is not supported (kind "
                             f"{self.attention.kind!r}; the linear kinds never form attention weights); pass "
                             f"need_weights=False")
        if query.is_nested:  # nn.TransformerEncoder's nested-tensor path (in eval, without autograd), taken by an
            # encoder built before this module was put in: run padded, give the nested result it expects
            if key_padding_mask is not None:  # as torch's module: the lengths are the padding
                raise ValueError("DropInMultiheadAttention: nested inputs take no key_padding_mask (their sequences' "
                                 "lengths are the padding); pass padded tensors to use a mask")
            return self._nested_forward(query, key, value, attn_mask, is_causal), None
        unbatched = query.dim() == 2
        if unbatched:  # torch's unbatched form: (N, E), mask (Nk,); made a batch of one, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        causal = self.attention.causal or bool(is_causal)
        if attn_mask is not None:
            causal = _causal_or_none(attn_mask, query.shape[1], key.shape[1]) or causal
        out = self.attention(query, key, value, _padding_mask(key_padding_mask), causal=causal)
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _nested_forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                        is_causal: bool) -> Tensor:
        """A batch-first nested query, key and value (sequences of their own lengths) as padded tensors with a
        key padding mask; the output nested again, each sequence at its query's length."""
        if not (self.batch_first and key.is_nested and value.is_nested):
            raise ValueError("DropInMultiheadAttention: nested tensors are taken batch first (batch_first=True), "
                             "for query, key and value alike")
        q_lengths = [t.shape[0] for t in query.unbind()]
        k_lengths = torch.tensor([t.shape[0] for t in key.unbind()], device=key.device)
        padded = [torch.nested.to_padded_tensor(t, 0.0) for t in (query, key, value)]
        padding = torch.arange(padded[1].shape[1], device=key.device) >= k_lengths[:, None]  # True: padded
        causal = self.attention.causal or bool(is_causal)
        if attn_mask is not None:
            causal = _causal_or_none(attn_mask, padded[0].shape[1], padded[1].shape[1]) or causal
        out = self.attention(*padded, padding, causal=causal)
        return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, q_lengths, strict=True)])


def rebuilt(old: MultiheadAttention, kind: str, **kwargs: Any) -> MultiheadAttention:
    """A :class:`MultiheadAttention` of ``kind`` with ``old``'s projections, device, dtype, training mode and
    ``requires_grad``; ``old``'s ``causal``, dropout and chunk size (and ``recompute`` and ``num_features`` where the
    new kind has them) unless given in ``kwargs``; from "favor" to "favor" its drawn features and seed, from
    "linear" to "linear" a feature map of its own (see :func:`swap_attention`)."""
    _refuse_parametrized(old)
    for key, value in _settings_of(old, kind).items():
        kwargs.setdefault(key, value)
    keep_features = _keeps_features(old, kind, kwargs)
    if keep_features:  # the same seed, so that later redraws continue the same sequence
        kwargs["seed"] = cast(Any, old.feature_map).seed
    own_map = kwargs.get("feature_map") is old.feature_map is not None  # kept as it is, in its own dtype
    if own_map:
        kwargs.pop("feature_map")
    with _weights_to_be_copied():
        new = MultiheadAttention(old.embed_dim, old.num_heads, kind=kind, bias=old.q_proj.bias is not None,
                                 **kwargs).to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    if not keep_features:
        _draw_unseeded_features(new)
    if own_map:
        new.feature_map = old.feature_map
    kept = {k: v for k, v in old.state_dict().items() if keep_features or not k.startswith("feature_map.")}
    new.load_state_dict(kept, strict=False)
    trainable = {name: p.requires_grad for name, p in old.named_parameters() if "_proj." in name}
    for name, p in new.named_parameters():
        if name in trainable:  # frozen stays frozen, weights and biases each as they were
            p.requires_grad_(trainable[name])
    return new.train(old.training)


def _weights_to_be_copied() -> contextlib.AbstractContextManager[object]:
    """Around building a module whose weights (and kept features) are about to be overwritten: its initialisation
    must not draw from torch's global generator, which would shift the user's later draws (data order,
    initialisation). (Training draws other dropout masks than the original's where attention dropout is on: the
    drop-in zeroes output entries, torch's module attention weights.)"""
    return torch.random.fork_rng(devices=[])


def _draw_unseeded_features(module: MultiheadAttention) -> None:
    """Random features without a seed come from torch's global generator, as at construction: drawn again outside
    :func:`_weights_to_be_copied` (else every layer swapped from one generator state would get the same ones)."""
    if module.kind == "favor" and getattr(module.feature_map, "seed", None) is None:
        module.redraw_features()


def _refuse_parametrized(module: nn.Module) -> None:
    """ValueError naming the parametrized tensors of ``module`` (spectral_norm, weight_norm, orthogonal, ...): the
    replacement copies their current values into plain parameters, so the constraint would be dropped without a
    word (and the state_dict's ``parametrizations.*`` keys with it)."""
    inner = module.attention if isinstance(module, DropInMultiheadAttention) else module
    prefix = "attention." if inner is not module else ""
    # the projections alone are copied into new parameters (a feature map of one's own is kept as it is)
    copied = [("", inner)] if isinstance(inner, nn.MultiheadAttention) else []
    copied += [(name, getattr(inner, name)) for name in ("q_proj", "k_proj", "v_proj", "out_proj")
               if isinstance(getattr(inner, name, None), nn.Module)]
    tensors = [f"{prefix}{name + '.' if name else ''}{tensor}" for name, m in copied
               if parametrize.is_parametrized(m) for tensor in cast(Any, m).parametrizations]
    if tensors:
        raise ValueError(f"the attention module's {', '.join(tensors)} {'is' if len(tensors) == 1 else 'are'} "
                         "parametrized "
                         "(spectral_norm, weight_norm, ...), which the replacement would drop: remove the "
                         "parametrizations (torch.nn.utils.parametrize.remove_parametrizations), swap, then register "
                         "them on the new module")


def _is_cross_attention(model: nn.Module, name: str) -> bool:
    """Whether the attention module at ``name`` is a torch decoder layer's cross-attention (``multihead_attn``)."""
    parent_name, _, attr = name.rpartition(".")
    return attr == "multihead_attn" and isinstance(model.get_submodule(parent_name), nn.TransformerDecoderLayer)


def _keeps_features(old: MultiheadAttention, kind: str, kwargs: dict[str, Any]) -> bool:
    """Whether a FAVOR+ module swapped to FAVOR+ again keeps its drawn features, its seed and its generator's state:
    unless a ``seed`` or another number of features is asked for, a re-swap (to set ``recompute`` or
    ``chunk_size``) must not change what the model computes."""
    return (kind == "favor" and old.kind == "favor" and "seed" not in kwargs
            and kwargs.get("num_features") == getattr(old.feature_map, "num_features", None))


def _settings_of(old: MultiheadAttention, kind: str) -> dict[str, Any]:
    """What a change of kind keeps: causality, dropout, chunk size, and what still applies to the new kind
    (``recompute`` for the linear kinds, the number of random features from FAVOR+ to FAVOR+, a feature map of
    one's own from "linear" to "linear")."""
    settings: dict[str, Any] = {"causal": old.causal, "dropout": old.dropout.p, "chunk_size": old.chunk_size}
    if kind in ("linear", "favor") and old.recompute:
        settings["recompute"] = True
    if kind == "favor" and old.kind == "favor":
        settings["num_features"] = getattr(old.feature_map, "num_features", 256)
    if kind == "linear" and old.kind == "linear" and type(old.feature_map) is not EluFeatures:
        settings["feature_map"] = old.feature_map  # a map of one's own (trained, perhaps) is kept, not replaced
    return settings


def _blocked(mask: Tensor, name: str) -> Tensor:
    """The entries a bool mask (True) or torch's float form of one (−inf) blocks; other floats are biases."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"DropInMultiheadAttention: {name} must be bool or floating point; got {mask.dtype}")
    blocked = torch.isneginf(mask)
    if not bool(readable(blocked | (mask == 0)).all()):  # readable: under torch.func.vmap, every example's
        raise ValueError(f"DropInMultiheadAttention: {name} holds values other than 0 and -inf (an additive bias), "
                         f"which kernelised attention cannot apply")
    return blocked


def _padding_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else _blocked(mask, "key_padding_mask")


def _causal_or_none(mask: Tensor, n_q: int, n_k: int) -> bool:
    """True for the causal mask, False for a mask that blocks nothing; anything else raises."""
    if mask.shape != (n_q, n_k):
        raise ValueError(f"DropInMultiheadAttention: attn_mask must be ({n_q}, {n_k}) (per-head masks are not "
                         f"supported); got {tuple(mask.shape)}")
    blocked = _blocked(mask, "attn_mask")
    if not bool(readable(blocked).any()):
        return False
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).triu(1)
    if bool(readable(blocked == causal).all()):  # under torch.func.vmap, every example's mask must be causal
        return True
    raise ValueError("DropInMultiheadAttention: attn_mask must be the causal mask or none (kernelised attention "
                     "cannot apply an arbitrary mask); use key_padding_mask for padding")


def _layer_seeds(seed: object, n: int) -> list[int] | None:
    """``n`` distinct seeds drawn from ``seed`` (None unless it is an integer: the map's own check then speaks).
    One seed for every layer had given every layer the same random features, redrawn in lockstep."""
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        return None
    generator = torch.Generator().manual_seed(int(seed))  # a CPU generator, on the CPU inside any device context
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=generator, device="cpu")]


#: a model's own type, which swap_attention and unswap_attention keep (they change it in place and return it)
_Model = TypeVar("_Model", bound=nn.Module)


@overload
def swap_attention(model: MultiheadAttention, kind: str, **kwargs: Any) -> MultiheadAttention: ...
@overload
def swap_attention(model: nn.MultiheadAttention | DropInMultiheadAttention, kind: str,  # type: ignore[overload-overlap]
                   **kwargs: Any) -> DropInMultiheadAttention: ...
@overload
def swap_attention(model: _Model, kind: str, **kwargs: Any) -> _Model: ...
def swap_attention(model: nn.Module, kind: str, **kwargs: Any) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a :class:`DropInMultiheadAttention` of ``kind``.

    In place: each replacement keeps the original's projection weights, device, dtype, ``batch_first``, training
    mode and ``requires_grad`` (:meth:`DropInMultiheadAttention.from_torch`; ``kwargs`` go there). A module reached
    from several places (tied layers) gets one replacement, shared at each. An already swapped model changes kind
    (its :class:`DropInMultiheadAttention` modules are rebuilt with their projections), and so do the package's
    own :class:`MultiheadAttention` modules (a :class:`~theorylab.experiments.CharTransformer`'s blocks: each is
    replaced by one of ``kind``, a :class:`MultiheadAttention` still). ``nn.TransformerEncoder``'s
    nested-tensor fast path is switched off (``use_nested_tensor = False``), so that padded positions get the
    outputs they get in training (that path gives them zeros); a drop-in put into an encoder by hand runs it.
    Returns ``model``, or the replacement when ``model`` is itself an attention module. With a ``seed``, each
    replacement's feature map gets its own seed drawn from it (layer by layer in module order), so the layers'
    random features differ and the same ``seed`` gives the same model; a single module is given ``seed`` itself.

    Args:
        model: the model to change in place, or a single ``nn.MultiheadAttention``,
            :class:`DropInMultiheadAttention` or :class:`MultiheadAttention` (then the replacement is returned). A
            model without attention modules is returned unchanged.
        kind: the new attention: "softmax", "separable", "linear" or "favor" (see :class:`MultiheadAttention`).
        **kwargs: the keywords of :class:`MultiheadAttention` that :meth:`DropInMultiheadAttention.from_torch`
            does not set itself: ``causal`` (default False), ``num_features`` (``kind="favor"``, default 256),
            ``dropout`` (default: the original's ``dropout``; zeroes entries of the attention output, where
            torch's zeroes attention weights), ``seed`` (see above; default None), ``chunk_size`` (default None),
            ``recompute`` (kinds "linear" and "favor", default False) and ``feature_map`` (``kind="linear"``;
            each swapped layer gets its own copy of it; a single module, the map itself). ``causal=True`` makes
            every swapped module causal: it is refused where the model holds a decoder layer's cross-attention
            (pass the masks at the call there; a cross-attention module of your own is made causal too).
            Swapping an already swapped model keeps its ``causal``, ``dropout`` and ``chunk_size`` (and
            ``recompute`` and ``num_features`` where the new kind has them) unless given; from "favor" to "favor"
            it keeps the drawn features and their seed too, unless ``seed`` or another ``num_features`` is given,
            and from "linear" to "linear" a feature map of one's own, as it is (a change to another kind drops
            it: back to "linear" is elu + 1 again). ``embed_dim``, ``num_heads`` and ``bias``
            come from the original.

    The replacements are new modules with new parameters (the weights copied): build the optimizer after swapping
    (one built before goes on stepping the old parameters), and load a checkpoint of the unswapped model before
    swapping (the parameter names change: ``in_proj_weight`` becomes ``attention.q_proj.weight``, ...).
    :func:`unswap_attention` goes back: torch's modules and names, with the weights trained since.

    Returns:
        ``model``, changed in place; or the new :class:`DropInMultiheadAttention` when ``model`` is itself an
        attention module.

    Raises (before anything is replaced, naming the module where one is refused):
        ValueError: an unknown ``kind``; ``causal=True`` with a decoder layer's cross-attention; a keyword value
            :class:`MultiheadAttention` refuses (dropout outside [0, 1), ``recompute`` with a kind other than
            "linear" or "favor", ...); an ``nn.MultiheadAttention`` with ``kdim``/``vdim`` other than
            ``embed_dim``, ``add_bias_kv`` or ``add_zero_attn``; an attention module with parametrized weights
            (``spectral_norm``, ``weight_norm``, ...), which the copy would drop.
        TypeError: a keyword :class:`MultiheadAttention` does not take (``bias`` included), or a value of the wrong
            type (``causal`` not a bool, a non-integer ``seed`` with ``kind="favor"``, ...). An unknown ``kind`` is
            refused first, whatever the model holds; the keyword values only where there is a module to replace
            (the replacements' constructor checks them).

    The swapped modules then raise when they are called (:meth:`DropInMultiheadAttention.forward`, for every kind,
    softmax included): ValueError for ``need_weights=True``, for an ``attn_mask`` that is neither the causal mask
    nor one that blocks nothing, that is not (Nq, Nk) (per-head masks) or that holds float values other than 0
    and −inf (an additive bias), and for a float ``key_padding_mask`` with values other than 0 and −inf; TypeError
    for an integer ``attn_mask`` or ``key_padding_mask`` given to the module directly (torch's Transformer
    layers refuse those first, with an AssertionError of their own); kinds "linear" and "favor" refuse a causal
    call with different query and key lengths (ValueError, from :func:`~theorylab.attention.linear_attention`).

    Example::

        layer = nn.TransformerEncoderLayer(256, 8, batch_first=True)
        encoder = swap_attention(nn.TransformerEncoder(layer, 4), "favor", num_features=128)
        y = encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(n), is_causal=True)
    """
    if kind not in KINDS:  # checked here too: a model with no attention module would have swallowed a typo
        raise ValueError(f"swap_attention: kind must be one of {KINDS}; got {kind!r}")
    swappable = (nn.MultiheadAttention, DropInMultiheadAttention, MultiheadAttention)
    if isinstance(model, MultiheadAttention):
        return rebuilt(model, kind, **kwargs)
    if isinstance(model, swappable):
        return DropInMultiheadAttention.from_torch(model, kind, **kwargs)
    replacements: dict[int, nn.Module] = {}
    # remove_duplicate=False: a module shared by two parents is found at both paths (and replaced once)
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, swappable)]
    targets = [(name, m) for name, m in targets
               if not any(name.startswith(other + ".") for other, _ in targets)]  # not inside another target
    cross = [name for name, _ in targets if _is_cross_attention(model, name)]
    if kwargs.get("causal") is True and cross:  # checked before anything is replaced
        raise ValueError(f"swap_attention: causal=True would make the cross-attention of {', '.join(cross)} causal "
                         "(its queries are the target, its keys the encoder's memory); pass the causal masks at the "
                         "call instead (tgt_mask=..., tgt_is_causal=True), which the swapped modules follow")
    distinct = list({id(m): m for _, m in targets})
    layer_seeds = _layer_seeds(kwargs.get("seed"), len(distinct))
    for name, module in targets:  # every replacement built before any is put in: a refusal changes nothing
        if id(module) in replacements:
            continue
        if layer_seeds is not None:
            kwargs["seed"] = layer_seeds[distinct.index(id(module))]
        layer_kwargs = kwargs
        if kwargs.get("feature_map") is not None:  # each layer its own copy, trained on its own
            layer_kwargs = {**kwargs, "feature_map": copy.deepcopy(kwargs["feature_map"])}
        with _naming(name, "swap_attention"):
            replacements[id(module)] = rebuilt(module, kind, **layer_kwargs) if isinstance(
                module, MultiheadAttention) else DropInMultiheadAttention.from_torch(module, kind, **layer_kwargs)
    _put_in(model, targets, replacements)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model


@overload
def unswap_attention(model: DropInMultiheadAttention) -> nn.MultiheadAttention: ...  # type: ignore[overload-overlap]
@overload
def unswap_attention(model: _Model) -> _Model: ...
def unswap_attention(model: nn.Module) -> nn.Module:
    """Replace every :class:`DropInMultiheadAttention` in ``model`` by an ``nn.MultiheadAttention`` with its
    projections (:meth:`DropInMultiheadAttention.to_torch`): the inverse of :func:`swap_attention` for
    ``kind="softmax"``, and for the other kinds a softmax model with the projections they trained.

    In place, as :func:`swap_attention` (a shared module gets one replacement; a refusal changes nothing). Returns
    ``model``, or the ``nn.MultiheadAttention`` when ``model`` is itself a :class:`DropInMultiheadAttention`. The
    result's ``state_dict`` has torch's names, so it loads into the model as built before swapping.
    ``nn.TransformerEncoder``'s ``use_nested_tensor`` stays off (torch's fast path writes zeros at padded positions,
    which the swapped model did not).

    Example::

        serving = unswap_attention(copy.deepcopy(swapped))   # plain torch, the weights trained after swapping
        torch.save(serving.state_dict(), "model.pt")

    Raises:
        ValueError: a module was built causal (``swap_attention(..., causal=True)``), naming it; a module has
            parametrized weights (the copy would drop them).
    """
    if isinstance(model, DropInMultiheadAttention):
        return model.to_torch()
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, DropInMultiheadAttention)]
    replacements: dict[int, nn.Module] = {}
    for name, module in targets:
        if id(module) not in replacements:
            with _naming(name, "unswap_attention"):
                replacements[id(module)] = module.to_torch()
    _put_in(model, targets, replacements)
    return model


@contextlib.contextmanager
def _naming(name: str, function: str) -> Iterator[None]:
    """Re-raise a ValueError or TypeError from building the replacement of the module at ``name`` with that name:
    in a model of many layers, which one was refused."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):  # a subclass may not take one message
            raise
        raise type(e)(f"{function}: the module at {name!r}: {e}") from e


def _put_in(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], replacements: dict[int, Any]) -> None:
    """Set each target path of ``model`` to its module's replacement (tied modules: one replacement, shared)."""
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, replacements[id(module)])
