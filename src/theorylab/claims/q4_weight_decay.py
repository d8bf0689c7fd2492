r"""Q4 — L2 regularisation vs weight decay (claims 4.1, 4.2, 4.3a, 4.3b, 4.4), measured on the real optimizers.

Notation as in the problem set: γ is the L2 coefficient of the loss term γ‖θ‖² (``weight_decay = 2γ`` in the API),
λ the decay per step, η (= ε) the learning rate, δ Adam's ``eps``.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import multiprocessing.context
import numbers
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import cast

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke

from ..data import digits_split
from ..env import available_cores
from ..optim import SGD, Adam, ChainOptimizer
from .base import Evidence, claim, torch_threads

# ----------------------------------------------------------------------------------------------------------------
# 4.1 and 4.2: identities, float64, step for step


def _logreg_problem(seed: int, steps: int, batch_size: int = 64):
    """Minibatch multinomial logistic regression on digits (float64) with a fixed minibatch stream."""
    split = digits_split(seed)
    gen = torch.Generator().manual_seed(seed)
    n = split.x_train.shape[0]
    batches = [torch.randint(0, n, (batch_size,), generator=gen) for _ in range(steps)]
    w0 = 0.1 * torch.randn(10, split.x_train.shape[1], generator=gen, dtype=torch.float64)
    return split, batches, w0


def _trajectory(split, batches, w0, make_opt, gamma_in_loss: float = 0.0) -> np.ndarray:
    """θ_t after every step (T, P) when minimising L (+ γ‖θ‖² through autograd when ``gamma_in_loss`` > 0)."""
    w = w0.clone().requires_grad_()
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = make_opt([w, b])
    out = []
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(split.x_train[idx] @ w.T + b, split.y_train[idx])
        if gamma_in_loss:
            loss = loss + gamma_in_loss * (w.square().sum() + b.square().sum())
        loss.backward()
        opt.step()
        out.append(torch.cat([w.detach().flatten(), b.detach()]).numpy().copy())
    return np.stack(out)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max_i |a_ti − b_ti| / max_i |b_ti| per step t."""
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


@claim("4.1")
def sgd_l2_equals_weight_decay(seed: int, quick: bool) -> Evidence:
    with torch_threads(1):
        return _sgd_l2_equals_weight_decay(seed, quick)


def _sgd_l2_equals_weight_decay(seed: int, quick: bool) -> Evidence:
    steps, eta, gamma = (60 if quick else 150), 0.1, 0.05
    split, batches, w0 = _logreg_problem(seed, steps)
    lam = 2 * eta * gamma
    # SGD on L + γ‖θ‖² (autograd) — the reference
    ref = _trajectory(split, batches, w0, lambda p: SGD(p, lr=eta), gamma_in_loss=gamma)
    # weight decay θ ← θ − η∇L − λθ with λ = 2ηγ: SGD(decay="decoupled") at a constant lr
    wd = _trajectory(split, batches, w0, lambda p: SGD(p, lr=eta, weight_decay=lam, decay="decoupled"))
    # the API's L2 mode, weight_decay = 2γ
    l2 = _trajectory(split, batches, w0, lambda p: SGD(p, lr=eta, weight_decay=2 * gamma, decay="l2"))
    # the pitfalls: λ = ηγ (the factor 2 forgotten) and the sign slip θ ← θ − η∇L + λθ (weight growth)
    half = _trajectory(split, batches, w0, lambda p: SGD(p, lr=eta, weight_decay=eta * gamma, decay="decoupled"))
    slip = _trajectory(split, batches, w0, lambda p: SGD(p, lr=eta), gamma_in_loss=-gamma)
    d_wd, d_l2, d_half, d_slip = (_rel_diff(x, ref) for x in (wd, l2, half, slip))
    checks = {
        f"weight decay λ = 2ηγ vs SGD on L + γ‖θ‖²: {float(d_wd.max()):.1e} (needs < 1e-10)": d_wd.max() < 1e-10,
        f"decay='l2' vs SGD on L + γ‖θ‖²: {float(d_l2.max()):.1e} (needs < 1e-10)": d_l2.max() < 1e-10,
        f"the slip λ = ηγ: {float(d_half.max()):.2g} (needs > 1e-3)": d_half.max() > 1e-3,
        f"the slip +2ηγθ: {float(d_slip.max()):.2g} (needs > 1e-3)": d_slip.max() > 1e-3,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    t = np.arange(1, steps + 1)
    ax.semilogy(t, np.maximum(d_wd, 1e-18), label=f"weight decay, λ = 2ηγ = {lam:g}")
    ax.semilogy(t, np.maximum(d_l2, 1e-18), "--", label="SGD(decay='l2', weight_decay=2γ)")
    ax.semilogy(t, d_half, label="λ = ηγ (factor 2 forgotten)")
    ax.semilogy(t, d_slip, label="sign slip: +2ηγθ")
    ax.axhline(1e-10, color="grey", ls=":", lw=1, label="1e-10 (threshold)")
    ax.set(xlabel="step", ylabel="max|θ − θ_ref| / max|θ_ref|",
           title=f"SGD on L + γ‖θ‖² (η={eta}, γ={gamma}) vs weight decay, float64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"max_rel_diff_lambda_2_eta_gamma": float(d_wd.max()), "max_rel_diff_l2_mode": float(d_l2.max()),
                 "max_rel_diff_lambda_eta_gamma": float(d_half.max()), "max_rel_diff_sign_slip": float(d_slip.max()),
                 "lambda": lam, "steps": steps},
        key=["max_rel_diff_lambda_2_eta_gamma", "max_rel_diff_lambda_eta_gamma", "max_rel_diff_sign_slip"],
        summary=(f"SGD on L + γ‖θ‖² vs weight decay λ = 2ηγ: max relative difference {float(d_wd.max()):.1e}, "
                 f"decay='l2' {float(d_l2.max()):.1e} (need < 1e-10); the slips λ = ηγ: {float(d_half.max()):.2g}, "
                 f"+2ηγθ: {float(d_slip.max()):.2g} (need > 1e-3)"),
        method=(f"Minibatch (64) logistic regression on scikit-learn digits in float64, {steps} steps, one shared "
                f"minibatch stream. Reference: SGD(lr=η={eta}) on autograd of L + γ‖θ‖² (γ={gamma}). Against it: "
                f"SGD(decay='decoupled', weight_decay=λ=2ηγ) (θ ← θ − η∇L − λθ), SGD(decay='l2', "
                "weight_decay=2γ), and two pitfalls (λ = ηγ; the sign slip, i.e. L − γ‖θ‖²). Confirmed when the "
                "two correct forms agree to < 1e-10 relative at every step and both pitfalls differ by > 1e-3."),
        figures={"trajectories": fig},
    )


@claim("4.2")
def adam_l2_changes_one_line(seed: int, quick: bool) -> Evidence:
    with torch_threads(1):
        return _adam_l2_changes_one_line(seed, quick)


def _adam_l2_changes_one_line(seed: int, quick: bool) -> Evidence:
    steps, lr, gamma = (60 if quick else 150), 1e-2, 0.05
    split, batches, w0 = _logreg_problem(seed, steps)
    ref = _trajectory(split, batches, w0, lambda p: Adam(p, lr=lr), gamma_in_loss=gamma)  # autograd of L + γ‖θ‖²
    l2 = _trajectory(split, batches, w0, lambda p: Adam(p, lr=lr, weight_decay=2 * gamma, decay="l2"))
    # a different line would be the decoupled form: it must NOT match
    dec = _trajectory(split, batches, w0, lambda p: Adam(p, lr=lr, weight_decay=2 * gamma * lr, decay="decoupled"))
    # an Adam written elsewhere, so that a slip shared by our Adam and our L2 line cannot pass unseen
    torch_l2 = _trajectory(split, batches, w0, lambda p: torch.optim.Adam(p, lr=lr, weight_decay=2 * gamma))
    d_l2, d_dec, d_torch = _rel_diff(l2, ref), _rel_diff(dec, ref), _rel_diff(l2, torch_l2)
    checks = {
        f"Adam(decay='l2') vs Adam on L + γ‖θ‖²: {float(d_l2.max()):.1e} (needs < 1e-10)": d_l2.max() < 1e-10,
        f"vs torch.optim.Adam: {float(d_torch.max()):.1e} (needs < 1e-10)": d_torch.max() < 1e-10,
        f"decoupled decay differs by {float(d_dec.max()):.2g} (needs > 1e-3)": d_dec.max() > 1e-3,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    t = np.arange(1, steps + 1)
    ax.semilogy(t, np.maximum(d_l2, 1e-18), label="Adam with g ← ∇L + 2γθ (decay='l2')")
    ax.semilogy(t, d_dec, label="Adam, decoupled λ = 2γ·lr (not the same)")
    ax.axhline(1e-10, color="grey", ls=":", lw=1, label="1e-10 (threshold)")
    ax.set(xlabel="step", ylabel="max|θ − θ_ref| / max|θ_ref|",
           title=f"Adam on autograd of L + γ‖θ‖² (lr={lr}, γ={gamma}) as reference, float64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"max_rel_diff_adam_l2": float(d_l2.max()), "max_rel_diff_decoupled": float(d_dec.max()),
                 "max_rel_diff_vs_torch_adam": float(d_torch.max()), "steps": steps},
        key=["max_rel_diff_adam_l2", "max_rel_diff_decoupled"],
        summary=(f"Adam(decay='l2') vs Adam on L + γ‖θ‖²: max relative difference {float(d_l2.max()):.1e}, vs "
                 f"torch.optim.Adam {float(d_torch.max()):.1e} (need < 1e-10); decoupled decay differs by "
                 f"{float(d_dec.max()):.2g} (needs > 1e-3)"),
        method=(f"The 4.1 problem (float64, {steps} steps). Reference: Adam(lr={lr}) run on autograd of "
                f"L + γ‖θ‖² (γ={gamma}). Against it: Adam(decay='l2', weight_decay=2γ), whose only change is "
                "the line g ← ∇L + 2γθ before the moment estimates, and the decoupled form as a control; and "
                "torch.optim.Adam(weight_decay=2γ), an independent Adam. Confirmed when the L2 line agrees with "
                "the reference and with torch's Adam to < 1e-10 relative at every step and the control differs "
                "by > 1e-3."),
        figures={"trajectories": fig},
    )


# ----------------------------------------------------------------------------------------------------------------
# 4.3a and 4.3b: two groups, gradient scales 100× apart


@dataclass(frozen=True)
class _ShrinkRun:
    ratio: np.ndarray  # (T, 2) ‖θ_t‖/‖θ_0‖ for (small-gradient group, large-gradient group)
    rate: np.ndarray  # (2,) −log(ratio_T)/T: the measured decay rate per step


def _shrink(decay: str, weight_decay: float, seed: int, steps: int, lr: float, scales: tuple[float, float],
            n: int = 1000) -> _ShrinkRun:
    """Adam on the stochastic loss L_t(θ) = Σ_g s_g ξ_tᵀθ_g (ξ_t ~ N(0, I)): zero-mean gradients of scale s_g,
    so that only the decay moves θ systematically. θ_0 = 1."""
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.ones(n, dtype=torch.float64, requires_grad=True) for _ in scales]
    opt = Adam([{"params": [p]} for p in groups], lr=lr, weight_decay=weight_decay, decay=decay)
    ratio = np.empty((steps, len(scales)))
    for t in range(steps):
        opt.zero_grad()
        xi = torch.randn(len(scales), n, generator=gen, dtype=torch.float64)
        loss = sum((s * xi[i] * p).sum() for i, (s, p) in enumerate(zip(scales, groups, strict=True)))
        cast(torch.Tensor, loss).backward()  # a tensor: scales is not empty, so the sum is not its start, 0
        opt.step()
        ratio[t] = [float(p.detach().norm()) / math.sqrt(n) for p in groups]
    return _ShrinkRun(ratio, -np.log(ratio[-1]) / steps)


_SCALES = (0.01, 1.0)  # gradient scales of the two groups: 100× apart
_LR = 1e-3


def _shrink_figure(run: _ShrinkRun, title: str, theory: np.ndarray | None, theory_label: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    t = np.arange(1, len(run.ratio) + 1)
    for i, (s, colour) in enumerate(zip(_SCALES, ("C0", "C3"), strict=True)):
        ax.plot(t, run.ratio[:, i], color=colour, lw=2,
                label=f"gradient scale {s:g}: rate {run.rate[i]:.2e}/step")
    if theory is not None:
        ax.plot(t, theory, "k--", lw=1, label=theory_label)
    ax.set(xlabel="step", ylabel="‖θ_t‖ / ‖θ_0‖ (per group)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@claim("4.3a")
def adam_l2_is_uneven(seed: int, quick: bool) -> Evidence:
    steps, wd = (150 if quick else 300), 0.1
    with torch_threads(1):
        run = _shrink("l2", wd, seed, steps, _LR, _SCALES)
    ratio = float(run.rate[0] / run.rate[1])
    # both groups must shrink (a decay of the wrong sign makes both grow, with a ratio of rates above 3 too)
    checks = {
        f"the large-gradient group shrinks (rate {float(run.rate[1]):.2e} per step, needs > 0)": run.rate[1] > 0,
        f"the small-gradient group decays {ratio:.2f}× as fast (needs > 3× with both shrinking)":
            bool(run.rate[1] > 0 and run.rate[0] > 3.0 * run.rate[1]),
    }
    confirmed = all(checks.values())
    fig = _shrink_figure(run, f"Adam + L2 (weight_decay=2γ={wd}, lr={_LR}): uneven decay", None, "")
    # mean-field theory: r̂ ≈ s² + (wd·θ)², so θ ← θ − lr·wd·θ / (√(s² + (wd·θ)²) + δ) per group
    ax = fig.axes[0]
    for s_g in _SCALES:
        theta, curve = 1.0, []
        for _ in range(steps):
            theta -= _LR * wd * theta / (math.sqrt(s_g**2 + (wd * theta) ** 2) + 1e-8)
            curve.append(theta)
        ax.plot(np.arange(1, steps + 1), curve, "k--", lw=1)
    ax.plot([], [], "k--", lw=1, label="mean field: lr·wd·θ/(√(s²+(wd·θ)²)+δ) per step")
    ax.legend(fontsize=8)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"rate_small_grad": float(run.rate[0]), "rate_large_grad": float(run.rate[1]),
                 "rate_ratio_small_over_large": ratio, "final_ratio_small_grad": float(run.ratio[-1, 0]),
                 "final_ratio_large_grad": float(run.ratio[-1, 1]), "gradient_scale_ratio": _SCALES[1] / _SCALES[0]},
        key=["rate_ratio_small_over_large", "final_ratio_small_grad", "final_ratio_large_grad"],
        summary=(f"Adam + L2: the group with {_SCALES[1] / _SCALES[0]:.0f}× smaller gradients decays {ratio:.2f}× "
                 f"as fast (needs > 3× with both shrinking; |θ|/|θ₀| after {steps} steps: "
                 f"{float(run.ratio[-1, 0]):.3f} and {float(run.ratio[-1, 1]):.3f})"),
        method=(f"Two parameter groups of 1000 weights (θ_0 = 1, float64) under Adam(lr={_LR}, decay='l2', "
                f"weight_decay={wd}) on a stochastic linear loss whose gradients are zero-mean noise of scale "
                f"{_SCALES[0]} and {_SCALES[1]} (100× apart), so only the decay moves θ systematically; {steps} "
                "steps. The decay rate per step is −log(‖θ_T‖/‖θ_0‖)/T per group. Confirmed when both groups "
                "shrink and the small-gradient group decays more than 3× faster than the large-gradient group."),
        figures={"shrinkage": fig},
    )


@claim("4.3b")
def decoupled_decay_is_even(seed: int, quick: bool) -> Evidence:
    steps, lam = (150 if quick else 300), 1e-3
    with torch_threads(1):
        run = _shrink("decoupled", lam, seed, steps, _LR, _SCALES)
    expected = -math.log(1 - lam)  # (1−λ)^t
    rel_err = np.abs(run.rate / expected - 1)
    ratio = float(run.rate[0] / run.rate[1])
    checks = {
        f"decay rates of the two groups in ratio {ratio:.3f} (needs within 0.1 of 1)": abs(ratio - 1) < 0.1,
        f"each within {float(rel_err.max()):.2%} of −log(1−λ) (needs < 10%)": rel_err.max() < 0.1,
    }
    confirmed = all(checks.values())
    t = np.arange(1, steps + 1)
    fig = _shrink_figure(run, f"Adam, decoupled decay λ={lam} (lr={_LR}): even decay", (1 - lam) ** t,
                         "(1−λ)^t (theory)")
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"rate_small_grad": float(run.rate[0]), "rate_large_grad": float(run.rate[1]),
                 "rate_theory": expected, "rate_ratio_small_over_large": ratio,
                 "max_rel_err_vs_theory": float(rel_err.max())},
        key=["rate_ratio_small_over_large", "max_rel_err_vs_theory"],
        summary=(f"decoupled decay: decay rates of the two groups (gradients {_SCALES[1] / _SCALES[0]:.0f}× apart) in "
                 f"ratio {ratio:.3f} (needs within 0.1 of 1), each within {float(rel_err.max()):.2%} of −log(1−λ) "
                 "(needs < 10%)"),
        method=(f"The 4.3a setup (gradient scales {_SCALES[0]} and {_SCALES[1]}) under Adam(lr={_LR}, "
                f"decay='decoupled', weight_decay=λ={lam}), {steps} steps. Confirmed when both groups' measured "
                "decay rates are within 10% of −log(1−λ) (shrinkage (1−λ)^t) and within 10% of each other."),
        figures={"shrinkage": fig},
    )


# ----------------------------------------------------------------------------------------------------------------
# 4.4: lr × wd heat maps of test error on digits


@dataclass(frozen=True)
class Scheme:
    """One panel: an optimizer, a decay mode, and its (log-spaced) grids."""

    name: str  # "adam-l2", ...
    label: str
    optimizer: str  # "adam" | "sgd"
    decay: str
    log10_lr: tuple[float, float]
    log10_wd: tuple[float, float]
    wd_label: str


@dataclass(frozen=True)
class GridConfig:
    """The 4.4 experiment: a 3-layer MLP with LayerNorm on a digits subset, minibatch SGD/Adam, fixed step budget."""

    n_lr: int = 5
    n_wd: int = 5
    seeds: int = 5
    steps: int = 1000
    batch_size: int | None = 32  # None: full batch (designs 1-3)
    hidden: int = 32
    n_train: int = 400
    momentum: float = 0.9  # SGD's
    resample_data: bool = True  # every replicate draws its own split and training images (not only its own init)


FULL = GridConfig()
QUICK = GridConfig(n_lr=4, n_wd=4, seeds=3, steps=60, n_train=200)  # a smoke run: too short to judge


def cosine_multiplier_sum(steps: int) -> float:
    r""":math:`\sum_{t=0}^{T-1} m_t` with :math:`m_t = \tfrac12(1 + \cos(\pi t/T))`, the lr schedule (≈ T/2)."""
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (must be >= 1)")
    return float(sum(0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)))


# The design of the grids (fixed before measuring). Theory (van Laarhoven 2017; Loshchilov & Hutter 2019; Wan et
# al. 2021): the two hidden layers feed LayerNorm, so they are scale-invariant and only their direction matters;
# the angular step is ~ |Δθ|/|θ|. Under the paper's decoupled decay (shrink λ·m_t per step) the norm settles where
# decay balances the tangential growth: Adam |θ|² ≈ lr²P/(2λ), SGD |θ|⁴ ≈ lr²G²/(2λ), and in both cases the angular
# step at equilibrium is ~ sqrt(2λ), independent of lr: the best λ does not depend on lr (an axis-aligned basin).
# With L2 (or torch's λ·lr) the decay per step carries lr and the equilibrium angular step does too: diagonal.
#
# Design 4 (this one). Designs 1-3 trained full batch, and the premise above was measured only afterwards
# (benchmarks/q4_rotational_equilibrium.py): full batch it fails, because the 400 images are fitted and the
# gradients vanish, so no equilibrium sets the step. The premise was then measured BEFORE this design's verdict:
# with minibatches of 32 and a constant lr the angular step under Adam's decoupled decay (SGD's: not measured) is
# flat across lr 1e-3..1e-1 for λ ≥ 0.01 (λ = 0.01: 0.035, 0.023, 0.029; 0.1: 0.105, 0.102, 0.096; 0.3: 0.173,
# 0.186, 0.177 rad/step over 1000 steps) and not at λ = 0.003. So: minibatches of 32, 1000 steps with the cosine
# schedule, and the decay per step (at the schedule's peak) spanning DECAY_PER_STEP, the band where the premise
# was measured to hold: on the decoupled panels λ spans it, and on the coupled panels the band lies inside the
# grid at EVERY learning rate of the grid (the grid runs from the band's low end at the largest lr to its high end
# at the smallest lr). The total decay D = Σ_t m_t · (decay per step) then spans TOTAL_DECAY.
DECAY_PER_STEP = (0.01, 0.3)
TOTAL_DECAY = tuple(d * cosine_multiplier_sum(FULL.steps) for d in DECAY_PER_STEP)
# Adam+L2's decay per step is lr·wd/(√r̂+δ) (the 4.3a mean field): √r̂ ≈ the RMS minibatch gradient of the hidden
# weights, measured once at initialisation for the design (0.023-0.033, 5 initialisations, minibatches of 32); it
# only sets where the grid lies, not the verdict.
ADAM_L2_GRAD_RMS = 0.025
_ADAM_LR, _SGD_LR = (-3.0, -1.0), (-2.0, 0.5)


def decay_per_step(scheme_decay: str, optimizer: str, lr: float, wd: float, momentum: float = FULL.momentum) -> float:
    """The relative shrink per step (at the schedule's peak, m = 1) of the decayed weights, as the design assumes:
    decoupled λ; torch's convention lr·λ; SGD+L2 lr·wd/(1−μ) (the momentum's steady-state gain); Adam+L2
    lr·wd/√r̂ with √r̂ = ``ADAM_L2_GRAD_RMS``."""
    if scheme_decay == "decoupled":
        return wd
    if scheme_decay == "decoupled_lr":
        return lr * wd
    if scheme_decay != "l2":
        raise ValueError(f"Invalid decay mode: {scheme_decay!r}")
    return lr * wd / (1 - momentum) if optimizer == "sgd" else lr * wd / ADAM_L2_GRAD_RMS


def _wd_bounds(decay: str, optimizer: str, log10_lr: tuple[float, float], steps: int = FULL.steps
               ) -> tuple[float, float]:
    """log10 wd bounds such that D = Σ_t m_t · decay_per_step spans ``TOTAL_DECAY`` at every lr of the grid."""
    s = cosine_multiplier_sum(steps)
    per_unit_lo = decay_per_step(decay, optimizer, 10 ** log10_lr[1], 1.0)  # the largest lr: smallest wd needed
    per_unit_hi = decay_per_step(decay, optimizer, 10 ** log10_lr[0], 1.0)
    return (round(math.log10(TOTAL_DECAY[0] / (s * per_unit_lo)), 3),
            round(math.log10(TOTAL_DECAY[1] / (s * per_unit_hi)), 3))


SCHEMES = (
    Scheme("adam-l2", "Adam + L2", "adam", "l2", _ADAM_LR, _wd_bounds("l2", "adam", _ADAM_LR),
           "L2 coefficient weight_decay"),
    Scheme("adam-decoupled", "Adam, decoupled (paper)", "adam", "decoupled", _ADAM_LR,
           _wd_bounds("decoupled", "adam", _ADAM_LR), "decay per step λ"),
    Scheme("sgd-l2", "SGD + L2", "sgd", "l2", _SGD_LR, _wd_bounds("l2", "sgd", _SGD_LR),
           "L2 coefficient weight_decay"),
    Scheme("sgd-decoupled", "SGD, decoupled (paper)", "sgd", "decoupled", _SGD_LR,
           _wd_bounds("decoupled", "sgd", _SGD_LR), "decay per step λ"),
    Scheme("adam-decoupled_lr", "AdamW, torch convention (λ·lr)", "adam", "decoupled_lr", _ADAM_LR,
           _wd_bounds("decoupled_lr", "adam", _ADAM_LR), "weight_decay λ (decay per step λ·lr)"),
)


def total_decay(scheme: Scheme, lr: float, wd: float, steps: int = FULL.steps) -> float:
    """D = Σ_t m_t · decay_per_step: the e-folds of decay a cell applies over the run (the design's criterion)."""
    return cosine_multiplier_sum(steps) * decay_per_step(scheme.decay, scheme.optimizer, lr, wd)


# Only the two scale-invariant hidden layers are decayed, in every panel. Loshchilov & Hutter decay all weights,
# but the axis-alignment argument above holds only for scale-invariant weights. The classifier is not one: under
# Adam with decoupled decay its weights settle where the ~lr-sized normalised step balances the decay, |w₃| ~ lr/λ,
# which sets the logit scale and so couples the best λ to lr by construction (a positive diagonal), while under
# Adam+L2 it settles at the regularised optimum, independent of lr. Decaying it would test that confound, not the
# claim's mechanism.
CLASSIFIER_NOT_DECAYED = True


def grid_axis(bounds: tuple[float, float], n: int) -> np.ndarray:
    return np.logspace(bounds[0], bounds[1], n)


def replicate_split(data_seed: int, replicate: int) -> int:
    """The digits split seed of one replicate (see ``GridConfig.resample_data``), in the [0, 2³²) that
    scikit-learn's ``random_state`` takes. ``--seed`` goes up to 2³² − 1, and 1000·(seed + 1) + r, the recorded
    observations' seeds, leaves that range from seed 4,294,967 on (4.4 was an error there): beyond it the split
    seed is drawn from (seed, r) by numpy's SeedSequence, which a wrap modulo 2³² would not do (it gave seeds
    2²⁹ apart the same splits)."""
    split = 1000 * (data_seed + 1) + replicate
    if split < 2**32:
        return split
    return int(np.random.SeedSequence([data_seed, replicate]).generate_state(1)[0])


def _replicate_data(cfg: GridConfig, data_seed: int):
    """Per replicate: ``n_train`` training images and every other image held out, stacked along dim 0."""
    xs, ys, xts, yts = [], [], [], []
    for s in range(cfg.seeds):
        split = digits_split(replicate_split(data_seed, s) if cfg.resample_data else data_seed)
        gen = torch.Generator().manual_seed(data_seed if not cfg.resample_data else replicate_split(data_seed, s))
        order = torch.randperm(split.x_train.shape[0], generator=gen)
        train, unused = order[: cfg.n_train], order[cfg.n_train:]
        xs.append(split.x_train[train].float())
        ys.append(split.y_train[train])
        xts.append(torch.cat([split.x_test, split.x_train[unused]]).float())
        yts.append(torch.cat([split.y_test, split.y_train[unused]]))
    return torch.stack(xs), torch.stack(ys), torch.stack(xts), torch.stack(yts)


def train_row(scheme: Scheme, lr: float, wds: tuple[float, ...], cfg: GridConfig, data_seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """One row of a grid: :func:`train_cells` at the single learning rate ``lr``, (K, S) arrays."""
    errors, rotation = train_cells(scheme, (lr,), wds, cfg, data_seed)
    return errors[0], rotation[0]


def train_cells(scheme: Scheme, lrs: tuple[float, ...], wds: tuple[float, ...], cfg: GridConfig, data_seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    r"""Test error (L, K, S) of the MLP trained at every learning rate in ``lrs``, weight decay in ``wds`` and
    seed, and the mechanism behind it: the mean angular step (L, K, S) of the second hidden layer's weights,
    :math:`\frac1T\sum_t \angle(W_2^{(t)}, W_2^{(t+1)})` in radians per step (NaN if the model diverged). The L·K·S
    networks are trained at once as a batch of independent models (one parameter group per (lr, weight decay) for
    the decayed layers and one per lr for the classifier, seeds stacked along dim 0): optimizers act elementwise
    and every model's matrix products are its own, so this gives, bit for bit, what L·K·S separate runs give (a
    test trains a cell alone). A step of this small MLP costs mostly per-op overhead, not arithmetic: batching the
    learning rates too took the full grids from 64 s to 46-54 s on 2 cores."""
    torch.set_num_threads(1)
    x, y, x_test, y_test = _replicate_data(cfg, data_seed)  # (S, N, 64), (S, N), (S, M, 64), (S, M)
    n_in, h, n_cls = x.shape[-1], cfg.hidden, 10
    inits = []
    for s in range(cfg.seeds):  # the same initialisations in every cell (common random numbers)
        g = torch.Generator().manual_seed(10_000 * data_seed + s)
        inits.append((torch.randn(n_in, h, generator=g) / math.sqrt(n_in),
                      torch.randn(h, h, generator=g) / math.sqrt(h),
                      torch.randn(h, n_cls, generator=g) / math.sqrt(h), torch.zeros(1, n_cls)))
    models, groups = [], []  # models: per (lr, wd), the (S, ...) stacked layers
    for lr in lrs:
        classifiers = []
        for wd in wds:
            w1, w2, w3, b3 = (torch.stack([init[j] for init in inits]).requires_grad_() for j in range(4))
            models.append((w1, w2, w3, b3))
            classifiers += [w3, b3]
            groups.append({"params": [w1, w2], "lr": lr, "weight_decay": wd})
        # decay on the scale-invariant hidden layers only (see CLASSIFIER_NOT_DECAYED): classifier and bias free
        groups.append({"params": classifiers, "lr": lr, "weight_decay": 0.0})
    opt: ChainOptimizer
    if scheme.optimizer == "adam":
        opt = Adam(groups, lr=lrs[0], decay=scheme.decay, nonfinite="propagate")
    else:
        opt = SGD(groups, lr=lrs[0], momentum=cfg.momentum, decay=scheme.decay, nonfinite="propagate")

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        w1, w2, w3, b3 = (torch.cat([p[j] for p in models]) for j in range(4))  # (L·K·S, ...)
        z = torch.relu(F.layer_norm(inputs @ w1, (h,)))  # (L·K·S, N, H): the first two layers are scale-invariant
        z = torch.relu(F.layer_norm(z @ w2, (h,)))
        return z @ w3 + b3  # (L·K·S, N, 10)

    cells, n = len(models), x.shape[1]
    x_test, y_test = x_test.repeat(cells, 1, 1), y_test.repeat(cells, 1)  # (L·K·S, ...): model (lr, wd, replicate)
    replicate = torch.arange(cfg.seeds)[:, None]
    # the same minibatch stream in every cell of the grid (common random numbers), its own per replicate
    batches = torch.Generator().manual_seed(10_000 * data_seed + 9_999)
    # cosine annealing to 0 (as Loshchilov & Hutter): "decoupled" decay follows it through lr / initial_lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / cfg.steps)))
    rotation = torch.zeros(cells, cfg.seeds, dtype=torch.float64)
    for _ in range(cfg.steps):
        # float64 copies: arccos of a float32 cosine cannot resolve angles below ~5e-4 rad (late cosine steps)
        w2_before = torch.stack([p[1].detach() for p in models]).flatten(2).double()  # (L·K, S, H·H)
        if cfg.batch_size is None:
            xb, yb = x, y
        else:
            idx = torch.randint(0, n, (cfg.seeds, cfg.batch_size), generator=batches)
            xb, yb = x[replicate, idx], y[replicate, idx]  # (S, B, 64), (S, B)
        opt.zero_grad(set_to_none=True)
        logits = forward(xb.repeat(cells, 1, 1))
        # a sum over models of each model's mean loss: every model gets its own gradient
        loss = F.cross_entropy(logits.reshape(-1, n_cls), yb.repeat(cells, 1).reshape(-1), reduction="sum")
        (loss / xb.shape[1]).backward()
        opt.step()
        sched.step()
        w2_after = torch.stack([p[1].detach() for p in models]).flatten(2).double()
        rotation += torch.arccos(F.cosine_similarity(w2_before, w2_after, dim=-1).clamp(-1, 1))
    with torch.no_grad():
        logits = forward(x_test)
        err = (logits.argmax(-1) != y_test).float().mean(-1)
        err = torch.where(torch.isfinite(logits).all(-1).all(-1), err, torch.tensor(0.9))  # diverged: chance
    shape = (len(lrs), len(wds), cfg.seeds)
    return err.reshape(shape).numpy(), (rotation / cfg.steps).reshape(shape).numpy()


def _train_cells_task(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    return train_cells(*args)


def basin_orientation(mean_error: np.ndarray, fraction: float = 0.2) -> tuple[float, np.ndarray]:
    """Pearson correlation of log lr and log wd over the best ``fraction`` of cells of an (L, K) grid (log-spaced
    axes, so grid indices are affine in the logs). 0 when the best cells share one lr or one wd. Also returns
    the (n, 2) indices of those cells."""
    n_lr, n_wd = mean_error.shape
    n = max(3, int(round(fraction * n_lr * n_wd)))
    best = np.argsort(mean_error.ravel(), kind="stable")[:n]
    i, j = np.unravel_index(best, mean_error.shape)
    cells = np.stack([i, j], axis=1)
    if np.ptp(i) == 0 or np.ptp(j) == 0:
        return 0.0, cells
    return float(np.corrcoef(i, j)[0, 1]), cells


def orientation_interval(errors: np.ndarray, seed: int, draws: int = 1000, level: float = 0.9
                         ) -> tuple[float, float]:
    """A bootstrap interval of :func:`basin_orientation` over the replicates of an (L, K, S) grid: the orientation
    of the mean surface of S replicates drawn with replacement, ``level`` central interval."""
    if errors.ndim != 3 or errors.shape[-1] < 2:
        raise ValueError(f"errors must be (L, K, S) with S >= 2 replicates, got shape {errors.shape}")
    rng = np.random.default_rng(seed)
    s = errors.shape[-1]
    draws_r = [basin_orientation(errors[..., rng.integers(0, s, s)].mean(-1))[0] for _ in range(draws)]
    lo, hi = np.quantile(draws_r, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def orientation_gap_interval(coupled: np.ndarray, decoupled: np.ndarray, seed: int, draws: int = 1000,
                            level: float = 0.9) -> tuple[float, float]:
    """A paired bootstrap interval of |r(coupled)| − |r(decoupled)| (:func:`basin_orientation`) over replicates
    shared by two (L, K, S) grids: each draw resamples the same replicates in both, as they share data and
    initialisations. An interval above 0 says the decoupled basin is more axis-aligned beyond replicate noise."""
    if coupled.shape[-1] != decoupled.shape[-1] or coupled.ndim != 3 or decoupled.ndim != 3:
        raise ValueError(f"grids must be (L, K, S) with the same S, got {coupled.shape} and {decoupled.shape}")
    rng = np.random.default_rng(seed)
    s = coupled.shape[-1]
    gaps = []
    for _ in range(draws):
        pick = rng.integers(0, s, s)
        gaps.append(abs(basin_orientation(coupled[..., pick].mean(-1))[0])
                    - abs(basin_orientation(decoupled[..., pick].mean(-1))[0]))
    lo, hi = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


#: |r| differences smaller than this are rounding: two |r| equal in exact arithmetic differ by ~1e-16 in floats
GAP_ROUNDING = 1e-9


def gap_side(lo: float, hi: float) -> int:
    """Which side of 0 a bootstrap interval (lo, hi) of a gap lies on, beyond rounding: +1 above, -1 below, 0 where
    it reaches 0. A lower end of 2.2e-16 (measured with torch 2.4) is a tie, not a resolved gap."""
    return 1 if lo > GAP_ROUNDING else -1 if hi < -GAP_ROUNDING else 0


def surface_signal_to_noise(errors: np.ndarray) -> float:
    """How much the (L, K, S) grid's mean surface varies between cells, against the noise of one cell's mean:
    std over cells of the mean error / the median standard error of a cell. Near 1, the surface is flat within
    its noise and no basin shape is resolved."""
    mean = errors.mean(-1)
    se = errors.std(-1, ddof=1) / math.sqrt(errors.shape[-1])
    return float(mean.std() / max(float(np.median(se)), 1e-12))


def rotation_exponents(rotation: np.ndarray, lrs: np.ndarray, wds: np.ndarray) -> tuple[float, float]:
    r"""Least-squares exponents (a, b) of :math:`\text{rotation} \approx c\,\text{lr}^a\,\text{wd}^b` over the
    finite cells of an (L, K) grid of mean rotation per step. At the noise-driven equilibrium the theory gives
    a = 0, b = ½ for decoupled decay (angular step ~ √(2λ)) and a = b = ½ where the decay per step is lr·wd
    (SGD+L2, torch's λ·lr); cells that have not reached it (too little decay) pull both towards 0."""
    log_lr, log_wd = np.meshgrid(np.log(lrs), np.log(wds), indexing="ij")
    ok = np.isfinite(rotation) & (rotation > 0)
    if ok.sum() < 3:
        return float("nan"), float("nan")
    design = np.stack([log_lr[ok], log_wd[ok], np.ones(int(ok.sum()))], axis=1)
    (a, b, _), *_ = np.linalg.lstsq(design, np.log(rotation[ok]), rcond=None)
    return float(a), float(b)


def decay_axis_error_effect(mean_error: np.ndarray) -> float:
    """How much the (L, K) mean test error moves along the decay axis: the median over learning rates of the range
    over weight decays (diverged cells included, as they count as chance)."""
    return float(np.median(np.ptp(mean_error, axis=1)))


@dataclass(frozen=True)
class Grids:
    """Per scheme name, (L, K, S) arrays over lr × weight decay × replicate."""

    errors: dict[str, np.ndarray]  # test error
    rotation: dict[str, np.ndarray]  # mean angular step of the second hidden layer, rad per step (see train_row)


def _has_accelerator() -> bool:
    """Whether torch sees a non-CPU device (CUDA, ROCm, XPU, ...); asking does not initialise it."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "device_count"):
        return accelerator.device_count() > 0
    return torch.cuda.device_count() > 0


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux without an accelerator: the workers start at once and inherit the loaded data. ``spawn``
    elsewhere: where torch sees a GPU, the first backward pass starts autograd's device threads, and a child forked
    after that fails its own first backward ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"); `verify` runs backward passes before this claim. On macOS fork is unsafe anyway."""
    if sys.platform.startswith("linux") and not _has_accelerator():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


#: prctl's option that sends a signal to this process when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int | None) -> None:
    """Pool initializer: a worker ends when the thread that started it does (Linux's ``PR_SET_PDEATHSIG``), so when
    its process dies: :func:`run_grids` makes, uses and closes its pool within one call, on one thread. A ``verify``
    killed with SIGKILL (an out-of-memory kill, a CI job's hard stop) had left its workers asleep forever, holding
    the ``--out`` folder's lock (a forked worker inherits its descriptor), so that the next run was refused.
    ``parent``: the pid the worker's parent must have, checked after the signal is asked for, in case the parent
    died before; None: not checked (``forkserver``, which :func:`_pool_context` never picks: its server starts the
    workers, and it lives as long as they do, so they would not end with the pool's maker)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no libc to ask (a static build): the check below only
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def grid_pool(workers: int) -> ProcessPoolExecutor:
    """The process pool that trains the grids' rows: started as :func:`_pool_context` says, each worker ending
    with the thread that made the pool (:func:`_die_with_parent`): use it on that thread, and close it there."""
    context = _pool_context()
    parent = None if context.get_start_method() == "forkserver" else os.getpid()
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(parent,))


def grid_tasks(cfg: GridConfig, data_seed: int, workers: int) -> list[tuple]:
    """The arguments of :func:`train_cells` for every task of :func:`run_grids`, scheme by scheme and in the
    grid's order: a scheme's learning rates as one task where there are fewer workers than schemes, else split
    into as many chunks as keep every task in the first round (3 per scheme on 16 workers: 15 tasks)."""
    chunks = max(1, min(cfg.n_lr, workers // len(SCHEMES)))
    return [(scheme, tuple(float(lr) for lr in lrs), tuple(float(w) for w in grid_axis(scheme.log10_wd, cfg.n_wd)),
             cfg, data_seed)
            for scheme in SCHEMES for lrs in np.array_split(grid_axis(scheme.log10_lr, cfg.n_lr), chunks)]


def run_grids(cfg: GridConfig, data_seed: int, workers: int | None = None) -> Grids:
    """Every scheme's grids, in ``workers`` parallel processes (default: one per CPU this process may use), each on
    one thread, so the results do not depend on ``workers``. A task trains a scheme's learning rates at once
    (:func:`train_cells`; the fewer the tasks, the less per-step overhead), split where there are workers for
    the chunks (:func:`grid_tasks`). Where the processes start with ``spawn`` (see
    :func:`_pool_context`: a GPU machine, macOS, Windows), a script that calls this must do so under
    ``if __name__ == "__main__":``, as with any multiprocessing code."""
    if workers is None:
        workers = available_cores()
    elif isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    tasks = grid_tasks(cfg, data_seed, int(workers))
    workers = min(int(workers), len(tasks))  # a worker without a task would only start and stop
    for s in range(cfg.seeds):  # load once here: forked workers inherit the cache
        digits_split(replicate_split(data_seed, s) if cfg.resample_data else data_seed)
    if workers > 1:
        with grid_pool(workers) as pool:
            try:
                cells = list(pool.map(_train_cells_task, tasks))
            except BaseException:  # an interrupt (SIGTERM to this process alone, which the workers do not get):
                # stop the tasks running too, or a scheme's (~20 s) outlasts a CI job's grace period before SIGKILL
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        with torch_threads(1):
            cells = [_train_cells_task(t) for t in tasks]
    errors, rotation = {}, {}
    for scheme in SCHEMES:
        mine = [cell for task, cell in zip(tasks, cells, strict=True) if task[0] is scheme]
        errors[scheme.name] = np.concatenate([err for err, _ in mine])
        rotation[scheme.name] = np.concatenate([rot for _, rot in mine])
    return Grids(errors, rotation)


# Recorded observations (not recomputed here) of the earlier designs of this claim, each measured once, and of the
# design premise (benchmarks/q4_rotational_equilibrium.py reproduces those numbers).
# Design 1: decoupled λ from 10^-3.5 to 10^-1 (total decay D ≈ 0.05 to 15) and the classifier decayed too.
# Design 2: the design-3 grids, but every replicate trained on the same 400 images of one split. A split-half check
# (seeds 0-2 vs 3-5) showed the Adam-decoupled surface was reproducible across initialisations (r = 0.80) yet only
# 2.2 points deep: one training set's pattern. Design 3: a split and training set per replicate, full batch, 300
# steps, D ∈ [2, 50]. Then the premise was measured and found to fail full batch, hence design 4 (see above).
EARLIER_DESIGNS_OBSERVATION = (
    "Earlier designs (recorded, seed 0, 5 replicates, each measured once; all full batch, 300 steps): "
    "(1) decoupled λ 10^-3.5..10^-1, i.e. total decay D ≈ 0.05..15, classifier decayed: orientation SGD+L2 −0.89, "
    "SGD decoupled −0.07, Adam+L2 −0.33, Adam decoupled +0.72; best error Adam decoupled 5.50±0.22% vs Adam+L2 "
    "4.97±0.13%. (2) D ∈ [2, 50], one fixed training set: SGD+L2 −0.78, SGD decoupled −0.65, Adam+L2 +0.70, Adam "
    "decoupled −0.81; best 5.23±0.22% vs 5.15±0.08%. (3) as (2) with a split and training set per replicate: "
    "SGD+L2 −0.79, SGD decoupled +0.64, Adam+L2 −0.21, Adam decoupled −0.89 (signal/noise of its surface 1.3: "
    "flat); best 4.78±0.29% vs 4.37±0.32%. All three refuted on the Adam orientation. Their premise, measured "
    "afterwards by benchmarks/q4_rotational_equilibrium.py (constant lr, 1000 steps): full batch, the angular step "
    "of the hidden weights under decoupled decay is not flat across lr (λ = 0.01: 0.0027, 0.0166, 0.0031 rad/step "
    "at lr 1e-3, 1e-2, 1e-1; λ = 0.03: 0.0015, 0.0188, 0.0054): the 400 images are fitted, gradients vanish and no "
    "equilibrium sets the step. With minibatches of 32 it is flat for λ ≥ 0.01 (λ = 0.03: 0.060, 0.056, 0.052).")


# Recorded (not recomputed here; `theorylab verify --only 4.4 --seed N` reproduces each): design 4 at seeds 0-3.
SEED_ROBUSTNESS_OBSERVATION = (
    "Seeds 0-3 (recorded on an AMD EPYC machine, torch 2.13.0; another CPU rounds differently and gives other "
    "numbers at the same seed, e.g. on an Intel Xeon at seed 0 Adam+L2 / Adam decoupled r −0.51/−0.29 and an SGD "
    "gap whose interval starts at +0.02, the verdict the same; there seed 1 confirms, its Adam gap interval "
    "+0.002..+0.77 clearing 0 by 0.002, and seeds 2 and 3 refute, seed 3 with the SGD interval −0.13..+0.95 "
    "including 0): the problem set's point criterion passes at seeds "
    "0 and 2 and fails at 1 and 3, on the Adam orientation each time (Adam+L2 / Adam decoupled r: −0.47/+0.06, "
    "−0.51/−0.79, −0.72/−0.68, −0.51/−0.57); "
    "the paired bootstrap interval of the Adam gap includes 0 at every seed, that of the SGD gap lies above 0 at "
    "every seed (lower ends +0.10, +0.21, +0.12, +0.38). The mechanism at seeds 0-3: lr exponent of the rotation "
    "0.05 (Adam decoupled), 0.03 (SGD decoupled), 0.88-0.89 (Adam+L2), 0.66-0.67 (SGD+L2); the decay moved Adam "
    "decoupled's test error by 0.50-0.67 points against a cell standard error of 0.36-0.40.")

POWER_STUDY_OBSERVATION = (
    "Power study (recorded; benchmarks/q4_power.py, planned in docs/history.md before it was run): this design with "
    "30 replicates instead of 5, at data seeds 0 and 1. The Adam gap is still not beyond noise: −0.21 (−0.33..+0.51) "
    "and +0.25 (−0.19..+0.45); the SGD gap is: +0.48 (+0.42..+0.95) and +0.69 (+0.52..+0.89). Signal/noise of the "
    "Adam surfaces rose only to 2.2-3.0 (SGD+L2: 91-96): within these grids the decay moves Adam decoupled's test "
    "error by 0.41-0.43 points, and its best 20% of cells lie within 0.05-0.13 points of each other (one cell's "
    "standard error 0.16-0.17), so they have no orientation to measure. Read-out: no effect at this power.")


def _mechanism_numbers(scheme: Scheme, mean: np.ndarray, se: np.ndarray, rotation: np.ndarray, cfg: GridConfig
                       ) -> dict[str, float]:
    """What the decay does to the hidden layers (their rotation per step) and how much the test error follows."""
    key = scheme.name.replace("-", "_")
    lrs, wds = grid_axis(scheme.log10_lr, cfg.n_lr), grid_axis(scheme.log10_wd, cfg.n_wd)
    rot = rotation.mean(-1)  # NaN where a replicate diverged: left out of the fit
    a, b = rotation_exponents(rot, lrs, wds)
    finite = rot[np.isfinite(rot)]
    return {f"rotation_lr_exponent_{key}": a, f"rotation_wd_exponent_{key}": b,
            f"rotation_per_step_min_{key}": float(np.min(finite)) if finite.size else float("nan"),
            f"rotation_per_step_max_{key}": float(np.max(finite)) if finite.size else float("nan"),
            f"decay_axis_error_effect_{key}": decay_axis_error_effect(mean),
            f"median_cell_se_{key}": float(np.median(se))}


def _mechanism_text(numbers: dict[str, float]) -> str:
    parts = []
    for name in ("adam-decoupled", "adam-l2", "sgd-decoupled", "sgd-l2", "adam-decoupled_lr"):
        k = name.replace("-", "_")
        parts.append(f"{name}: rotation ∝ lr^{numbers[f'rotation_lr_exponent_{k}']:.2f}·wd^"
                     f"{numbers[f'rotation_wd_exponent_{k}']:.2f}, {numbers[f'rotation_per_step_min_{k}']:.3f}.."
                     f"{numbers[f'rotation_per_step_max_{k}']:.3f} rad/step; moving the decay moves the test error "
                     f"by {100 * numbers[f'decay_axis_error_effect_{k}']:.2f} points (median over lr; one cell's "
                     f"standard error {100 * numbers[f'median_cell_se_{k}']:.2f})")
    text = ("The mechanism, measured in the same run (mean angular step of the second hidden layer per step, "
            "fitted as c·lr^a·wd^b; theory at equilibrium a = 0 decoupled, a = b = ½ for a decay lr·wd): "
            + "; ".join(parts) + ".")
    flat = [name for name, k in (("adam-decoupled", "adam_decoupled"), ("adam-l2", "adam_l2"))
            if numbers[f"decay_axis_error_effect_{k}"] < 2 * numbers[f"median_cell_se_{k}"]]
    if flat:  # why an orientation can be noise even when the mechanism holds
        text += (f" On {' and '.join(flat)} the decay moves the test error by less than two standard errors of a "
                 "cell: the rotation it sets matters little to the test error here, so the best decay is ill-defined "
                 "and the basin orientation is set by noise.")
    return text


def _grey_where_nan(name: str) -> Colormap:
    """The colour map ``name`` with NaN cells grey (imshow leaves them transparent, white on a white figure)."""
    return matplotlib.colormaps[name].with_extremes(bad="0.8")


def _rotation_figure(grids: Grids, stats: dict, cfg: GridConfig) -> Figure:
    """Row of heat maps: the hidden layers' rotation per step per cell (what the decay controls), and a last panel
    with each cell's test error against that rotation (whether the test error follows it)."""
    rotations = {name: r.mean(-1) for name, r in grids.rotation.items()}  # NaN where a replicate diverged
    finite = np.concatenate([r[np.isfinite(r) & (r > 0)] for r in rotations.values()])
    vmin, vmax = (np.log10(finite.min()), np.log10(finite.max())) if finite.size else (-3.0, 0.0)
    fig = Figure(figsize=(16, 10))  # two rows of three: one row of six was 0.37× its size at the page's width
    axes = fig.subplots(2, 3).ravel()
    for ax, scheme in zip(axes, SCHEMES, strict=False):
        rot = rotations[scheme.name]
        lrs, wds = grid_axis(scheme.log10_lr, cfg.n_lr), grid_axis(scheme.log10_wd, cfg.n_wd)
        with np.errstate(divide="ignore", invalid="ignore"):
            # a diverged cell (NaN) is drawn grey, not left transparent: white on white hid its label
            im = ax.imshow(np.log10(rot).T, origin="lower", cmap=_grey_where_nan("magma"), aspect="auto",
                           vmin=vmin, vmax=vmax)
        for i in range(len(lrs)):
            for j in range(len(wds)):
                dark = np.isfinite(rot[i, j]) and np.log10(max(rot[i, j], 1e-12)) <= (vmin + vmax) / 2
                ax.text(i, j, "diverged" if not np.isfinite(rot[i, j]) else f"{rot[i, j]:.3f}", ha="center",
                        va="center", fontsize=7, color="w" if dark else "k")
        ax.set_xticks(range(len(lrs)), [f"{v:.0e}" for v in lrs], rotation=45, fontsize=8)
        ax.set_yticks(range(len(wds)), [f"{v:.0e}" for v in wds], fontsize=8)
        a, b = rotation_exponents(rot, lrs, wds)
        ax.set(xlabel="learning rate", ylabel=scheme.wd_label,
               title=f"{scheme.label}\nrotation ∝ lr^{a:.2f} · wd^{b:.2f}")
        fig.colorbar(im, ax=ax, label="log10 rotation per step (rad)", shrink=0.8)
    ax = axes[-1]
    for scheme, marker in zip(SCHEMES, "os^vD", strict=True):
        ax.scatter(rotations[scheme.name].ravel(), 100 * stats[scheme.name][0].ravel(), marker=marker, s=18,
                   label=scheme.label, alpha=0.8)
    ax.set_xscale("log")
    top = min(ax.get_ylim()[1], 100 * min(float(v[0].min()) for v in stats.values()) + 10)
    ax.set_ylim(top=top)
    ax.set(xlabel="rotation of the 2nd hidden layer per step (rad)", ylabel="test error (%), mean of replicates",
           title=f"does the test error follow the rotation?\n(one point per cell; cells above {top:.0f}%, the "
                 "diverged among them, are off the chart)")
    ax.legend(fontsize=7)
    fig.suptitle("The mechanism: the decay sets how fast the scale-invariant hidden layers rotate (mean angle between "
                 "consecutive weights over the run). Decoupled: set by λ alone (rows). Coupled: by lr·wd "
                 "(diagonals).", fontsize=10)
    fig.tight_layout()
    return fig


@claim("4.4")
def why_decoupled(seed: int, quick: bool, cfg: GridConfig | None = None) -> Evidence:
    """Claim 4.4 on the grids of ``cfg`` (default: ``QUICK`` or ``FULL``; the verdict of ``verify`` is FULL's;
    ``benchmarks/q4_power.py`` passes more replicates). ``--quick``'s grids are too small to judge it: that run
    measures and draws everything, and its verdict is "not judged"."""
    judged = not (quick and cfg is None)
    cfg = cfg if cfg is not None else QUICK if quick else FULL
    grids = run_grids(cfg, data_seed=seed)
    errors = grids.errors
    numbers: dict[str, float] = {}
    stats = {}
    for scheme in SCHEMES:
        e = errors[scheme.name]  # (L, K, S)
        mean, se = e.mean(-1), e.std(-1, ddof=1) / math.sqrt(e.shape[-1])
        orient, cells = basin_orientation(mean)
        interval = orientation_interval(e, seed)
        b = np.unravel_index(np.argmin(mean), mean.shape)
        stats[scheme.name] = (mean, se, orient, cells, b, interval)
        key = scheme.name.replace("-", "_")
        numbers[f"orientation_{key}"] = orient
        numbers[f"orientation_{key}_bootstrap_90_lo"], numbers[f"orientation_{key}_bootstrap_90_hi"] = interval
        numbers[f"signal_to_noise_{key}"] = surface_signal_to_noise(e)
        numbers[f"best_test_error_{key}"] = float(mean[b])
        numbers[f"best_test_error_se_{key}"] = float(se[b])
        numbers.update(_mechanism_numbers(scheme, mean, se, grids.rotation[scheme.name], cfg))
    o = {k: abs(v[2]) for k, v in stats.items()}
    best_l2, best_dec = numbers["best_test_error_adam_l2"], numbers["best_test_error_adam_decoupled"]
    # the standard error of the paired difference: every cell trains on the same replicates (split,
    # initialisation, minibatches), whose errors correlate (0.81 at seed 0): the rule for independent estimates,
    # sqrt(se_l2² + se_dec²), was 2.3× too wide there
    diff = errors["adam-decoupled"][stats["adam-decoupled"][4]] - errors["adam-l2"][stats["adam-l2"][4]]  # (S,)
    se_diff = float(diff.std(ddof=1) / math.sqrt(diff.size))
    sgd_ok = o["sgd-decoupled"] < o["sgd-l2"]
    adam_ok = o["adam-decoupled"] < o["adam-l2"]
    error_ok = best_dec <= best_l2 + se_diff
    numbers["adam_best_error_gap_decoupled_minus_l2"] = best_dec - best_l2
    resolved, beyond_noise = [], {}  # is each orientation comparison beyond replicate noise?
    for opt_name in ("adam", "sgd"):
        gap = o[f"{opt_name}-l2"] - o[f"{opt_name}-decoupled"]
        lo, hi = orientation_gap_interval(errors[f"{opt_name}-l2"], errors[f"{opt_name}-decoupled"], seed)
        numbers[f"orientation_gap_{opt_name}_l2_minus_decoupled"] = gap
        numbers[f"orientation_gap_{opt_name}_bootstrap_90_lo"], numbers[f"orientation_gap_{opt_name}_bootstrap_90_hi"] \
            = lo, hi
        side = gap_side(lo, hi)
        beyond_noise[opt_name] = side > 0
        verdict = {1: "beyond replicate noise", -1: "opposite, beyond replicate noise",
                   0: "NOT resolved beyond the noise of the replicates"}[side]
        resolved.append(f"{opt_name.upper()}: |r| L2 − |r| decoupled = {gap:+.2f} (paired 90% bootstrap "
                        f"{lo:+.2f}..{hi:+.2f}), {verdict}.")
    numbers["adam_best_error_gap_se"] = se_diff
    # CLAIMS.md's criterion compares point estimates. We also require each comparison to exceed replicate noise:
    # on this task the Adam point comparison flips with the seed (see SEED_ROBUSTNESS_OBSERVATION), and a verdict
    # that a different seed would reverse confirms nothing. The stricter rule can only turn a pass into a fail.
    point_criterion = bool(sgd_ok and adam_ok and error_ok)
    numbers["point_criterion_passes"] = float(point_criterion)
    confirmed = bool(point_criterion and beyond_noise["adam"] and beyond_noise["sgd"])
    checks = {
        f"SGD: |r| decoupled {o['sgd-decoupled']:.3f} below L2's {o['sgd-l2']:.3f} (gap "
        f"{o['sgd-l2'] - o['sgd-decoupled']:+.3f})": sgd_ok,
        f"Adam: |r| decoupled {o['adam-decoupled']:.3f} below L2's {o['adam-l2']:.3f} (gap "
        f"{o['adam-l2'] - o['adam-decoupled']:+.3f})": adam_ok,
        f"Adam decoupled's best error {100 * best_dec:.2f}% ≤ Adam+L2's {100 * best_l2:.2f}% + one standard error "
        f"of the paired difference ({100 * se_diff:.2f})": error_ok,
        **{f"{label}: the gap's paired 90% bootstrap interval "
           f"{numbers[f'orientation_gap_{name}_bootstrap_90_lo']:+.2g}…"
           f"{numbers[f'orientation_gap_{name}_bootstrap_90_hi']:+.2g} lies above 0": beyond_noise[name]
           for name, label in (("sgd", "SGD"), ("adam", "Adam"))},
    }

    shared_min = min(float(np.min(v[0])) for v in stats.values())
    fig = Figure(figsize=(16, 10.5))  # two rows of three: one row of five was 0.44× its size at the page's width
    axes = fig.subplots(2, 3).ravel()
    axes[-1].axis("off")  # the sixth place holds the legend
    for ax, scheme in zip(axes, SCHEMES, strict=False):
        mean, se, orient, cells, b, interval = stats[scheme.name]
        lrs, wds = grid_axis(scheme.log10_lr, cfg.n_lr), grid_axis(scheme.log10_wd, cfg.n_wd)
        # one colour scale for all panels: a flat surface must look flat, not be stretched over the colour map
        im = ax.imshow(100 * mean.T, origin="lower", cmap="viridis_r", aspect="auto",
                       vmin=100 * shared_min, vmax=100 * shared_min + 10)
        ax.set_xticks(range(len(lrs)), [f"{v:.0e}" for v in lrs], rotation=45, fontsize=8)
        ax.set_yticks(range(len(wds)), [f"{v:.0e}\nD={total_decay(scheme, lrs[len(lrs) // 2], v, cfg.steps):.2g}"
                                        for v in wds], fontsize=8)
        for i in range(len(lrs)):
            for j in range(len(wds)):
                light = mean[i, j] < shared_min + 0.05  # the low half of viridis_r is yellow-green: dark text
                ax.text(i, j, f"{100 * mean[i, j]:.1f}", ha="center", va="center", fontsize=8, zorder=4,
                        color="k" if light else "w",  # an outline keeps it legible where the fit line crosses
                        path_effects=[withStroke(linewidth=2, foreground="w" if light else "k")])
        ax.plot(cells[:, 0], cells[:, 1], "s", mfc="none", mec="red", ms=14, mew=1.5, label="best 20% of cells")
        if np.ptp(cells[:, 0]) > 0 and np.ptp(cells[:, 1]) > 0:  # least-squares line through the best cells
            slope, icpt = np.polyfit(cells[:, 0], cells[:, 1], 1)
            xs = np.array([cells[:, 0].min(), cells[:, 0].max()])
            ax.plot(xs, slope * xs + icpt, "r--", lw=1.2, alpha=0.8, zorder=3, label="fit through best cells")
        ax.set_xlim(-0.5, len(lrs) - 0.5)  # the fit line must not stretch the axes
        ax.set_ylim(-0.5, len(wds) - 0.5)
        ax.set(xlabel="learning rate", ylabel=f"{scheme.wd_label}\n(D = total decay at the middle lr)",
               title=f"{scheme.label}\norientation r = {orient:+.2f} "
                     f"(90% bootstrap {interval[0]:+.2f}..{interval[1]:+.2f})"
                     f"\nbest {100 * mean[b]:.1f}±{100 * se[b]:.1f}%, signal/noise "
                     f"{numbers['signal_to_noise_' + scheme.name.replace('-', '_')]:.1f}")
        fig.colorbar(im, ax=ax, label="test error (%), same scale in every panel", shrink=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize=10)
    fig.suptitle(f"Test error on held-out digits, mean of {cfg.seeds} replicates ({cfg.steps} steps, minibatches of "
                 f"{cfg.batch_size or 'all'}); "
                 "axis-aligned basin = the best decay does not depend on the learning rate", fontsize=10)
    fig.tight_layout()
    failed = [text for text, ok in (
        (f"SGD orientation (|r| decoupled {o['sgd-decoupled']:.2f} is not below L2's {o['sgd-l2']:.2f})", sgd_ok),
        (f"Adam orientation (|r| decoupled {o['adam-decoupled']:.2f} is not below L2's {o['adam-l2']:.2f}, by "
         f"{o['adam-decoupled'] - o['adam-l2']:.2f})", adam_ok),
        (f"Adam decoupled best error ({100 * best_dec:.2f}% vs Adam+L2 {100 * best_l2:.2f}%: "
         f"{100 * (best_dec - best_l2):.2f} points worse, {(best_dec - best_l2) / max(se_diff, 1e-12):.1f} standard "
         "errors of the paired difference; allowed: 1)", error_ok),
        ("Adam orientation gap not beyond replicate noise (its paired 90% bootstrap interval is not clear of 0)",
         beyond_noise["adam"]),
        ("SGD orientation gap not beyond replicate noise (its paired 90% bootstrap interval is not clear of 0)",
         beyond_noise["sgd"])) if not ok]
    flatness = []  # how much the best cells differ, against the noise of one cell: is the orientation resolved?
    for name in ("adam-l2", "adam-decoupled"):
        mean, se, _, cells, _, _ = stats[name]
        spread = float(np.ptp(mean[cells[:, 0], cells[:, 1]]))
        numbers[f"best_cells_error_spread_{name.replace('-', '_')}"] = spread
        flatness.append(f"{name}: the best 20% of cells span {100 * spread:.2f} points of error, one cell's median "
                        f"standard error is {100 * float(np.median(se)):.2f}.")
    flatness_text = " ".join(flatness)
    decay_range = {s.name: [total_decay(s, lr, wd, cfg.steps) for lr in grid_axis(s.log10_lr, cfg.n_lr)
                            for wd in grid_axis(s.log10_wd, cfg.n_wd)] for s in SCHEMES}
    split = digits_split(replicate_split(seed, 0) if cfg.resample_data else seed)  # the same sizes in every one
    n_test, n_unused = split.x_test.shape[0], split.x_train.shape[0] - cfg.n_train
    numbers["total_decay_min_decoupled"] = float(min(decay_range["adam-decoupled"]))
    numbers["total_decay_max_decoupled"] = float(max(decay_range["adam-decoupled"]))
    orientations = [f"{label} {o[f'{name}-l2']:.2f} → {o[f'{name}-decoupled']:.2f} (gap's 90% interval "
                    f"{numbers[f'orientation_gap_{name}_bootstrap_90_lo']:+.2g}…"
                    f"{numbers[f'orientation_gap_{name}_bootstrap_90_hi']:+.2g})"
                    for name, label in (("sgd", "SGD"), ("adam", "Adam"))]
    return Evidence(
        confirmed=confirmed,
        judged=judged,
        checks=checks,
        numbers={**numbers, "grid_cells_per_panel": cfg.n_lr * cfg.n_wd, "seeds": cfg.seeds, "steps": cfg.steps},
        key=["orientation_adam_l2", "orientation_adam_decoupled", "orientation_gap_adam_bootstrap_90_lo",
             "orientation_sgd_l2", "orientation_sgd_decoupled", "orientation_gap_sgd_bootstrap_90_lo"],
        summary=("basin orientation |r|, L2 → decoupled (must fall): " + "; ".join(orientations)
                 + f"; each interval must lie above 0; Adam's best test error decoupled {best_dec:.2%} vs L2 "
                 f"{best_l2:.2%} (needs ≤ L2's + {se_diff:.2%}, one standard error of the paired difference)"),
        method=("The fourth design of this experiment (the first three, each measured once, and why each was "
                "replaced are in the notes). "
                f"scikit-learn digits. Each of the {cfg.seeds} replicates draws its own stratified 75/25 split, "
                f"its own {cfg.n_train} training images from the 75% and its own initialisation; held out for test: "
                f"the replicate's {n_test} test images and the {n_unused} training images it did not train on. "
                f"MLP 64→{cfg.hidden}→{cfg.hidden}→10 with LayerNorm (no affine) after the first two layers, "
                "only the two (scale-invariant) hidden layers decayed, the classifier and its bias not (the "
                "axis-alignment argument holds for scale-invariant weights only; a decayed classifier under Adam "
                "with decoupled decay settles at |w| ~ lr/λ, which couples the best λ to lr by construction); "
                f"{cfg.steps} steps on minibatches of {cfg.batch_size or 'all'} images in float32 (SGD momentum "
                f"{cfg.momentum}) with cosine annealing of the lr to 0. A {cfg.n_lr}×{cfg.n_wd} log-spaced "
                f"lr × weight-decay grid per scheme, the same {cfg.seeds} replicates in every cell (common random "
                "numbers), test error averaged over replicates. The decay grids are set before measuring by the "
                "decay per step at the schedule's peak: the theory's axis-aligned basin needs the hidden weights "
                "in their noise-driven equilibrium, where the angular step is set by λ alone; that was measured to "
                f"hold (benchmarks/q4_rotational_equilibrium.py) for λ ∈ [{DECAY_PER_STEP[0]:g}, "
                f"{DECAY_PER_STEP[1]:g}] with minibatches of 32. So the decoupled λ grid spans that band and each "
                "lr-coupled grid (SGD+L2: decay lr·wd/(1−μ) per step; Adam+L2: lr·wd/√r̂ with √r̂ = "
                f"{ADAM_L2_GRAD_RMS} the RMS minibatch gradient at initialisation; torch's λ·lr) spans from the "
                "band's low end at its largest lr to its high end at its smallest, so that band "
                "lies inside the grid at every lr. Basin orientation: Pearson r of (log lr, log wd) over the best "
                "20% of cells (0 if they share one lr or one wd), with a 90% bootstrap interval over replicates; "
                "signal/noise = std over cells of the mean error / the median standard error of a cell. "
                "Confirmed when |r| is smaller decoupled than "
                "with L2 for both SGD and Adam and the best mean test error of Adam decoupled is ≤ Adam+L2's plus "
                "one standard error of the difference, paired over the replicates that every cell shares (the "
                "problem set's criterion), and, added by us because the "
                "Adam point comparison flips with the seed on this task, when each optimizer's gap |r| L2 − |r| "
                "decoupled is beyond replicate noise: its paired 90% bootstrap interval over replicates lies "
                "above 0. The fifth panel is torch's convention (decay λ·lr per "
                "step), shown for contrast, not judged. Mechanism (reported, not judged): the mean angle between "
                "consecutive weights of the second hidden layer over the run, per cell, fitted as c·lr^a·wd^b, and "
                "each cell's test error against it."),
        figures={"heatmaps": fig, "rotation": _rotation_figure(grids, stats, cfg)},
        notes=(f"--quick: a smoke run ({cfg.steps} steps, {cfg.seeds} replicates), too short to judge this claim; "
               "run without --quick. " if not judged else "")
        + ("" if confirmed else f"failed: {'; '.join(failed)}. ")
        + f"The problem set's point criterion alone {'passes' if point_criterion else 'fails'}. "
        + " ".join(resolved) + " " + flatness_text + " " + _mechanism_text(numbers) + " "
        + SEED_ROBUSTNESS_OBSERVATION + " "
        + POWER_STUDY_OBSERVATION + " "
        + EARLIER_DESIGNS_OBSERVATION
        + " The basin orientation over the best 20% of cells is noisy where the error surface is flat: read it "
          "with the heat maps.",
    )
