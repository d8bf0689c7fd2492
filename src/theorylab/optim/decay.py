"""Where the decay part sits: the three weight-decay conventions as positions in a transform chain."""

from __future__ import annotations

from .transforms import AddDecayedWeights, ScaleByLearningRate, Transform

DECAY_MODES = ("l2", "decoupled", "decoupled_lr")


def check_decay(decay: str) -> None:
    if decay not in DECAY_MODES:
        raise ValueError(f"Invalid decay mode: {decay!r} (must be one of {', '.join(map(repr, DECAY_MODES))})")


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
        return [AddDecayedWeights(), *preconditioner, lr]
    if decay == "decoupled_lr":
        return [*preconditioner, AddDecayedWeights(), lr]
    return [*preconditioner, lr, AddDecayedWeights(schedule=True)]
