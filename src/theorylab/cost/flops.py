"""FLOPs of a call, counted by PyTorch's ``FlopCounterMode`` (matmuls, convolutions, attention kernels — not
elementwise ops such as softmax or exp).

torch 2.13's counter has no formula for SDPA's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``,
what ``scaled_dot_product_attention`` runs on CPU tensors when the value head dim equals the key's): such calls
counted 0, while the same call on meta tensors or with Dv != D counted in full. :func:`count_flops` adds that
kernel, forward and backward, with torch's own SDPA formulas. As torch does, causal attention is counted in full.
The backward formula is the flash kernel's, which recomputes the scores: one (N, N) matmul more than the math
backend's backward that the same call runs on meta tensors (7 against 6 matmuls of 2·N²·D FLOPs per head, forward
included, when Dv = D). It also adds the matrix-vector and dot products that torch 2.13's counter left at 0
(``mv``, ``addmv``, ``dot``, ``vdot``; ``nn.Linear`` on a vector was counted, ``A @ x`` was not), and the
matrix products it also left at 0: the in-place ``addmv_``, ``addmm_`` and ``baddbmm_`` (whose out-of-place and
``out=`` forms it counts) and the batch-summed ``addbmm`` and ``addbmm_`` (in every form).

Some fused kernels do matrix products that the counter has no formula for, and :func:`count_flops` has none
either: torch's inference fast path of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (eval mode
without autograd), the oneDNN kernel of ``nn.LSTM`` on the CPU, the cuDNN/MIOpen kernels of the recurrent layers on a
GPU, and ``nn.Bilinear``'s ``_trilinear``. A call that runs one counts it as 0 FLOPs, so :func:`count_flops` warns,
naming the kernels and how to avoid them: the same module in training mode counted in full while its eval-mode
count read 0.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

#: the fused kernels above that no formula counts, each with how a caller can count its work instead
_UNCOUNTED = {
    "_native_multi_head_attention": "torch's inference fast path of nn.MultiheadAttention; count in training mode "
                                    "or after torch.backends.mha.set_fastpath_enabled(False)",
    "_transformer_encoder_layer_fwd": "torch's inference fast path of nn.TransformerEncoderLayer; count in "
                                      "training mode or after torch.backends.mha.set_fastpath_enabled(False)",
    "mkldnn_rnn_layer": "the oneDNN kernel of nn.LSTM on the CPU",
    "mkldnn_rnn_layer_backward": "the oneDNN kernel of nn.LSTM on the CPU",
    "_cudnn_rnn": "the cuDNN kernel of nn.RNN/GRU/LSTM",
    "_cudnn_rnn_backward": "the cuDNN kernel of nn.RNN/GRU/LSTM",
    "miopen_rnn": "the MIOpen kernel of nn.RNN/GRU/LSTM",
    "miopen_rnn_backward": "the MIOpen kernel of nn.RNN/GRU/LSTM",
    "_trilinear": "nn.Bilinear (torch.bilinear); torch.einsum of the same product is counted",
}


def _cpu_flash(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _mv(mat: Any, vec: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * mat[0] * mat[1]


def _addmv(bias: Any, mat: Any, vec: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * mat[0] * mat[1]


def _dot(a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a[0]


def _addmm(bias: Any, a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a[0] * a[1] * b[1]


def _baddbmm(bias: Any, a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]  # addbmm too: the same products, summed over the batch


def _missing_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the kernels torch's counter lacks (shapes in, FLOPs out), where this torch has the kernel."""
    aten = torch.ops.aten
    pairs = (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward),
             ("mv", _mv), ("addmv", _addmv), ("addmv_", _addmv), ("dot", _dot), ("vdot", _dot),
             ("addmm_", _addmm), ("baddbmm_", _baddbmm), ("addbmm", _baddbmm), ("addbmm_", _baddbmm))
    return {getattr(aten, name): fn for name, fn in pairs if hasattr(aten, name)}


def _noting(calls: Counter[str]) -> dict[Any, Callable[..., int]]:
    """Formulas for the kernels in ``_UNCOUNTED`` that count 0 FLOPs and note each call in ``calls``: the counter
    itself sees every kernel (a second dispatch mode to watch them broke ``torch.cond`` and the other higher-order
    operators, which a mode must declare it supports)."""
    def noting(name: str) -> Callable[..., int]:
        def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            calls[name] += 1
            return 0
        return formula

    aten = torch.ops.aten
    return {getattr(aten, name): noting(name) for name in _UNCOUNTED if hasattr(aten, name)}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (a multiply-add counts 2).

    Warns (``UserWarning``) when the call ran a fused kernel whose matrix products no formula counts (see the
    module's docstring): the total then leaves them out."""
    uncounted: Counter[str] = Counter()
    with FlopCounterMode(display=False, custom_mapping={**_missing_formulas(), **_noting(uncounted)}) as counter:
        fn(*args, **kwargs)
    if uncounted:
        kernels = "; ".join(f"aten.{name} ×{n} ({_UNCOUNTED[name]})" for name, n in uncounted.items())
        warnings.warn(f"count_flops: the call ran kernels whose matrix products torch's FlopCounterMode has no "
                      f"formula for, so the count leaves them out: {kernels}", UserWarning, stacklevel=2)
    return int(counter.get_total_flops())
