"""Attention: exact (SDPA + naive reference), separable, kernelised linear (non-causal and chunked causal) with
feature maps (FAVOR+ positive, trigonometric, elu+1, relu), a batch-first multi-head module, and a drop-in for
``nn.MultiheadAttention`` inside torch's Transformer layers (``swap_attention``). Causal linear and separable
attention also run in their recurrent form (``state=`` / ``return_state=True``: a prompt, then one token at a time
at a cost that does not grow with the prefix; :class:`LinearAttentionState`); ``MultiheadAttention`` decodes every
kind so, exact attention through a :class:`KVCache`.

Layout follows torch SDPA: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv);
``key_padding_mask`` is bool (B, Nk) with True = padding (ignored). The naive references every fast path is
tested against live beside them: ``exact.softmax_attention_reference``,
``separable.separable_attention_reference``, ``linear.linear_attention_reference`` (and, for positive feature
maps at any input scale, the log-domain ``linear.linear_attention_log_reference``).

Every function takes floating-point q, k, v only (TypeError naming the dtype otherwise) and returns zeros of
shape (B, H, Nq, Dv) when there is nothing to attend to (Nk = 0, or an empty batch).
"""

from .exact import softmax_attention
from .features import EluFeatures, PositiveRandomFeatures, ReluFeatures, TrigRandomFeatures
from .linear import linear_attention
from .multihead import MultiheadAttention
from .separable import separable_attention
from .state import KVCache, LinearAttentionState
from .swap import DropInMultiheadAttention, swap_attention, unswap_attention

__all__ = [
    "softmax_attention",
    "separable_attention",
    "linear_attention",
    "LinearAttentionState",
    "KVCache",
    "PositiveRandomFeatures",
    "TrigRandomFeatures",
    "EluFeatures",
    "ReluFeatures",
    "MultiheadAttention",
    "DropInMultiheadAttention",
    "swap_attention",
    "unswap_attention",
]
