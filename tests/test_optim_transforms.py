"""The transform chains against naive per-step references (float64), with hypothesis-drawn hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_helpers import single_thread  # noqa: F401 (an autouse fixture)

from theorylab.optim import (
    SGD,
    Adam,
    AddDecayedWeights,
    ChainOptimizer,
    ScaleByAdam,
    ScaleByLearningRate,
    Trace,
    with_decay,
)


def naive_adam(theta, grads, lr, b1, b2, eps, wd, decay, lr_factors=None, amsgrad=False, maximize=False):
    """Kingma & Ba's Algorithm 1 written out per step, with the three decay conventions; θ before the step.
    ``amsgrad``: the largest v so far in the denominator (Reddi et al. 2018); ``maximize``: ascend on -g."""
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    v_max = torch.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, start=1):
        f = lr_factors[t - 1] if lr_factors else 1.0
        eta = lr * f
        if maximize:
            g = -g
        if decay == "l2":
            g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = torch.maximum(v_max, v)
        a = (m / (1 - b1**t)) / (torch.sqrt((v_max if amsgrad else v) / (1 - b2**t)) + eps)
        step = eta * a
        if decay == "decoupled":
            step = step + f * wd * theta
        elif decay == "decoupled_lr":
            step = step + eta * wd * theta
        theta = theta - step
        out.append(theta)
    return out


def run_ours(opt_factory, theta0, grads, lr_factors=None):
    p = theta0.clone().requires_grad_()
    opt = opt_factory([p])
    base = opt.param_groups[0]["lr"]
    out = []
    for t, g in enumerate(grads):
        if lr_factors:
            opt.param_groups[0]["lr"] = base * lr_factors[t]
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-4, 1e-1), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-2),
       wd=st.floats(0.0, 0.5), decay=st.sampled_from(["l2", "decoupled", "decoupled_lr"]),
       seed=st.integers(0, 2**31 - 1), scheduled=st.booleans(), amsgrad=st.booleans(), maximize=st.booleans())
def test_adam_matches_naive_reference(lr, b1, b2, eps, wd, decay, seed, scheduled, amsgrad, maximize):
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(7, dtype=torch.float64, generator=gen)
    grads = [torch.randn(7, dtype=torch.float64, generator=gen) * 10 ** torch.randint(-3, 2, (1,), generator=gen)
             for _ in range(12)]
    factors = [0.5 * (1 + math.cos(math.pi * t / 12)) + 0.01 for t in range(12)] if scheduled else None
    ours = run_ours(lambda p: Adam(p, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decay=decay, amsgrad=amsgrad,
                                   maximize=maximize), theta0, grads, factors)
    ref = naive_adam(theta0, grads, lr, b1, b2, eps, wd, decay, factors, amsgrad, maximize)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-3, 0.5), mu=st.floats(0.0, 0.99), damp=st.floats(0.0, 0.9), wd=st.floats(0.0, 0.2),
       nesterov=st.booleans(), decay=st.sampled_from(["l2", "decoupled", "decoupled_lr"]),
       seed=st.integers(0, 2**31 - 1), maximize=st.booleans())
def test_sgd_matches_naive_reference(lr, mu, damp, wd, nesterov, decay, seed, maximize):
    if nesterov:
        damp = 0.0
        mu = max(mu, 0.1)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, dtype=torch.float64, generator=gen)
    grads = [torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(10)]
    ours = run_ours(lambda p: SGD(p, lr=lr, momentum=mu, dampening=damp, nesterov=nesterov, weight_decay=wd,
                                  decay=decay, maximize=maximize), theta, grads)
    buf = None
    for g, got in zip(grads, ours, strict=True):
        g = -g if maximize else g
        d = g + wd * theta if decay == "l2" else g
        if mu:
            buf = d.clone() if buf is None else mu * buf + (1 - damp) * d
            d = d + mu * buf if nesterov else buf
        step = lr * d
        if decay == "decoupled":
            step = step + wd * theta
        elif decay == "decoupled_lr":
            step = step + lr * wd * theta
        theta = theta - step
        torch.testing.assert_close(got, theta, rtol=1e-10, atol=1e-13)


def test_decay_mode_is_the_position_of_one_part():
    """L2 vs decoupled is the order of the same parts, not different optimizers."""
    pre = [ScaleByAdam()]
    assert [type(t) for t in with_decay(pre, "l2")] == [AddDecayedWeights, ScaleByAdam, ScaleByLearningRate]
    assert [type(t) for t in with_decay(pre, "decoupled_lr")] == [ScaleByAdam, AddDecayedWeights, ScaleByLearningRate]
    dec = with_decay(pre, "decoupled")
    assert [type(t) for t in dec] == [ScaleByAdam, ScaleByLearningRate, AddDecayedWeights] and dec[-1].schedule
    with pytest.raises(ValueError, match="decay mode: 'weird'"):
        with_decay(pre, "weird")


class TraceAfterAdam(ChainOptimizer):
    """A chain whose last part needs the true values of Adam's deferred division, scale and decay."""

    def __init__(self, params, lr, mu):
        super().__init__(list(params), {"lr": lr, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1,
                                        "momentum": mu})

    def transforms(self, group):
        return [ScaleByAdam(), AddDecayedWeights(), ScaleByLearningRate(), Trace()]


def test_deferred_arithmetic_is_materialised_when_a_later_part_needs_it():
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, dtype=torch.float64, generator=gen)
    grads = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(8)]
    ours = run_ours(lambda p: TraceAfterAdam(p, lr=0.01, mu=0.5), theta0, grads)
    theta, m, v, buf = theta0, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), None
    for t, (g, got) in enumerate(zip(grads, ours, strict=True), start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        u = 0.01 * ((m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.99**t)) + 1e-8) + 0.1 * theta)
        buf = u if buf is None else 0.5 * buf + u
        theta = theta - buf
        torch.testing.assert_close(got, theta, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("factory", [
    lambda p: SGD(p, lr=0.1, weight_decay=0.1),
    lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, decay="decoupled"),
    lambda p: Adam(p, weight_decay=0.1),
    lambda p: Adam(p, weight_decay=0.1, decay="decoupled"),
])
def test_gradients_are_never_modified(factory):
    """The chain reads the gradients in place (copy on write): they must come out untouched."""
    p = torch.randn(4, 3, requires_grad=True)
    opt = factory([p])
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)


def test_non_contiguous_parameters():
    base = torch.randn(6, 4, dtype=torch.float64)
    p1 = base.clone().t().requires_grad_()  # (4, 6), non-contiguous
    p2 = base.clone().t().contiguous().requires_grad_()
    o1, o2 = Adam([p1], lr=0.01, weight_decay=0.1), Adam([p2], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(4, 6, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert not p1.is_contiguous()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-12, atol=1e-14)
