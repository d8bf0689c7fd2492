r"""Lyapunov spectra (Benettin's QR method) and the vanishing-gradient certificate.

**Lyapunov exponents.** For the one-step Jacobians :math:`J_t` along a trajectory, the top-k exponents are
the growth rates :math:`\lambda_i = \lim_T \frac1T \log \sigma_i(J_T \cdots J_1)`. Benettin's method
(Benettin et al. 1980; Shimada & Nagashima 1979) follows k orthonormal directions: :math:`Y = J_t Q`, and every
``reorthonormalize_every`` steps :math:`Q R = Y` (QR), accumulating :math:`\log|R_{ii}|`; then
:math:`\lambda_i \approx \frac1T\sum\log|R_{ii}|`. Re-orthonormalising every step is the most stable; a longer
interval saves QRs but lets the columns align with the top direction (and overflow) in between. The top exponent
agrees with the slope of :math:`\log\|\partial s_T/\partial s_0\|` (:func:`~theorylab.rnn.log_jacobian_norms`).

**Certificate.** :math:`\|J_t\| \le \|W\|\gamma` with :math:`\gamma = \sup|\sigma'|`, so
:math:`\|\partial s_T/\partial s_0\| \le \delta^T` with :math:`\delta = \sigma_{\max}(W)\gamma`: vanishing is
guaranteed when δ < 1. δ > 1 is necessary for explosion but not sufficient (claim 1.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._threads import numpy_blas_threads
from .activations import derivative_bound
from .jacobian import F64, JacobianFactors, jacobian_factors
from .model import RNN


def lyapunov_from_factors(factors: JacobianFactors, k: int, *, reorthonormalize_every: int = 1,
                          seed: int = 0) -> Tensor:
    """Top-k Lyapunov exponents (nats per step) of the products J_t ⋯ J_1: (B, k) float64.

    A direction whose |R_ii| is exactly 0 (an exactly rank-deficient product) gets −inf.
    """
    if not isinstance(reorthonormalize_every, int) or reorthonormalize_every < 1:
        raise ValueError(f"reorthonormalize_every must be a positive int, got {reorthonormalize_every!r}")
    device = factors.d.device
    A = factors.A.detach().to(device="cpu", dtype=F64).numpy()
    d = factors.d.detach().to(device="cpu", dtype=F64).numpy()
    bsz, steps, hidden = d.shape
    if not isinstance(k, int) or not 1 <= k <= hidden:
        raise ValueError(f"k must be an int in [1, H={hidden}], got {k!r}")
    if steps == 0:
        raise ValueError("Lyapunov exponents need at least one step: got a sequence of length T = 0")
    scale = factors.log_scale().detach().cpu().numpy()  # d_t's true size, e^scale·d_t (see JacobianFactors)
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((bsz, hidden, k)))[0]  # (B, H, k)
    logs = np.zeros((bsz, k))
    pending = np.zeros((bsz, 1))  # Σ scale since the last QR: Q's columns are e^pending times what we carry
    with numpy_blas_threads(1):  # (H, H) @ (H, k) and a thin QR per step: small kernels
        for t in range(steps):
            dt = d[:, t, :, None]
            Q = A @ (dt * Q) if factors.diag_right else dt * (A @ Q)  # (B, H, k)
            pending = pending + scale[:, t, None]
            if (t + 1) % reorthonormalize_every == 0 or t == steps - 1:
                Q, R = np.linalg.qr(Q)
                with np.errstate(divide="ignore"):
                    logs += np.log(np.abs(np.diagonal(R, axis1=-2, axis2=-1))) + pending
                pending = np.zeros((bsz, 1))
    return torch.from_numpy(logs / steps).to(device)


def lyapunov_spectrum(rnn: RNN, x: Tensor, h0: Tensor | None = None, k: int = 1, *,
                      reorthonormalize_every: int = 1) -> Tensor:
    r"""Top-k Lyapunov exponents of ``rnn`` along the trajectory from h0 driven by x: (B, k) float64, nats/step.

    QR (Benettin) method, re-orthonormalising every ``reorthonormalize_every`` steps. x: (B, T, I);
    h0: (B, H) or None (zeros); 1 ≤ k ≤ H.
    """
    if not isinstance(k, int) or not 1 <= k <= rnn.hidden_size:
        raise ValueError(f"k must be an int in [1, H={rnn.hidden_size}], got {k!r}")
    return lyapunov_from_factors(jacobian_factors(rnn, x, h0), k, reorthonormalize_every=reorthonormalize_every)


@dataclass(frozen=True)
class Certificate:
    """What σ_max(W) alone says about ‖∂s_T/∂s_0‖ ≤ δ^T, δ = σ_max(W)·γ.

    Attributes:
        sigma_max: σ_max(W) = sqrt(λ₁(WᵀW)).
        gamma: sup|σ'| of the activation.
        delta: σ_max(W)·γ, the per-step factor of the bound.
        vanishing_guaranteed: δ < 1, so the gradient vanishes at least as fast as δ^T.
    """

    sigma_max: float
    gamma: float
    delta: float
    vanishing_guaranteed: bool

    def log_bound(self, steps: int | float) -> float:
        """log δ^T (−inf for δ = 0), overflow-free."""
        return -math.inf if self.delta == 0 else steps * math.log(self.delta)

    def bound(self, steps: int | float) -> float:
        """δ^T itself (may underflow to 0 or overflow to inf: use :meth:`log_bound`)."""
        return self.delta**steps


def certificate(rnn: RNN) -> Certificate:
    """The vanishing-gradient certificate of ``rnn``: δ = σ_max(W)·γ and whether δ < 1."""
    if not isinstance(rnn, RNN):
        raise ValueError(f"rnn must be a theorylab.rnn.RNN, got {type(rnn).__name__}")
    rnn.check_parameters()
    sigma_max = float(torch.linalg.matrix_norm(rnn.W.detach().to(F64), ord=2))
    gamma = derivative_bound(rnn.activation)
    delta = sigma_max * gamma
    return Certificate(sigma_max, gamma, delta, delta < 1.0)
