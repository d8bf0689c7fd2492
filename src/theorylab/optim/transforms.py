"""Composable gradient transforms, in the manner of optax, over torch tensors.

A transform maps the list of *updates* of one parameter group (initially the gradients) to a new list of
updates. A chain of transforms runs left to right and the optimizer then applies ``p <- p - u``. Every named
optimizer in :mod:`theorylab.optim` is such a chain; what distinguishes, say, Adam + L2 from decoupled decay is
only *where* the decay transform sits relative to Adam's scaling.

Each transform keeps its per-parameter state under its own keys in ``optimizer.state[p]`` (so ``state_dict``
works unchanged) and works on whole lists with ``torch._foreach_*`` kernels, which is what torch.optim's
``foreach`` implementations do.

Transforms receive a :class:`StepContext`: the parameters, their per-parameter state dicts, the parameter
group (so hyperparameters read from the group, and lr schedulers are honoured), and the step count ``t``
(1 on the first step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class StepContext:
    """What a transform may read during one optimizer step of one parameter group."""

    params: list[Tensor]
    states: list[dict[str, Any]]
    group: dict[str, Any]
    step: int


class Transform(Protocol):
    """``update(updates, ctx) -> updates``. May modify ``updates`` in place (they are the chain's own copies)."""

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]: ...


def _buffers(ctx: StepContext, key: str, like: list[Tensor]) -> list[Tensor]:
    """Per-parameter state tensors under ``key``, created as zeros on first use."""
    out = []
    for state, u in zip(ctx.states, like):
        if key not in state:
            state[key] = torch.zeros_like(u, memory_format=torch.preserve_format)
        out.append(state[key])
    return out


@dataclass(frozen=True)
class ScaleByLearningRate:
    r"""``u <- lr * u`` with ``lr = group["lr"]`` read at every step (so lr schedulers apply)."""

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        torch._foreach_mul_(updates, ctx.group["lr"])
        return updates


@dataclass(frozen=True)
class Trace:
    r"""Momentum as a trace: :math:`v_t = \mu\, v_{t-1} + u_t`, output :math:`v_t`.

    ``mu`` is read from ``group[key]``. With ``dampening`` d the input is scaled by (1 - d), as torch.optim.SGD;
    ``first_step_copies=True`` initialises :math:`v_1 = u_1` without dampening (torch.optim.SGD's buffer rule).
    ``nesterov`` returns :math:`u_t + \mu v_t`.
    """

    key: str = "momentum"
    state_key: str = "momentum_buffer"
    dampening_key: str | None = None
    first_step_copies: bool = False
    nesterov_key: str | None = None

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        mu = ctx.group[self.key]
        if mu == 0:
            return updates
        damp = ctx.group[self.dampening_key] if self.dampening_key else 0.0
        fresh = [self.state_key not in s for s in ctx.states]
        bufs = _buffers(ctx, self.state_key, updates)
        if self.first_step_copies and all(fresh):
            torch._foreach_copy_(bufs, updates)
        else:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, updates, alpha=1.0 - damp)
        if self.nesterov_key and ctx.group.get(self.nesterov_key, False):
            torch._foreach_add_(updates, bufs, alpha=mu)
            return updates
        # a copy: later transforms modify their input in place, and must not touch the state
        return [b.clone() for b in bufs]


@dataclass(frozen=True)
class RunningAverage:
    r"""Exponential running average :math:`v_t = \beta v_{t-1} + (1-\beta) u_t` with :math:`v_0 = 0`.

    Unrolled, :math:`v_t = (1-\beta)\sum_{i=1}^t \beta^{t-i} u_i`, whose weights sum to :math:`1-\beta^t`: under
    a stationary mean μ, :math:`E[v_t] = (1-\beta^t)\mu`. With ``debias`` the output is
    :math:`\hat v_t = v_t / (1-\beta^t)`, which is unbiased. ``beta`` is read from ``group[key]`` (or from
    ``group[key][index]`` when ``index`` is set, for Adam's ``betas``); ``debias`` from ``group[debias_key]``
    when that is set.
    """

    key: str = "beta"
    state_key: str = "running_average"
    index: int | None = None
    debias: bool = False
    debias_key: str | None = None

    def beta(self, group: dict[str, Any]) -> float:
        b = group[self.key]
        return b[self.index] if self.index is not None else b

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        beta = self.beta(ctx.group)
        bufs = _buffers(ctx, self.state_key, updates)
        torch._foreach_lerp_(bufs, updates, 1.0 - beta)  # v <- v + (1-β)(u - v) = βv + (1-β)u
        debias = ctx.group[self.debias_key] if self.debias_key else self.debias
        if debias:
            return torch._foreach_div(bufs, 1.0 - beta**ctx.step)
        return [b.clone() for b in bufs]


def chain_step(transforms: list[Transform], ctx: StepContext, grads: list[Tensor]) -> None:
    """Run the chain on copies of ``grads`` and apply ``p <- p - u`` to every parameter of ``ctx``."""
    updates = [g.clone() for g in grads]
    for t in transforms:
        updates = t.update(updates, ctx)
    torch._foreach_sub_(ctx.params, updates)
