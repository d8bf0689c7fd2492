"""Where the decay part sits: the three weight-decay conventions as positions in a transform chain."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from .transforms import AddDecayedWeights, ScaleByLearningRate, Transform, reference_lr, schedule_multiplier

DECAY_MODES = ("l2", "decoupled", "decoupled_lr")

#: shown once per optimizer (a set of the optimizers warned, not Python's warning registry, which any change of the
#: filters clears and which would keep the second optimizer of a sweep silent)
RISING_LR_WARNING = (
    "decay='decoupled': the lr is above the group's initial_lr, so the decay per step, weight_decay * lr / "
    "initial_lr, is above weight_decay (the schedule multiplier of Loshchilov & Hutter's Algorithm 2). Schedules "
    "that start low and rise (OneCycleLR starts at max_lr/25, CyclicLR at base_lr) multiply it by up to "
    "max_lr/initial_lr: choose weight_decay for that peak, or use decay='decoupled_lr'")


def check_decay(decay: str) -> None:
    if not isinstance(decay, str):  # a number or bool here is a positional slip, worth saying which
        hint = ("; a number or bool here is usually a torch.optim argument given by position (torch.optim.SGD's "
                "fourth is dampening, torch.optim.Adam's sixth amsgrad): pass those by keyword")
        raise ValueError(f"Invalid decay mode: {decay!r} (must be one of {', '.join(map(repr, DECAY_MODES))})"
                         f"{hint}")
    if decay not in DECAY_MODES:
        raise ValueError(f"Invalid decay mode: {decay!r} (must be one of {', '.join(map(repr, DECAY_MODES))})")


_warned_rising_lr: weakref.WeakSet[object] = weakref.WeakSet()


def check_decay_rate(group: dict[str, Any], owner: object | None = None) -> None:
    r"""The decoupled decays multiply θ by :math:`1 - s` per step; :math:`s \ge 1` zeroes θ or flips its sign (and
    from :math:`s > 2` on, grows it), so :math:`s < 1` is required. Raise ValueError naming the values otherwise.

    * ``"decoupled"``: :math:`s = \lambda\,\text{lr}/\text{lr}_0`; λ itself (s at the initial lr) must be < 1;
    * ``"decoupled_lr"``: :math:`s = \text{lr}\cdot\lambda`.

    Checked with the group's current lr, so at every step under a schedule. Under ``"decoupled"``, an lr above
    the group's initial lr (a schedule that rises: OneCycleLR, CyclicLR, a warm-up) gives a UserWarning, once per
    ``owner`` (the optimizer whose group it is; every time when None). With ``nonfinite="propagate"``
    (torch.optim's behaviour; torch checks neither) only λ < 1 for ``"decoupled"`` is checked, not the rate at
    the current lr: a grid search over (lr, λ) may then let its cells with lr·λ ≥ 1 diverge to inf/NaN and
    count them as diverged, as it would with torch.optim.AdamW. ``"l2"`` is left alone: its decay goes through
    the preconditioner, like the gradient, and a too-large step there is a too-large learning rate.
    """
    decay, lam = group["decay"], group["weight_decay"]
    if decay == "l2" or lam == 0:
        return
    lr = group["lr"]
    if decay == "decoupled" and lam >= 1:
        raise ValueError(f"Invalid weight_decay value: {lam} for decay='decoupled' (must be < 1: the weights are "
                         f"multiplied by 1 - weight_decay per step, and weight_decay >= 1 zeroes them or flips "
                         f"their sign)")
    # 1e-6: schedules that update the lr from its last value (LinearLR) end a rounding error above initial_lr
    if decay == "decoupled" and schedule_multiplier(group) > 1 + 1e-6 and owner not in _warned_rising_lr:
        if owner is not None:
            _warned_rising_lr.add(owner)
        warnings.warn(RISING_LR_WARNING, UserWarning, stacklevel=2)
    if group.get("nonfinite", "raise") == "propagate":
        return
    if decay == "decoupled":
        rate = lam * schedule_multiplier(group)
        if rate >= 1:
            raise ValueError(f"decay='decoupled' with weight_decay={lam} at lr={lr} (initial_lr="
                             f"{reference_lr(group)}): the decay per step weight_decay * lr / initial_lr = "
                             f"{rate:g} must be < 1 (the weights are multiplied by 1 - {rate:g})")
    elif lr * lam >= 1:
        raise ValueError(f"decay='decoupled_lr' with lr={lr}, weight_decay={lam}: the decay per step lr * "
                         f"weight_decay = {lr * lam:g} must be < 1 (the weights are multiplied by 1 - {lr * lam:g})")


def with_decay(preconditioner: list[Transform], decay: str) -> list[Transform]:
    r"""The chain ``preconditioner`` → lr with the decay part placed as ``decay`` says.

    * ``"l2"``: ``[decay, *preconditioner, lr]`` — :math:`g + \lambda\theta` enters the preconditioner;
    * ``"decoupled_lr"``: ``[*preconditioner, decay, lr]`` — decay :math:`\text{lr}\,\lambda\theta` (torch, optax);
    * ``"decoupled"``: ``[*preconditioner, lr, decay(schedule)]`` — decay :math:`(\text{lr}/\text{lr}_0)\lambda\theta`
      (Loshchilov & Hutter 2019, Algorithm 2; the problem set's :math:`-\lambda\theta` at a constant lr).
    """
    check_decay(decay)
    lr = ScaleByLearningRate()
    if decay == "l2":
        return [AddDecayedWeights(into_gradient=True), *preconditioner, lr]
    if decay == "decoupled_lr":
        return [*preconditioner, AddDecayedWeights(), lr]
    return [*preconditioner, lr, AddDecayedWeights(schedule=True)]
