r"""SGD with torch.optim.SGD's momentum and a choice of where the weight decay goes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import (
    ChainOptimizer,
    as_param_list,
    check_common_keys,
    check_flag,
    check_nonnegative,
    check_torch_options,
)
from .decay import check_decay, check_decay_rate, with_decay
from .transforms import Negate, Trace, Transform


class SGD(ChainOptimizer):
    r"""Stochastic gradient descent with momentum, built as ``[decay?, Trace, ScaleByLearningRate, decay?]``.

    Let η be ``lr``, μ ``momentum``, d ``dampening``, λ ``weight_decay`` and :math:`\eta_0` the group's
    ``initial_lr``. With :math:`g_t = \nabla L(\theta_{t-1})` (:math:`-\nabla L` with ``maximize=True``, as in
    torch.optim.SGD: a :class:`~theorylab.optim.transforms.Negate` first in the chain):

    .. math::
        b_t = \mu b_{t-1} + (1-d)\,\tilde g_t \ (b_1 = \tilde g_1), \qquad
        u_t = \tilde g_t + \mu b_t \text{ if nesterov else } b_t

    and then, by ``decay``:

    * ``"l2"`` (torch.optim.SGD): :math:`\tilde g_t = g_t + \lambda\theta_{t-1}`,
      :math:`\theta_t = \theta_{t-1} - \eta u_t` — SGD on :math:`L + \frac{\lambda}{2}\lVert\theta\rVert^2`;
    * ``"decoupled"`` (Loshchilov & Hutter's SGDW, the problem set's :math:`-\lambda\theta`):
      :math:`\tilde g_t = g_t`, :math:`\theta_t = \theta_{t-1} - \eta u_t - (\eta/\eta_0)\lambda\theta_{t-1}`;
    * ``"decoupled_lr"``: :math:`\theta_t = \theta_{t-1} - \eta (u_t + \lambda\theta_{t-1})`, which for plain SGD
      (μ = 0) is the same as ``"l2"``.

    With μ = 0 this is plain SGD and keeps no buffer. The decoupled decays need a shrink per step below 1:
    λ < 1 (and :math:`(\eta/\eta_0)\lambda < 1` at every step) for ``"decoupled"``, :math:`\eta\lambda < 1` for
    ``"decoupled_lr"``; ValueError otherwise (:func:`~theorylab.optim.decay.check_decay_rate`).
    ``nonfinite``, validation, complex parameters: see :class:`ChainOptimizer`. torch.optim.SGD's ``foreach``,
    ``differentiable`` and ``fused`` are accepted at their default values (``foreach`` at any), so that a
    configuration written for torch runs unchanged; other values raise ValueError. Give it by keyword: the
    positional order is ``(params, lr, momentum, weight_decay, decay)``, where torch.optim.SGD's fourth is
    ``dampening`` (here keyword-only), so ``SGD(p, 0.1, 0.9, 0.5)`` sets weight_decay, not dampening.

    Args:
        params: the parameters to optimise, or dicts of parameter groups (``"params"`` plus any of the keywords
            below), as for torch.optim; real or complex floating point (float16, bfloat16, float32, float64,
            complex64, complex128).
        lr: η, the learning rate; required (no default), a finite number >= 0 (a one-element tensor is taken).
        momentum: μ, default 0.0 (plain SGD, no buffer); a finite number >= 0.
        weight_decay: λ, default 0.0; a finite number >= 0; where it acts is ``decay``'s choice.
        decay: where the weight decay goes: ``"l2"`` (default, torch.optim.SGD's), ``"decoupled"`` or
            ``"decoupled_lr"`` (above).
        dampening: d, default 0.0 (keyword-only); a finite number >= 0.
        nesterov: Nesterov momentum u_t = g̃_t + μ b_t (default False); needs μ > 0 and d = 0.
        maximize: ascend L instead of descending it (default False).
        nonfinite: what a NaN or ±inf in a gradient does (default ``"raise"``); in short — ``"raise"``:
            :class:`~theorylab.optim.base.NonFiniteGradientError` before any parameter or state changes;
            ``"skip"``: the whole step (every group) is skipped and ``skipped_steps`` counts it; ``"propagate"``:
            torch.optim's behaviour, the NaN flows into the buffers and the parameters (no check, no read-back).
            In full: :class:`~theorylab.optim.base.ChainOptimizer`.
        **torch_options: torch.optim.SGD's ``foreach`` (True, False or None; ignored), ``differentiable`` and ``fused``
            (accepted off: False or None).

    Raises:
        TypeError: lr, momentum, dampening or weight_decay is not a real number (an int, a float, a numpy scalar
            or a one-element tensor); a keyword that torch.optim.SGD does not take either.
        ValueError: lr, momentum, dampening or weight_decay negative or not finite; nesterov, maximize or a torch switch
            not a bool (or 0/1); nesterov without μ > 0 and d = 0; an unknown ``decay`` (a number there is a torch.optim
            argument given by position) or ``nonfinite``; a decoupled decay rate >= 1 (above; with
            ``nonfinite="propagate"`` only λ >= 1 of ``"decoupled"``); ``differentiable`` or ``fused`` on; no parameters
            (torch's), or a parameter of a dtype no step can update (integer, bool, float8). At :meth:`step`: the same
            checks on values written into ``param_groups``.
        NonFiniteGradientError: at :meth:`step`, a gradient holds NaN or ±inf and ``nonfinite="raise"``.
        RuntimeError: at :meth:`step`, a sparse gradient.
    """

    later_switches = ("maximize",)
    torch_switches = ("foreach", "differentiable", "fused")

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 decay: str = "l2", *, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False,
                 nonfinite: str = "raise", **torch_options: Any) -> None:
        check_torch_options("SGD", torch_options, self.torch_switches)
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                    "weight_decay": weight_decay, "decay": decay, "maximize": maximize, "nonfinite": nonfinite}
        check_common_keys(defaults)  # lr first: check_group computes with it (lr·λ < 1)
        self.check_group(defaults)
        super().__init__(as_param_list(params), defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's momentum, dampening, weight_decay, nesterov, maximize and decay (ValueError naming
        the value), storing numbers back as floats."""
        group["momentum"] = check_nonnegative(group["momentum"], "momentum")
        group["dampening"] = check_nonnegative(group["dampening"], "dampening")
        group["weight_decay"] = check_nonnegative(group["weight_decay"], "weight_decay")
        group["nesterov"] = check_flag(group["nesterov"], "nesterov")
        group["maximize"] = check_flag(group.get("maximize", False), "maximize")  # absent in older pickles
        check_decay(group["decay"])
        check_decay_rate(group, self)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"Nesterov momentum requires momentum > 0 and zero dampening, got momentum="
                             f"{group['momentum']}, dampening={group['dampening']}")

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        """The chain: heavy-ball (or Nesterov) momentum with torch's first-step copy, the decay part where ``decay``
        puts it (:func:`~theorylab.optim.decay.with_decay`), the lr; led by a negation when ``maximize``."""
        momentum = Trace(key="momentum", state_key="momentum_buffer", dampening_key="dampening",
                         first_step_copies=True, nesterov_key="nesterov")
        return [*([Negate()] if group["maximize"] else []), *with_decay([momentum], group["decay"])]
