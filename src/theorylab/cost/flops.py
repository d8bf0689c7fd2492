"""FLOPs of a call, counted by PyTorch's ``FlopCounterMode`` (matmuls, convolutions, attention kernels — not
elementwise ops such as softmax or exp)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
