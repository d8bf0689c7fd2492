r"""Lyapunov spectra (Benettin's QR method) and the vanishing-gradient certificate.

**Lyapunov exponents.** For the one-step Jacobians :math:`J_t` along a trajectory, the top-k exponents are
the growth rates :math:`\lambda_i = \lim_T \frac1T \log \sigma_i(J_T \cdots J_1)`. Benettin's method
(Benettin et al. 1980; Shimada & Nagashima 1979) follows k orthonormal directions: :math:`Y = J_t Q`, and every
``reorthonormalize_every`` steps :math:`Q R = Y` (QR), accumulating :math:`\log|R_{ii}|`; then
:math:`\lambda_i \approx \frac1T\sum\log|R_{ii}|`. A longer interval saves QRs but lets the columns align with
the top direction in between (they are kept at max-abs 1, so nothing over- or underflows). Where they align so
far that a direction's part orthogonal to the ones before it falls below √eps of the largest column (its growth
over the interval some 18 nats behind the top one's), rounding would take that direction and its exponent: such an
interval is redone with a QR after every step, and so is the rest of the run, for the sequences where it happens.
So the interval changes the result only by rounding, and saves time only while the k exponents stay within about
18/``reorthonormalize_every`` nats per step of each other (the top few of a tanh unit, say; for k = H a redone run
costs one wasted interval more than a QR every step). The top exponent
agrees with the slope of :math:`\log\|\partial s_T/\partial s_0\|` (:func:`~theorylab.rnn.log_jacobian_norms`).

The starting directions are the first k columns of one random orthonormal (H, H) matrix, the same for every
sequence, so identical sequences get identical exponents, and the i-th estimate does not depend on k (QR is
nested: the first i columns of Q depend only on the first i columns of Y). For finite T the estimates are growth
rates of those particular directions, not :math:`\frac1T\log\sigma_i` of the product, and need not come out
ordered; each row is returned sorted in descending order. Once T is long enough for the estimates to come out
ordered (they converge to the ordered exponents) sorting changes nothing and λ₁ is the same for every k; at a
very short T the sort can pick a later direction's estimate as λ₁, which k = 1 does not compute (W = diag(1, ½),
T = 1, seed 0: k = 1 gives −0.640, k = 2 gives (−0.053, −0.640), whose sum is log|det W| = log ½ whatever
the directions).

**Certificate.** :math:`\|J_t\| \le \|W\|\gamma` with :math:`\gamma = \sup|\sigma'|`, so
:math:`\|\partial s_T/\partial s_0\| \le \delta^T` with :math:`\delta = \sigma_{\max}(W)\gamma`: vanishing is
guaranteed when δ < 1. δ > 1 is necessary for explosion but not sufficient (claim 1.3).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._threads import numpy_blas_threads
from .activations import derivative_bound
from .jacobian import F64, JacobianFactors, check_factors_finite, factor_tensors, jacobian_factors, rnn_inputs
from .model import RNN, as_rnn, outside_transforms, parameters_of, read_for_diagnostics


def _check_int(name: str, value: object, lo: int, hi: int | None = None, *, hi_label: str = "") -> int:
    """``value`` as an int; ValueError naming it unless it is an integer (any numbers.Integral, e.g. numpy's;
    bool excluded: True is almost certainly a slip, not 1) in [lo, hi]."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)  # the same integer (numbers.Integral declares no > to compare value itself with)
        if n >= lo and (hi is None or n <= hi):
            return n
    where = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi_label}{hi}]"
    raise ValueError(f"{name} must be {where}, got {value!r} ({type(value).__name__})")


def _check_k(k: object, hidden: int) -> int:
    """k as an int in [1, H]; ValueError naming it otherwise."""
    return _check_int("k", k, 1, hidden, hi_label="H=")


def _starting_directions(hidden: int, k: int, seed: int) -> np.ndarray:
    """(H, k): the first k columns of one random orthonormal H×H matrix, Q of the QR of a Gaussian matrix.

    Shared by every sequence, and nested in k, so the first direction's estimate is the same for k = 1 and k = H
    (a draw per sequence and per k made identical sequences, and different k, disagree at finite T).
    """
    rng = np.random.default_rng(seed)
    return np.linalg.qr(rng.standard_normal((hidden, hidden)))[0][:, :k]


class _Product:
    """Applies the Jacobians J_{t0+1} ⋯ J_{t1} to k directions: Q ↦ J Q, for every sequence or for some rows."""

    def __init__(self, A: np.ndarray, d: np.ndarray, scale: np.ndarray, diag_right: bool) -> None:
        self.A, self.d, self.scale, self.diag_right = A, d, scale, diag_right

    def rank(self, t0: int, t1: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(B,) or (len(rows),): a bound on the rank of the product of steps t0..t1 from its dead units (see
        :func:`_rank`). W's own rank is not counted: in floating point a singular W ([[1, 1], [1, 1]]: σ₂/σ₁ =
        1.7e-17 from LAPACK) cannot be told from a full-rank one with a singular value that small (diag(1, 1e-16),
        whose second exponent is log 1e-16), and numpy's numerical rank took the latter's as −inf."""
        d = self.d if rows is None else self.d[rows]
        return _rank(d[:, t0:t1])

    def apply(self, Q: np.ndarray, t0: int, t1: int, rows: np.ndarray | None = None, *,
              normalise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(the product applied to Q, log of the factor it carries: (B, 1)). ``normalise``: keep Q at max-abs 1
        after each step (its log goes to the factor): unscaled over many steps, a contracting product underflowed
        to 0 (read as −inf) and a growing one overflowed to NaN."""
        A = self.A if rows is None or self.A.ndim == 2 else self.A[rows]
        d = self.d[:, t0:t1] if rows is None else self.d[rows, t0:t1]
        scale = self.scale[:, t0:t1] if rows is None else self.scale[rows, t0:t1]
        pending = np.zeros((Q.shape[0], 1))  # Σ scale: Q's columns are e^pending times what we carry
        for t in range(t1 - t0):
            dt = d[:, t, :, None]
            Q = A @ (dt * Q) if self.diag_right else dt * (A @ Q)  # (B, H, k)
            pending = pending + scale[:, t, None]
            if normalise:
                q_max = np.abs(Q).max(axis=(-2, -1))[:, None]
                q_scale = np.where(q_max > 0, q_max, 1.0)
                Q = Q / q_scale[..., None]
                pending = pending + np.log(q_scale)
        return Q, pending

    def each_step(self, Q: np.ndarray, t0: int, t1: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q after steps t0..t1 of ``rows``, Σ log|R_ii| over them), with a QR after every step."""
        grown = np.zeros(Q.shape[:1] + Q.shape[2:])
        for t in range(t0, t1):
            Y, pending = self.apply(Q, t, t + 1, rows)
            Q, R = np.linalg.qr(Y)
            r = _beyond_rank_to_zero(np.abs(np.diagonal(R, axis1=-2, axis2=-1)), Y, self.rank(t, t + 1, rows))
            with np.errstate(divide="ignore"):
                grown += np.log(r) + pending
        return Q, grown


def _rank(d: np.ndarray) -> np.ndarray:
    """(B,): a bound on the rank of the products over d's steps: J_t = A diag(d_t) has rank <= nnz(d_t)."""
    return (d != 0).sum(axis=-1).min(axis=-1)


#: a direction whose part orthogonal to the ones before it is below this fraction of the largest direction after
#: an interval keeps fewer than half of float64's digits (Householder QR's error is ~eps times the largest column)
LOST_FRACTION = float(np.sqrt(np.finfo(np.float64).eps))


def _beyond_rank_to_zero(r: np.ndarray, Y: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``r`` (the |R_ii| of Y = QR) with the entries at i >= rank that are rounding (below LOST_FRACTION of Y's
    largest column) made exactly 0: Y has rank <= ``rank``, so its volume beyond it is 0, and such a direction's
    growth is −inf from then on. Left at its rounding (~eps per step), a direction beyond the rank could outgrow
    the true one when its units came back to life: relu, W = diag(1, 1e-20), the strong unit off at one step of
    five, gave λ₁ = −43.69 where (1/T) log σ₁ of the product, which no direction exceeds, is −46.05."""
    biggest = np.linalg.norm(Y, axis=-2).max(axis=-1)  # (B,)
    beyond = (np.arange(r.shape[-1])[None, :] >= rank[:, None]) & (r < LOST_FRACTION * biggest[:, None])
    return np.where(beyond, 0.0, r)


def _lost_directions(r: np.ndarray, Y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(B,) bool: sequences whose interval lost a direction to rounding: |R_ii| < LOST_FRACTION · max_j ‖Y_j‖ for
    an i below the interval's rank (beyond it, |R_ii| is rounding whatever the interval: −inf at the end)."""
    rank = _rank(d)
    biggest = np.linalg.norm(Y, axis=-2).max(axis=-1)  # (B,)
    small = r < LOST_FRACTION * biggest[:, None]
    return (small & (np.arange(r.shape[-1])[None, :] < rank[:, None])).any(axis=-1)


@outside_transforms(factor_tensors)
def lyapunov_from_factors(factors: JacobianFactors, k: int, *, reorthonormalize_every: int = 1,
                          seed: int = 0) -> Tensor:
    """Top-k Lyapunov exponents (nats per step) of the products J_t ⋯ J_1: (B, k) float64, sorted descending.

    Every sequence starts from the same k orthonormal directions (see :func:`_starting_directions`; ``seed``
    picks them). For finite T the QR estimates need not be ordered, so each row is sorted in descending order
    (see the module docstring for what that means for λ₁ at a very short T).
    Exponents beyond the product's rank are −inf: a direction whose |R_ii| is exactly 0, and every direction
    beyond the fewest units with σ' ≠ 0 at any one step (a dead relu unit makes that step's Jacobian, and so the
    product, exactly rank-deficient), where the QR's rounding would give a finite ≈ log(eps) per step. The same
    holds step by step: at a step (or interval) of rank r, a direction i > r whose |R_ii| is rounding grows by
    −inf there, so that it cannot outgrow the true ones once the dead units come back. W's own rank is not
    inferred (see :meth:`_Product.rank`): the extra exponents of a singular W come out as rounding, about
    log(eps) per step or below, where a W with a singular value of 1e-16 has its true log 1e-16. Nor is the rank
    of W's columns of the live units: where those are singular though W is not (relu, a singular 2×2 block of a
    full-rank 3×3 W), the product's rank is below the live units' count, and a rounding direction can then
    outgrow the true one (a review found λ₁ = −0.68 where (1/T) log σ₁(P_T) is −3.93; ``log_jacobian_norms``
    gives the latter).
    """
    every = _check_int("reorthonormalize_every", reorthonormalize_every, 1)
    seed = _check_int("seed", seed, 0)
    device = factors.d.device
    A = factors.A.detach().to(device="cpu", dtype=F64).numpy()
    d = factors.d.detach().to(device="cpu", dtype=F64).numpy()
    bsz, steps, hidden = d.shape
    k = _check_k(k, hidden)
    if steps == 0:
        raise ValueError("Lyapunov exponents need at least one step: got a sequence of length T = 0")
    check_factors_finite(factors)  # NaN would propagate silently into every exponent
    scale = factors.log_scale().detach().cpu().numpy()  # d_t's true size, e^scale·d_t (see JacobianFactors)
    Q = np.broadcast_to(_starting_directions(hidden, k, seed), (bsz, hidden, k))  # read-only view: Q is rebound
    logs = np.zeros((bsz, k))
    product = _Product(A, d, scale, factors.diag_right)
    per_step = np.zeros(bsz, dtype=bool)  # sequences that lost a direction once: a QR after every step from then on
    with numpy_blas_threads(1):  # (H, H) @ (H, k) and a thin QR per step: small kernels
        for t0 in range(0, steps, every):
            t1 = min(t0 + every, steps)
            Q_next, grown = np.empty((bsz, hidden, k)), np.empty((bsz, k))
            fast = np.flatnonzero(~per_step)
            if fast.size:
                rows = None if fast.size == bsz else fast
                Y, pending = product.apply(Q if rows is None else Q[rows], t0, t1, rows, normalise=every > 1)
                Q_fast, R = np.linalg.qr(Y)
                r = _beyond_rank_to_zero(np.abs(np.diagonal(R, axis1=-2, axis2=-1)), Y, product.rank(t0, t1, rows))
                with np.errstate(divide="ignore"):
                    grown_fast = np.log(r) + pending
                lost = _lost_directions(r, Y, d[fast, t0:t1]) if t1 - t0 > 1 else np.zeros(fast.size, dtype=bool)
                per_step[fast[lost]] = True  # redone below, from the interval's start
                Q_next[fast[~lost]], grown[fast[~lost]] = Q_fast[~lost], grown_fast[~lost]
            slow = np.flatnonzero(per_step)
            if slow.size:
                Q_next[slow], grown[slow] = product.each_step(Q[slow], t0, t1, slow)
            logs += grown
            Q = Q_next
    # Sorted: the i-th QR estimate is the growth rate of the i-th direction, ordered only as T → ∞.
    exponents = torch.from_numpy(logs / steps).sort(dim=-1, descending=True).values
    rank = torch.from_numpy(product.rank(0, steps))  # the j-volume of a rank-r product, j > r, is 0
    exponents[torch.arange(k)[None, :] >= rank[:, None]] = -math.inf
    return exponents.to(device)


@outside_transforms(rnn_inputs)
def lyapunov_spectrum(rnn: RNN, x: Tensor, h0: Tensor | None = None, k: int = 1, *,
                      reorthonormalize_every: int = 1, seed: int = 0) -> Tensor:
    r"""Top-k Lyapunov exponents of ``rnn`` along the trajectory from h0 driven by x: (B, k) float64, nats/step.

    QR (Benettin) method, re-orthonormalising every ``reorthonormalize_every`` steps, from the same k
    orthonormal directions (drawn with ``seed``) for every sequence. x: (B, T, I); h0: (B, H) or None (zeros);
    1 ≤ k ≤ H (any integer type but bool). Each row is sorted in descending order: for finite T the QR estimates
    need not be ordered (see the module docstring).

    Raises:
        ValueError: rnn is not a theorylab.rnn.RNN; k outside 1..H or not an integer; T = 0; x or h0 of the
            wrong shape; W, U or b not finite (naming the parameter).
        TypeError: x is not floating point.
    """
    rnn = as_rnn(rnn)
    k = _check_k(k, rnn.hidden_size)
    every = _check_int("reorthonormalize_every", reorthonormalize_every, 1)  # fail before the trajectory is run
    seed = _check_int("seed", seed, 0)
    with read_for_diagnostics(rnn):
        rnn.check_finite_parameters()  # W, U and b all shape the trajectory
        factors = jacobian_factors(rnn, x, h0)
    return lyapunov_from_factors(factors, k, reorthonormalize_every=every, seed=seed)


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
        """log δ^T, overflow-free: 0 for T = 0 (δ⁰ = 1, whatever δ), −inf for δ = 0 and T > 0.

        ValueError naming ``steps`` unless it is a real number ≥ 0 (T = inf gives the limit).
        """
        steps = _check_steps(steps)
        if steps == 0 or self.delta == 1:  # δ⁰ = 1 even for δ = 0; 1^∞ = 1 (inf·log 1 would be NaN)
            return 0.0
        return -math.inf if self.delta == 0 else steps * math.log(self.delta)

    def bound(self, steps: int | float) -> float:
        """δ^T itself (may underflow to 0 or overflow to inf: use :meth:`log_bound`); ValueError as log_bound."""
        steps = _check_steps(steps)
        try:
            return self.delta**steps
        except OverflowError:  # Python floats raise rather than give inf (1.5 ** 2000)
            return math.inf


def _check_steps(steps: object) -> float:
    """``steps`` as a float; ValueError naming it unless it is a real number ≥ 0 (not bool, not NaN)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or math.isnan(steps) or steps < 0:
        raise ValueError(f"steps must be a real number >= 0, got {steps!r} ({type(steps).__name__})")
    return float(steps)


@outside_transforms(parameters_of, batched_only=True)  # under grad, δ is read as a number
def certificate(rnn: RNN) -> Certificate:
    """The vanishing-gradient certificate of ``rnn``: δ = σ_max(W)·γ and whether δ < 1.

    σ_max(W) is the spectral norm of the recurrent weight W (H, H), computed in float64, and γ = sup|σ'| of the
    activation (:func:`~theorylab.rnn.activations.derivative_bound`: 1 for tanh and relu, 1/4 for sigmoid). Then
    ‖∂s_T/∂s_0‖₂ <= δ^T for every input and initial state, in either form.

    Args:
        rnn: a :class:`~theorylab.rnn.RNN`; only W and the activation are read (no inputs are needed).

    Returns:
        A :class:`Certificate` holding ``sigma_max``, ``gamma``, ``delta`` and ``vanishing_guaranteed``
        (δ < 1); the bound on T steps is :meth:`Certificate.bound` (δ^T) or, overflow-free,
        :meth:`Certificate.log_bound` (log δ^T).

    Raises:
        ValueError: rnn is not a theorylab.rnn.RNN; a parameter (W, U or b) has the wrong shape; W is not finite
            (U and b are not checked for finiteness: the certificate does not read them).
        TypeError: a parameter (W, U or b) is not real floating point.
    """
    rnn = as_rnn(rnn)
    with read_for_diagnostics(rnn):
        rnn.check_finite_parameters("W")  # the certificate reads W alone; NaN/inf would fail in the SVD or give nan
        sigma_max = float(torch.linalg.matrix_norm(rnn.W.detach().to(F64), ord=2))
    gamma = derivative_bound(rnn.activation)
    delta = sigma_max * gamma
    return Certificate(sigma_max, gamma, delta, delta < 1.0)
