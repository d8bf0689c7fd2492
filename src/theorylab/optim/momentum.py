r"""Momentum and the exponential running average: two forms of one optimizer (claims 2.1–2.3).

Momentum (the problem set's form, learning rate ε inside the buffer):

.. math::  v_t = \alpha v_{t-1} + \varepsilon g_t, \qquad \theta_t = \theta_{t-1} - v_t,

so :math:`\Delta\theta_t = \alpha\,\Delta\theta_{t-1} - \varepsilon g_t`.

SGD on a running average of the gradients:

.. math::  v_t = \beta v_{t-1} + (1-\beta) g_t, \qquad \theta_t = \theta_{t-1} - \delta v_t,

so :math:`\Delta\theta_t = \beta\,\Delta\theta_{t-1} - \delta(1-\beta) g_t`. The two produce the same iterates iff
:math:`\alpha = \beta` and :math:`\varepsilon = \delta(1-\beta)` (at a constant learning rate; under a schedule the
momentum form has lr inside its buffer and the running-average form outside, so they part).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import (
    ChainOptimizer,
    as_param_list,
    as_real,
    check_beta,
    check_common_keys,
    check_flag,
    check_lr,
    check_nonnegative,
)
from .transforms import RunningAverage, ScaleByLearningRate, Trace, Transform


def check_no_weight_decay(group: dict[str, Any], name: str) -> None:
    """These forms have no weight decay: a group that asks for one (``decay_param_groups`` makes such groups) is a
    ValueError, not a decay silently dropped."""
    wd = group.get("weight_decay")
    if wd is not None and as_real(wd, "weight_decay value") != 0:
        raise ValueError(f"{name} has no weight decay, but a parameter group asks for weight_decay={wd!r}: use "
                         "SGD(..., momentum=..., weight_decay=..., decay=...) for momentum with weight decay")


class SGDMomentum(ChainOptimizer):
    r"""SGD with momentum in the problem set's form: :math:`v \leftarrow \mu v + \eta g`, :math:`p \leftarrow p - v`.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0, multiplies the gradient *before* it enters the buffer.
        momentum: μ ≥ 0 (μ = 0 is plain SGD).
        nonfinite: what a NaN or ±inf gradient does: ``"raise"`` (default) raises NonFiniteGradientError and
            changes nothing, ``"skip"`` skips the step, ``"propagate"`` steps as torch.optim does.

    Raises ValueError naming the value for lr < 0, momentum < 0 or an unknown ``nonfinite``.

    Unlike ``torch.optim.SGD`` (:math:`v \leftarrow \mu v + g`, :math:`p \leftarrow p - \eta v`) the learning rate
    lives inside the buffer; the two agree at a constant learning rate, but their ``momentum_buffer`` states differ
    by the factor η, so a state_dict of one does not load into the other. Validation and complex parameters: see
    :class:`ChainOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float, *, nonfinite: str = "raise") -> None:
        defaults = {"lr": lr, "momentum": momentum, "nonfinite": nonfinite}
        check_common_keys(defaults)  # lr first: check_group computes with it (lr·λ < 1)
        self.check_group(defaults)
        super().__init__(as_param_list(params), defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's momentum (ValueError naming it); weight decay is refused (see the class)."""
        group["momentum"] = check_nonnegative(group["momentum"], "momentum")
        check_no_weight_decay(group, "SGDMomentum")

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        """The chain: the lr, then the momentum trace (the buffer holds lr-scaled gradients)."""
        return [ScaleByLearningRate(), Trace(key="momentum", state_key="momentum_buffer")]


class RunningAverageSGD(ChainOptimizer):
    r"""SGD along an exponential running average of the gradients.

    :math:`v_t = \beta v_{t-1} + (1-\beta) g_t` (:math:`v_0 = 0`), then :math:`p \leftarrow p - \delta\, v_t`, or with
    ``debias=True`` :math:`p \leftarrow p - \delta\, v_t / (1-\beta^t)` (Adam's bias correction).

    Args:
        params: parameters or parameter groups.
        lr: δ ≥ 0.
        beta: β in (0, 1), the group key ``"beta"``. torch's OneCycleLR and CyclicLR cycle a ``"momentum"`` or
            ``"betas"`` key and refuse this optimizer at their default ``cycle_momentum=True``: pass
            ``cycle_momentum=False``, or use :class:`SGDMomentum`, whose ``"momentum"`` they cycle.
        debias: divide by :math:`1-\beta^t`, which makes :math:`E[v_t] = \mu` under a stationary mean μ.
        nonfinite: what a NaN or ±inf gradient does: ``"raise"`` (default) raises NonFiniteGradientError and
            changes nothing, ``"skip"`` skips the step, ``"propagate"`` steps as torch.optim does.

    Raises ValueError naming the value for lr < 0, β outside (0, 1), a non-bool ``debias`` or an unknown
    ``nonfinite``. Validation and complex parameters: see :class:`ChainOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float, beta: float, debias: bool = False, *,
                 nonfinite: str = "raise") -> None:
        defaults = {"lr": lr, "beta": beta, "debias": debias, "nonfinite": nonfinite}
        check_common_keys(defaults)  # lr first: check_group computes with it (lr·λ < 1)
        self.check_group(defaults)
        super().__init__(as_param_list(params), defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's beta and debias (ValueError naming them); weight decay is refused."""
        group["beta"] = check_beta(group["beta"], "beta")
        group["debias"] = check_flag(group["debias"], "debias")
        check_no_weight_decay(group, "RunningAverageSGD")

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        """The chain: the running average (debiased when ``debias``), then the lr."""
        return [RunningAverage(key="beta", state_key="running_average", debias_key="debias"),
                ScaleByLearningRate()]


def momentum_from_running_average(beta: float, lr: float) -> tuple[float, float]:
    r"""The :class:`SGDMomentum` hyperparameters equivalent to ``RunningAverageSGD(lr, beta)``: ``(β, lr·(1-β))``.

    From :math:`\Delta\theta_t = \beta\Delta\theta_{t-1} - \delta(1-\beta) g_t` against
    :math:`\Delta\theta_t = \alpha\Delta\theta_{t-1} - \varepsilon g_t`: α = β and ε = δ(1-β).

    At a constant lr only: :class:`SGDMomentum` keeps the lr inside its buffer (v ← αv + ε_t g), the running
    average outside (θ ← θ − δ_t v), so under a schedule the two part (10% apart after a StepLR halving). The twin
    under any schedule is torch's form, ``SGD(lr=δ(1-β), momentum=β)`` (buffer b ← βb + g = v/(1−β), θ ← θ − lr_t b),
    whose scheduler scales lr like δ. A running-average state moves to SGDMomentum as
    ``momentum_buffer = δ·running_average`` (state_dicts of the two are refused by each other: their buffers differ).

    Raises ValueError naming the value for β outside (0, 1) or lr < 0 (TypeError if lr is not a number).
    """
    beta, lr = check_beta(beta, "beta"), check_lr(lr)
    return beta, lr * (1.0 - beta)


def running_average_from_momentum(momentum: float, lr: float) -> tuple[float, float]:
    """The inverse map: ``(beta, lr_running_average) = (α, ε / (1-α))`` for momentum α in (0, 1)."""
    momentum, lr = check_beta(momentum, "momentum"), check_lr(lr)
    return momentum, lr / (1.0 - momentum)
