r"""Adam and AdamW as chains: ``ScaleByAdam`` with the decay part before it (L2) or after it (decoupled)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import (
    ChainOptimizer,
    as_param_list,
    check_beta,
    check_lr,
    check_nonfinite,
    check_nonnegative,
    check_positive,
)
from .decay import check_decay, with_decay
from .transforms import ScaleByAdam, Transform


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        check_beta(b, f"beta{i + 1} (betas[{i}])", allow_zero=True)


class Adam(ChainOptimizer):
    r"""Adam with L2 regularisation or decoupled weight decay: ``ScaleByAdam`` plus the decay part.

    Let ε be ``lr`` (η under a schedule, :math:`\eta_0` the group's ``initial_lr``), :math:`(\beta_1, \beta_2)`
    ``betas``, δ ``eps`` and λ ``weight_decay``. With :math:`\tilde g_t` the gradient seen by the moments,

    .. math::
        s_t = \beta_1 s_{t-1} + (1-\beta_1)\tilde g_t,\quad r_t = \beta_2 r_{t-1} + (1-\beta_2)\tilde g_t^2,\quad
        a_t = \frac{\hat s_t}{\sqrt{\hat r_t} + \delta}\ (\hat s_t = s_t/(1-\beta_1^t),\ \hat r_t = r_t/(1-\beta_2^t))

    and, by ``decay`` (θ is the value before the step):

    * ``"l2"`` (torch.optim.Adam): :math:`\tilde g_t = \nabla L + \lambda\theta`,
      :math:`\Delta\theta = -\varepsilon a_t`. The decay passes through :math:`1/(\sqrt{\hat r}+\delta)`:
      it is weaker where gradients are large;
    * ``"decoupled"`` (Loshchilov & Hutter 2019, Algorithm 2; the problem set's form):
      :math:`\Delta\theta = -\varepsilon a_t - (\eta/\eta_0)\lambda\theta` — every weight decays at rate λ per step
      at a constant lr, whatever its gradient, and the best λ does not move with lr;
    * ``"decoupled_lr"`` (torch.optim.AdamW, optax.adamw): :math:`\Delta\theta = -\varepsilon(a_t + \lambda\theta)`;
      the decay per step is ε·λ, so the best λ moves as 1/ε.

    ``weight_decay = 2γ`` for the problem set's L2 term :math:`\gamma\lVert\theta\rVert^2`.
    ``nonfinite``: see :class:`ChainOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decay: str = "l2", *,
                 nonfinite: str = "raise") -> None:
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas, "eps": eps,
                    "weight_decay": weight_decay, "decay": decay, "nonfinite": nonfinite}
        self.check_group(defaults)
        check_nonfinite(nonfinite)
        super().__init__(as_param_list(params), defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_positive(group["eps"], "eps")
        check_nonnegative(group["weight_decay"], "weight_decay")
        check_decay(group["decay"])

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        return with_decay([ScaleByAdam()], group["decay"])


class AdamW(Adam):
    r"""torch.optim.AdamW's convention: ``Adam(decay="decoupled_lr")``, decay ε·λ·θ per step, λ = 1e-2 default.

    For the paper's decoupling of λ from the learning rate use ``Adam(..., decay="decoupled")``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, nonfinite: str = "raise") -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay="decoupled_lr",
                         nonfinite=nonfinite)
