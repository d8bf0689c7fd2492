r"""Exact, overflow-free norms of RNN state Jacobians.

For the h-form the one-step Jacobian is
:math:`J_t = \partial h_t/\partial h_{t-1} = W\,\mathrm{diag}(\sigma'(h_{t-1}))`; for the g-form
:math:`J_t = \partial g_t/\partial g_{t-1} = \mathrm{diag}(\sigma'(a_t))\,W` with
:math:`a_t = W g_{t-1} + U x_t + b`. Both are "a fixed matrix A times a diagonal d_t", on one side or the other,
and the chain rule gives :math:`\partial s_t/\partial s_0 = P_t = J_t J_{t-1}\cdots J_1`.

:func:`log_jacobian_norms` returns :math:`\log\|P_t\|_2` for every t. The running product is kept as
:math:`P_t = e^{c_t} M_t` with :math:`\|M_t\|_2 = 1`: each step multiplies :math:`M` by :math:`J_t` (one H×H matmul,
with A and d_t pre-scaled to max-abs 1 and their logs added to :math:`c`), measures :math:`\|M\|_2` exactly
and divides it out (a step that shrinks M below :data:`TINY_NORM` first scales it back to max-abs 1, the log again
going to :math:`c`). In one scale, though, entries far below the product's largest lose digits and then
underflow: a weak direction kept in them (decoupled units decaying at different rates, W = diag(1, 0.5) for
1100 steps) was flushed to 0 and read −inf once the strong units died, and a W with entries 1e200 apart lost its
cross terms (1/m² = 0). So a sequence in which a step's products may fall below float64's normal range
(:data:`NORMAL_LOG2`) is measured again with every row of the product in a scale of its own
(:func:`_graded_log_norms`). Nothing overflows or underflows at any horizon; an exactly zero product (a nilpotent
W, a dead relu layer) gives :math:`-\infty`.
Limits remain. The norms are exact to rounding relative to the product's largest direction, as any float64 product
is: a part of the product that is below eps of it at some step (a σ' of 1e-20 beside 1 in a dense W) is lost to
rounding, and if a later step annihilates everything else (the strong unit dead, W's rows cancelling exactly)
the result is rounding or −inf: A = [[1, −1], [1, 1]] with d = (1, 1e-20) at one step and (1, 0) at another reads
−inf where the norm is e^−44.7, as :func:`log_norms_of_products_reference` (the explicit float64 product) does.
Within a row of the graded product, entries more than float64's range apart share one scale,
so the small ones are flushed (a relu product whose later steps then cancel the large ones exactly reads −inf;
one with W's entries 1e-200 apart was found); and within one step, a unit whose σ' lies more than float64's
range (~e^-745) below the step's largest is flushed to 0, as is an entry of W that far below its largest. That
loses nothing unless every larger direction later dies while that one survives, as with decoupled units (W
diagonal) where a tanh unit sits at a pre-activation of 1000 while another sits at 0: such a product is reported
as :math:`-\infty` though it is ~e^-1600.

The norm :math:`\|M\|_2 = \sqrt{\lambda_1(M^\top M)}` comes from a block Rayleigh–Ritz iteration on
:math:`M^\top M` (never formed), warm-started from the previous step's top-k right singular vectors plus one random
direction (so a direction that has just become dominant is found), and extended by the Ritz residuals (a block
Krylov/Davidson step) until the top Ritz value's error estimate :math:`\min(r, r^2/\mathrm{gap})` is below
``tol`` relative (r the Ritz residual, gap the distance to the next Ritz value); a sequence that has not converged
by ``max_dim`` search directions falls back to an SVD. A small residual proves only that θ is *an* eigenvalue: a
search space that is (nearly) invariant — the warm start is exactly so for a diagonal or permutation W — can
converge to one that is not the top. So every θ is then proved to be within ``tol`` of λ₁: by an upper bound from
the same Rayleigh–Ritz step (free; it succeeds when little of MᵀM lies outside the search space, the usual case),
else by a Cholesky factorisation of θ(1 + tol)·I − MᵀM (clustered spectra), else an SVD is taken.
With a spread Lyapunov spectrum the warm start is nearly
exact and 0–2 extensions per step suffice; with clustered singular values (orthogonal W) it takes more. Either
way the H×H matmul dominates, not the norm: at H = 256 an SVD per step costs 5× more (``theorylab bench rnn``).
For small products (B·H³ ≤ 2¹⁸, so H ≤ 64 for one sequence) the default takes an SVD of M at every step instead:
there the iteration's per-step Python work costs more than the SVD.
The small eigen/QR problems run on one BLAS thread (see ``_threads``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from ._threads import numpy_blas_threads, threads_for
from .activations import get_activation
from .model import FORMS, RNN, as_rnn, outside_transforms, parameters_of, read_for_diagnostics

F64 = torch.float64


@dataclass
class JacobianFactors:
    """J_t = A diag(d_t) (``diag_right``) or diag(d_t) A, for t = 1..T.

    Attributes:
        A: (H, H) or (B, H, H) float64.
        d: (B, T, H) float64, the activation derivatives, or, with ``d_log_scale``, their scaled values.
        diag_right: True for the h-form (W diag σ'(h_{t-1})), False for the g-form (diag σ'(a_t) W).
        d_log_scale: None, or (B, T) float64 with the true d_t = exp(d_log_scale[:, t])·d[:, t]: it keeps the
            derivatives of a saturated unit (sech²(1000) ≈ e^{−1999}, below float64's range) exact relative to
            each other; −inf where d_t is exactly 0.
    """

    A: Tensor
    d: Tensor
    diag_right: bool
    d_log_scale: Tensor | None = None

    def transposed_reversed(self) -> JacobianFactors:
        """The factors of the backward sweep: J_T^T, J_{T-1}^T, ..., J_1^T (so products are (J_T ⋯ J_t)^T)."""
        scale = None if self.d_log_scale is None else self.d_log_scale.flip(1)
        return JacobianFactors(self.A.mT, self.d.flip(1), not self.diag_right, scale)

    def log_scale(self) -> Tensor:
        """(B, T) float64: ``d_log_scale``, zeros when there is none."""
        if self.d_log_scale is None:
            return self.d.new_zeros(self.d.shape[:2], dtype=F64)
        return self.d_log_scale.to(F64)

    def dense(self, t: int) -> Tensor:
        """J_{t+1} as a dense (B, H, H) tensor (0-based t); for references and tests (may underflow)."""
        dt = self.d[:, t] * self.log_scale()[:, t, None].exp()
        return self.A * dt[:, None, :] if self.diag_right else dt[:, :, None] * self.A


def stack_factors(parts: list[JacobianFactors]) -> JacobianFactors:
    """Concatenate factor sets of the same form, T and H along the batch (each with its own A)."""
    if not parts or len({p.diag_right for p in parts}) != 1 or len({p.d.shape[1:] for p in parts}) != 1:
        raise ValueError("stack_factors needs a non-empty list of factors with the same form, T and H")
    hidden = parts[0].d.shape[-1]
    A = torch.cat([p.A.to(F64).expand(p.d.shape[0], hidden, hidden) for p in parts])
    scale = None if all(p.d_log_scale is None for p in parts) else torch.cat([p.log_scale() for p in parts])
    return JacobianFactors(A, torch.cat([p.d.to(F64) for p in parts]), parts[0].diag_right, scale)


def _as_float64_params(rnn: RNN) -> tuple[Tensor, Tensor, Tensor]:
    return rnn.W.detach().to(F64), rnn.U.detach().to(F64), rnn.b.detach().to(F64)


@overload
def trajectory_derivatives(W: Tensor, U: Tensor, b: Tensor, activation: str, x: Tensor, s0: Tensor | None,
                           form: str, *, scaled: Literal[False] = False) -> Tensor: ...
@overload
def trajectory_derivatives(W: Tensor, U: Tensor, b: Tensor, activation: str, x: Tensor, s0: Tensor | None,
                           form: str, *, scaled: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def trajectory_derivatives(W: Tensor, U: Tensor, b: Tensor, activation: str, x: Tensor, s0: Tensor | None,
                           form: str, *, scaled: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...
def trajectory_derivatives(W: Tensor, U: Tensor, b: Tensor, activation: str, x: Tensor, s0: Tensor | None,
                           form: str, *, scaled: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """σ' along the trajectory in float64: (B, T, H), σ'(h_{t-1}) (form h) or σ'(a_t) (form g), t = 1..T.

    W may be (H, H) or batched (B, H, H), U (H, I) or (B, H, I), b (H,) or (B, H): one parameter set per sequence
    is how the claims run many different units in one batch. With ``scaled``, returns ``(d, log_scale)``: each
    d_t divided by its largest |entry|, whose log is ``log_scale`` (B, T) (see :class:`JacobianFactors`), computed
    from log|σ'| so that derivatives below float64's range are not lost.
    """
    if form not in FORMS:  # any other string would silently run the g-form
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    act = get_activation(activation)
    W, U, b, x = W.to(F64), U.to(F64), b.to(F64), x.to(F64)
    bsz, steps, _ = x.shape
    hidden = W.shape[-1]
    s = x.new_zeros(bsz, hidden) if s0 is None else s0.to(F64)
    shared = W.dim() == 2 and U.dim() == 2 and b.dim() == 1
    if shared:  # the very ops of RNN.forward: a chaotic unit amplifies a one-ulp difference in the trajectory by
        # e^{λ₁t}, so a trajectory recomputed any other way drifts from the model's (1e-5 relative at t = 100)
        drive = torch.nn.functional.linear(x, U, b)  # (B, T, H) = U x_t + b

        def step(r: Tensor, t: int) -> Tensor:
            return torch.addmm(drive[:, t], r, w_t)
    else:  # one parameter set per sequence
        drive = x @ U.mT + (b[:, None, :] if b.dim() == 2 else b)

        def step(r: Tensor, t: int) -> Tensor:
            return drive[:, t] + (r[:, None, :] @ w_t)[:, 0]
    w_t = W.mT
    z = x.new_empty(bsz, steps, hidden)  # the arguments of σ': h_{t-1} (form h) or a_t (form g)
    with threads_for(2 * bsz * hidden * hidden):
        for t in range(steps):
            if form == "h":
                z[:, t] = s
                s = step(act.fn(s), t)  # h_t = W σ(h_{t-1}) + U x_t + b
            else:
                a = step(s, t)  # a_t = W g_{t-1} + U x_t + b
                z[:, t] = a
                s = act.fn(a)
    if scaled and not bool(torch.isfinite(z).all()):  # an overflowed state has no Jacobian: say so, not "−inf"
        b_bad, t_bad = (int(i) for i in (~torch.isfinite(z)).any(-1).nonzero()[0])
        raise ValueError(f"the state trajectory is not finite (inf or NaN) from step {t_bad} of sequence {b_bad}: "
                         f"an input (x or h0) is not finite or the unit overflowed, so its Jacobians are undefined")
    if not scaled:
        return act.deriv(z)
    log_abs, sign = act.log_deriv(z)
    log_scale = log_abs.amax(-1)  # (B, T), −inf where every σ' is exactly 0
    alive = torch.isfinite(log_scale)[..., None]
    d = torch.where(alive, sign * torch.exp(log_abs - torch.where(alive, log_scale[..., None], 0.0)), 0.0)
    return d, log_scale


def factor_tensors(factors: object, *args: object, **kwargs: object) -> dict[str, object]:
    """The tensors of a :class:`JacobianFactors` argument, for :func:`~theorylab.rnn.model.outside_transforms`."""
    if not isinstance(factors, JacobianFactors):
        return {}
    return {"factors.A": factors.A, "factors.d": factors.d, "factors.d_log_scale": factors.d_log_scale}


def rnn_inputs(rnn: object, x: object, h0: object = None, *args: object, **kwargs: object) -> dict[str, object]:
    """The tensors a diagnostic of ``rnn`` on x from h0 reads, for :func:`~theorylab.rnn.model.outside_transforms`."""
    return {**parameters_of(rnn), "x": x, "h0": h0}


@outside_transforms(rnn_inputs)
def jacobian_factors(rnn: RNN, x: Tensor, h0: Tensor | None) -> JacobianFactors:
    """The one-step Jacobians of ``rnn`` along the trajectory from h0 driven by x, in float64."""
    rnn = as_rnn(rnn)
    with read_for_diagnostics(rnn):
        rnn.check_inputs(x, h0)
        rnn.check_finite_parameters()  # a NaN in W reached LAPACK as "eigenvalues did not converge"
        W, U, b = _as_float64_params(rnn)
    d, log_scale = trajectory_derivatives(W, U, b, rnn.activation, x.detach(), None if h0 is None else h0.detach(),
                                          rnn.form, scaled=True)
    return JacobianFactors(W, d, rnn.form == "h", log_scale)


def _top_eig_gram(M: np.ndarray, V: np.ndarray, rand: np.ndarray, tol: float, max_dim: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """λ₁(MᵀM) for each of B matrices M (B, H, H) by block Rayleigh–Ritz, warm-started.

    The search space starts as span{V[..., :k−1], rand} (the previous step's top Ritz vectors and one random
    direction) and grows by the residuals of the current top-k Ritz pairs (a block Krylov / Davidson extension)
    until the error estimate min(r, r²/gap) of the top Ritz value θ is ≤ tol·θ (r the Ritz residual, gap the
    distance to the next Ritz value), the space is all of R^H, or it would exceed ``max_dim``.

    Returns (theta (B,), top-k Ritz vectors (B, H, k), converged (B,) bool, proved (B,) bool, number of
    extensions). For a sequence that did not converge theta is the best estimate so far (a lower bound).
    ``proved`` marks the converged θ that :func:`_top_bound` shows to be within tol of λ₁ (see there).
    """
    bsz, hidden, k = V.shape
    tiny = np.finfo(np.float64).tiny
    trace_g = np.einsum("bij,bij->b", M, M)  # trace(MᵀM) = ‖M‖_F²
    proved = np.zeros(bsz, dtype=bool)
    basis = np.linalg.qr(np.concatenate([V[:, :, : k - 1], rand], axis=-1))[0]  # (B, H, k)
    image = M.transpose(0, 2, 1) @ (M @ basis)  # (B, H, m) = MᵀM basis
    done = np.zeros(bsz, dtype=bool)
    theta = np.zeros(bsz)
    ritz = V.copy()
    extensions = 0
    while True:
        m = basis.shape[-1]
        proj = basis.transpose(0, 2, 1) @ image  # (B, m, m)
        evals, C = np.linalg.eigh(0.5 * (proj + proj.transpose(0, 2, 1)))  # ascending
        kk = min(k, m)
        Ck = C[:, :, -kk:]  # top-kk coefficient vectors, ascending
        X = basis @ Ck  # (B, H, kk) Ritz vectors
        R = image @ Ck - X * evals[:, None, -kk:]  # residuals MᵀM x − θ x
        th = evals[:, -1]
        res = np.linalg.norm(R[:, :, -1], axis=-1)
        err = res
        if m > 1:
            err = np.minimum(res, res * res / np.maximum(th - evals[:, -2], tiny))
        conv = (err <= tol * np.maximum(np.abs(th), tiny)) | (th <= 0) | (m >= hidden)
        new = conv & ~done
        if new.any():
            proved |= new & (_top_bound(evals, C, basis, image, res, trace_g) <= th * (1.0 + tol))
            theta = np.where(new, th, theta)
            if kk == k:
                ritz[new] = X[new, :, ::-1]
            done |= new
        if done.all() or m + k > max_dim:
            theta = np.where(done, theta, th)
            if kk == k:
                ritz[~done] = X[~done, :, ::-1]
            return theta, ritz, done, proved & done, extensions
        # Extend by the residuals, orthogonalised against the basis and among themselves (twice).
        Y = R[:, :, ::-1][:, :, : min(k, hidden - m)]
        for _ in range(2):
            Y = Y - basis @ (basis.transpose(0, 2, 1) @ Y)
            Y = np.linalg.qr(Y)[0]
        basis = np.concatenate([basis, Y], axis=-1)
        image = np.concatenate([image, M.transpose(0, 2, 1) @ (M @ Y)], axis=-1)
        extensions += 1


def _top_bound(evals: np.ndarray, C: np.ndarray, basis: np.ndarray, image: np.ndarray, res: np.ndarray,
               trace_g: np.ndarray) -> np.ndarray:
    """(B,) an upper bound on λ₁(G), G = MᵀM, from one Rayleigh–Ritz step, at O(H m²) cost.

    In the orthonormal basis [x₁ (top Ritz vector), X (the other Ritz vectors), V⊥ (the rest of R^H)]
    G = [[θ₁, 0, r₁ᵀ], [0, diag(θ₂..), Rᵀ], [r₁, R, C]], with r₁ and R the Ritz residuals (they lie in V⊥). For a
    unit vector split as (a, b, c) in those blocks xᵀGx <= |·|ᵀ N |·| with the non-negative 3 x 3
    N = [[θ₁, 0, ‖r₁‖], [0, θ₂, ‖R‖_F], [‖r₁‖, ‖R‖_F, trace C]] (C is PSD, so ‖C‖ <= trace C =
    trace G − Σθ), so λ₁(G) <= λ₁(N). When little of G lies outside the search space (a spread spectrum, the
    usual case for long products) this is θ₁ + ‖r₁‖²/(θ₁ − trace C) and proves θ₁ at once; when much does
    (clustered singular values, or a warm start that missed a direction) it is loose and the caller checks
    otherwise."""
    bsz, hidden, m = basis.shape
    eps = np.finfo(np.float64).eps
    X = basis @ C  # (B, H, m) all Ritz vectors, ascending
    R = image @ C - X * evals[:, None, :]  # residuals, ascending; the last one is r₁
    rest = np.linalg.norm(R[:, :, :-1], axis=(1, 2)) if m > 1 else np.zeros(bsz)
    second = evals[:, -2] if m > 1 else np.zeros(bsz)
    outside = np.maximum(trace_g - evals.sum(-1), 0.0) + 4 * hidden * eps * trace_g  # + its rounding
    N = np.zeros((bsz, 3, 3))
    N[:, 0, 0], N[:, 1, 1], N[:, 2, 2] = evals[:, -1], np.maximum(second, 0.0), outside
    N[:, 0, 2] = N[:, 2, 0] = res
    N[:, 1, 2] = N[:, 2, 1] = rest
    return np.linalg.eigvalsh(N)[:, -1]


def _certified_top(M: np.ndarray, theta: np.ndarray, tol: float) -> np.ndarray:
    """(B,) bool: whether λ₁(MᵀM) <= θ(1 + tol), proved by a Cholesky factorisation of θ(1 + tol)·I − MᵀM.

    Rayleigh–Ritz gives θ <= λ₁, and a small residual only says that θ is *an* eigenvalue: when the search space
    is (nearly) invariant — a diagonal or permutation W makes the warm start exactly so — the top Ritz pair can be
    an exact eigenpair that is not the top one, and the norm came out up to 1.9 nats low. The factorisation
    exists iff the shifted matrix is positive definite, i.e. every eigenvalue of MᵀM is below θ(1 + tol); its
    rounding (~H·ε relative) is far inside tol. Cost: one MᵀM and one Cholesky, (1 + 1/3)·H³ per step, against
    an SVD's ~20·H³. Rows with θ <= 0 (an exactly zero product) need no proof."""
    bsz, hidden, _ = M.shape
    ok = theta <= 0
    rows = np.flatnonzero(~ok)
    if rows.size == 0:
        return ok
    shifted = -(M[rows].transpose(0, 2, 1) @ M[rows])  # −MᵀM
    diag = np.arange(hidden)
    shifted[:, diag, diag] += (theta[rows] * (1.0 + tol))[:, None]
    try:
        np.linalg.cholesky(shifted)  # batched: raises if any row is not positive definite
        ok[rows] = True
    except np.linalg.LinAlgError:
        for i, row in enumerate(rows):
            try:
                np.linalg.cholesky(shifted[i])
                ok[row] = True
            except np.linalg.LinAlgError:
                pass
    return ok


#: a product whose norm fell below this in one step is scaled back to max-abs 1 and measured again: one step can
#: shrink M by any factor (W = [[0, 1], [1e-200, 0]] twice gives 1e-200·I), and θ = ‖M‖² (with MᵀM's entries)
#: near float64's underflow loses digits, then reads as an exact 0 (−inf)
TINY_NORM = 1e-100

#: log2 of float64's smallest normal number (2^-1022): a step whose smallest possible product of an entry of A, of
#: d_t and of the running product falls below it may lose a weak direction to underflow, and its sequence is
#: measured again in the graded form (:func:`_graded_log_norms`)
NORMAL_LOG2 = float(np.finfo(np.float64).minexp)

#: ``method="auto"`` takes the SVD per step up to this B·H³ (H ≤ 64 for one sequence, H ≤ 40 for four): there
#: the Ritz iteration's per-step Python work costs more than a LAPACK SVD (measured at T = 1000: 0.09 s against
#: 0.26 s at H = 32, B = 1; 0.49 s against 0.40 s at H = 48, B = 4)
SVD_MAX_WORK = 2**18


def _log2_smallest(X: np.ndarray) -> np.ndarray:
    """log2 of the smallest nonzero |entry| over the last axis (+inf where all are 0)."""
    magnitude = np.abs(X)
    with np.errstate(divide="ignore"):
        return np.log2(np.where(magnitude > 0, magnitude, np.inf).min(axis=-1))


def _graded_log_norms(A: np.ndarray, d: np.ndarray, step_log: np.ndarray, diag_right: bool) -> np.ndarray:
    r"""log‖P_t‖₂ for t = 1..T, (B, T), with every row of the product in a scale of its own.

    The product is kept as :math:`P_t = e^{c_t}\,\mathrm{diag}(e^{\rho})\,\tilde M_t`, each row of
    :math:`\tilde M_t` of max-abs 1 and its scale :math:`\rho_i` a log (−inf for a zero row). A step
    :math:`J = A\,\mathrm{diag}(d)` (h-form) makes row i of the new product
    :math:`\sum_k A_{ik} d_k e^{\rho_k} \tilde M_k`, summed relative to its largest term (the g-form's
    :math:`\mathrm{diag}(d) A` puts :math:`d_i` outside the sum), so a weak row is never flushed by a strong one
    and a product of two small numbers is a sum of logs. Then
    :math:`\|P_t\| = e^{c_t}\|\mathrm{diag}(e^{\rho})\tilde M_t\|`, from an SVD of the rows scaled relative to
    the largest (rows more than float64's range below it add nothing at that precision).

    What this form cannot hold is a range within one row: its entries share a scale, so an entry more than
    float64's range below its row's largest is flushed, which matters where later steps cancel the large entries
    exactly (relu units switching W's rows off; a user's review found one with entries 1e-200 apart). A, d and
    step_log are the prescaled factors of :func:`log_norms_of_products`. About its SVD path's work per step, and
    taken only for the sequences that need it. (A QR form, as for Lyapunov exponents, does not do: Householder's
    Q holds its small entries to eps absolute, which lost the sum of paths of W = [[ε, 0], [1, ε]]: log t too
    small at ε = 1e-60.)"""
    bsz, steps, hidden = d.shape
    M = np.broadcast_to(np.eye(hidden), (bsz, hidden, hidden)).copy()
    rho = np.zeros((bsz, hidden))
    c = np.zeros(bsz)
    out = np.empty((bsz, steps))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_A, sign_A = np.log(np.abs(A)), np.sign(A)
        for t in range(steps):
            log_d, sign_d = np.log(np.abs(d[:, t])), np.sign(d[:, t])  # (B, H)
            c = c + step_log[:, t]
            if diag_right:  # row i: Σ_k A_ik d_k e^{ρ_k} M̃_k
                terms = log_A + (log_d + rho)[:, None, :]
                signs = sign_A * sign_d[:, None, :]
            else:  # row i: d_i Σ_k A_ik e^{ρ_k} M̃_k
                terms = log_A + rho[:, None, :] + log_d[:, :, None]
                signs = sign_A * sign_d[:, :, None]
            top = terms.max(axis=-1)  # (B, H): each new row's largest term, −inf for a zero row
            top_safe = np.where(np.isfinite(top), top, 0.0)
            M = (signs * np.exp(terms - top_safe[..., None])) @ M
            m_max = np.abs(M).max(axis=-1)
            alive = (m_max > 0) & np.isfinite(top)
            rho = np.where(alive, top_safe + np.log(np.where(alive, m_max, 1.0)), -np.inf)
            M = M / np.where(alive, m_max, 1.0)[..., None]
            rho_max = rho.max(axis=-1)
            scaled = np.exp(rho - np.where(np.isfinite(rho_max), rho_max, 0.0)[:, None])[..., None] * M
            sigma = np.linalg.svd(scaled, compute_uv=False)[:, 0]
            out[:, t] = np.where(np.isfinite(rho_max) & (sigma > 0), c + rho_max + np.log(sigma), -np.inf)
    return out


@outside_transforms(factor_tensors)
def log_norms_of_products(factors: JacobianFactors, *, method: str = "auto", tol: float = 1e-10, block: int = 4,
                          max_dim: int = 96, seed: int = 0, stats: dict | None = None) -> Tensor:
    r"""log‖J_t ⋯ J_1‖₂ for t = 1..T: (B, T) float64 (see the module docstring for the method).

    Args:
        factors: the one-step Jacobians.
        method: ``"iterative"`` (warm-started block Rayleigh–Ritz), ``"svd"`` (an SVD of the renormalised
            product at every step: the same numbers, slower for all but small B·H³) or ``"auto"`` (the default:
            ``"svd"`` where B·H³ ≤ :data:`SVD_MAX_WORK`, else ``"iterative"``).
        tol: relative error target for λ₁(MᵀM) (the norm's relative error is about half of it).
        block: k, the number of Ritz vectors carried from step to step.
        max_dim: the largest search space before falling back to an SVD.
        seed: seeds the random directions (the result does not depend on it beyond ~tol).
        stats: if given, its counts of this call are set: ``extensions`` (search-space extensions in all),
            ``cholesky`` (Ritz values proved the top one by a Cholesky factorisation), ``fallbacks`` (SVDs) and
            ``rescaled`` (products renormalised below :data:`TINY_NORM`) and ``graded`` (sequences measured
            again in the graded form, see :data:`NORMAL_LOG2`).
    """
    if method not in ("auto", "iterative", "svd"):
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'iterative' or 'svd'")
    block, max_dim = _check_count("block", block), _check_count("max_dim", max_dim)  # block 0 looped forever
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ValueError(f"tol must be a real number in (0, 1), got {tol!r}")
    check_factors_finite(factors)
    stats = {} if stats is None else stats
    device = factors.d.device
    A = factors.A.detach().to(device="cpu", dtype=F64).numpy()
    d = factors.d.detach().to(device="cpu", dtype=F64).numpy()
    bsz, steps, hidden = d.shape
    stats.update(extensions=0, cholesky=0, fallbacks=0, rescaled=0, graded=0)  # this call's, not a running total
    if bsz == 0:  # an empty batch measures nothing (numpy cannot reshape it to (0, -1) below)
        return torch.empty(0, steps, dtype=F64, device=device)
    A = np.broadcast_to(A, (bsz, hidden, hidden)) if A.ndim == 2 else A
    # Pre-scale A and each d_t to max-abs 1; their logs go to the running log-scale c.
    with np.errstate(divide="ignore"):
        a_max = np.abs(A).max(axis=(-2, -1))  # (B,)
        d_max = np.abs(d).max(axis=-1)  # (B, T)
        step_log = np.log(a_max)[:, None] + np.log(d_max)  # (B, T), −inf where J_t = 0
    step_log = step_log + factors.log_scale().detach().cpu().numpy()
    A = A / np.where(a_max > 0, a_max, 1.0)[:, None, None]
    d = d / np.where(d_max > 0, d_max, 1.0)[:, :, None]

    rng = np.random.default_rng(seed)
    block = min(block, hidden)
    M = np.broadcast_to(np.eye(hidden), (bsz, hidden, hidden)).copy()
    V = np.linalg.qr(rng.standard_normal((bsz, hidden, block)))[0]
    c = np.zeros(bsz)
    out = np.empty((bsz, steps))
    # sequences to measure again (see NORMAL_LOG2): a step's products are at least A's, d_t's and M's smallest
    # nonzero entries multiplied; as long as that stays a normal number, nothing underflows in the step (a
    # saturated unit's σ' of 1e-130 in a dense product is not flagged: its products stay far above it)
    graded = np.zeros(bsz, dtype=bool)
    smallest_a = _log2_smallest(A.reshape(bsz, -1))
    smallest_d = _log2_smallest(d)  # (B, T)
    smallest_m = np.zeros(bsz)  # M = I
    # Small kernels run on one BLAS thread; only a large H×H product per step is worth more (see _threads), and
    # then as many as torch may use: torch.set_num_threads(1), the cure on a busy machine, limits numpy's too
    # (on 2 shared cores with one busy, H = 256 took 2.9 s on one BLAS thread and 5.8-7.2 s on two; idle, 1.3×
    # faster on two).
    big = bsz * hidden**3 >= 2**21
    use_svd = method == "svd" or (method == "auto" and bsz * hidden**3 <= SVD_MAX_WORK)
    with numpy_blas_threads(torch.get_num_threads() if big else 1):
        for t in range(steps):
            dt = d[:, t, :, None]  # (B, H, 1)
            graded |= smallest_a + smallest_d[:, t] + smallest_m < NORMAL_LOG2
            M = A @ (dt * M) if factors.diag_right else dt * (A @ M)  # (B, H, H)
            c = c + step_log[:, t]
            if use_svd:
                theta, conv, ext = np.linalg.svd(M, compute_uv=False)[:, 0] ** 2, np.ones(bsz, dtype=bool), 0
            else:
                with numpy_blas_threads(1 if big else None):
                    theta, V, conv, proved, ext = _top_eig_gram(M, V, rng.standard_normal((bsz, hidden, 1)), tol,
                                                                max_dim)
            stats["extensions"] += ext
            if not use_svd:  # a Ritz value is a lower bound: prove it is the top one (see _top_eig_gram)
                unproved = np.flatnonzero(conv & ~proved)
                if unproved.size:
                    stats["cholesky"] += unproved.size
                    conv[unproved] = _certified_top(M[unproved], theta[unproved], tol)
            if not conv.all():  # rare: fall back to an SVD for those sequences
                idx = np.flatnonzero(~conv)
                stats["fallbacks"] += len(idx)
                theta[idx] = np.linalg.svd(M[idx], compute_uv=False)[:, 0] ** 2
            tiny = np.flatnonzero(theta < TINY_NORM**2)
            if tiny.size:  # rare: see TINY_NORM
                stats["rescaled"] += tiny.size
                m_max = np.abs(M[tiny]).max(axis=(-2, -1))
                m_scale = np.where(m_max > 0, m_max, 1.0)
                M[tiny] /= m_scale[:, None, None]
                c[tiny] += np.log(m_scale)
                theta[tiny] = np.linalg.svd(M[tiny], compute_uv=False)[:, 0] ** 2
            norm = np.sqrt(np.maximum(theta, 0.0))
            zero = norm == 0
            safe = np.where(zero, 1.0, norm)
            out[:, t] = np.where(zero, -np.inf, c + np.log(safe))
            M /= safe[:, None, None]
            c = np.where(zero, -np.inf, c + np.log(safe))
            smallest_m = _log2_smallest(M.reshape(bsz, -1))
    if graded.any():
        rows = np.flatnonzero(graded)
        stats["graded"] = rows.size
        with numpy_blas_threads(1):
            out[rows] = _graded_log_norms(A[rows], d[rows], step_log[rows], factors.diag_right)
    return torch.from_numpy(out).to(device)


def _check_count(name: str, value: object) -> int:
    """``value`` as an int >= 1; ValueError naming it otherwise (bool refused)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return int(value)
    raise ValueError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")


def check_factors_finite(factors: JacobianFactors) -> None:
    """ValueError naming the first non-finite field: NaN would reach LAPACK as "SVD did not converge" or come
    out as NaN norms. ``d_log_scale`` may be −inf (an exactly zero d_t), never NaN or +inf."""
    for name, values in (("A", factors.A), ("d", factors.d)):
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"factors.{name} is not finite (contains NaN or inf)")
    if factors.d_log_scale is not None:
        scale = factors.d_log_scale
        if bool(torch.isnan(scale).any()) or bool((scale == math.inf).any()):
            raise ValueError("factors.d_log_scale contains NaN or +inf (only −inf, an exactly zero step, is allowed)")


@outside_transforms(rnn_inputs)
def log_jacobian_norms(rnn: RNN, x: Tensor, h0: Tensor | None = None) -> Tensor:
    r"""log‖∂s_t/∂s_0‖₂ for t = 1..T: (B, T) float64, s the model's state (h or g).

    Exact spectral norms (relative error ~1e-11, tested ≤ 1e-8 against an SVD; an SVD is the fallback),
    overflow-free at any T; an exactly zero product gives −inf. x: (B, T, I); h0: (B, H) or None (zeros).
    A measurement, not a differentiable function: the result carries no autograd graph.

    Raises:
        ValueError: rnn is not a theorylab.rnn.RNN, x or h0 has the wrong shape, a parameter is not finite, or
            the trajectory overflows to inf/NaN.
        TypeError: x is not floating point.
        RuntimeError: a parameter, x or h0 comes from inside a torch.func transform (batch W in
            :func:`trajectory_derivatives` instead).
    """
    return log_norms_of_products(jacobian_factors(rnn, x, h0))


@outside_transforms(rnn_inputs)
def log_jacobian_profile(rnn: RNN, x: Tensor, h0: Tensor | None = None) -> Tensor:
    r"""log‖∂s_T/∂s_t‖₂ for t = 0..T−1: (B, T) float64, from one backward sweep.

    This is how much of a loss gradient at the last step reaches step t. The products
    :math:`(J_T \cdots J_{t+1})^\top = J_{t+1}^\top \cdots J_T^\top` are accumulated from t = T−1 down to 0.

    Args:
        rnn: a :class:`~theorylab.rnn.RNN`; s is its state, h (form "h") or g (form "g"), of size H.
        x: (B, T, I) real floating point inputs, I = ``rnn.input_size``.
        h0: (B, H) real floating point initial state s_0, H = ``rnn.hidden_size``; None: zeros.

    Returns:
        (B, T) float64 on x's device: column t (t = 0..T−1) is log‖∂s_T/∂s_t‖₂, so column 0 equals the last column
        of :func:`log_jacobian_norms` and column T−1 is log‖J_T‖₂. −inf where the product is exactly zero; (B, 0)
        for T = 0. Exact and overflow-free at any T, as :func:`log_jacobian_norms`.

    Raises:
        ValueError: rnn is not a theorylab.rnn.RNN, x is not (B, T, input_size) or h0 not (B, hidden_size), a
            parameter (W, U, b) has the wrong shape or is not finite, or the trajectory is not finite (an input
            is not finite, or the unit overflowed).
        TypeError: x, h0 or a parameter is not real floating point.
    """
    return log_norms_of_products(jacobian_factors(rnn, x, h0).transposed_reversed()).flip(1)


def log_norms_of_products_reference(factors: JacobianFactors) -> Tensor:
    """Naive reference: the explicit product and a full SVD at every step (overflows for large T)."""
    bsz, steps, hidden = factors.d.shape
    P = torch.eye(hidden, dtype=F64, device=factors.d.device).expand(bsz, hidden, hidden)
    out = []
    for t in range(steps):
        P = factors.dense(t) @ P
        out.append(torch.log(torch.linalg.svdvals(P)[:, 0]))
    return torch.stack(out, dim=1)
