"""A torch.optim.Optimizer whose step is a chain of :mod:`theorylab.optim.transforms`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .transforms import StepContext, Transform, chain_step


def check_lr(lr: float) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")


def check_beta(beta: float, name: str = "beta", *, allow_zero: bool = False) -> None:
    """β must lie in (0, 1), or [0, 1) with ``allow_zero``; β = 1 would never forget and never debias."""
    low_ok = beta >= 0 if allow_zero else beta > 0
    if not isinstance(beta, (int, float)) or not (low_ok and beta < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"Invalid {name} value: {beta} (must lie in {interval})")


def check_nonnegative(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name} value: {value} (must be a finite number >= 0)")


class ChainOptimizer(torch.optim.Optimizer):
    """Base class: subclasses return the transform chain of a parameter group in :meth:`transforms`.

    Per parameter it keeps ``state["step"]`` (a float tensor, as torch.optim does) plus the transforms' buffers.
    Parameters without a gradient are skipped and their step count does not advance; parameters of one group
    with different step counts are stepped in buckets, so bias corrections use each parameter's own count.
    """

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            chain = self.transforms(group)
            buckets: dict[int, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["step"] += 1
                buckets[int(state["step"].item())].append(p)
            for t, params in buckets.items():
                ctx = StepContext(params=params, states=[self.state[p] for p in params], group=group, step=t)
                chain_step(chain, ctx, [p.grad for p in params])
        return loss


def as_param_list(params: Iterable[Any]) -> Iterable[Any]:
    """Materialise generators so that the emptiness check of torch.optim gives a clear error."""
    return list(params) if not isinstance(params, Tensor) else params
