"""SGDMomentum and RunningAverageSGD: the Q2 equivalence, debias, torch.optim plumbing, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theorylab.optim import (
    NonFiniteGradientError,
    RunningAverageSGD,
    SGDMomentum,
    momentum_from_running_average,
    running_average_from_momentum,
)


def quadratic_problem(seed: int, dim: int = 6):
    """A state-dependent gradient: f(θ) = ½ θᵀAθ − bᵀθ + noise_t·θ, A SPD."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(200, dim, generator=gen, dtype=torch.float64)
    return a, b, noise


def trajectory(make_opt, problem, steps: int) -> torch.Tensor:
    a, b, noise = problem
    theta = torch.zeros(a.shape[0], dtype=torch.float64, requires_grad=True)
    opt = make_opt([theta])
    out = []
    for t in range(steps):
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta - b @ theta + noise[t] @ theta
        loss.backward()
        opt.step()
        out.append(theta.detach().clone())
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(beta=st.floats(0.01, 0.99), delta=st.floats(1e-3, 0.5), seed=st.integers(0, 2**16))
def test_momentum_equals_running_average_under_the_mapping(beta, delta, seed):
    problem = quadratic_problem(seed)
    alpha, eps = momentum_from_running_average(beta, delta)
    ra = trajectory(lambda p: RunningAverageSGD(p, lr=delta, beta=beta), problem, 60)
    mom = trajectory(lambda p: SGDMomentum(p, lr=eps, momentum=alpha), problem, 60)
    scale = ra.abs().max().clamp(min=1.0)
    assert torch.allclose(ra, mom, rtol=0, atol=1e-10 * scale)


@settings(max_examples=20, deadline=None)
@given(beta=st.floats(0.05, 0.95), delta=st.floats(1e-2, 0.5), seed=st.integers(0, 2**16))
def test_wrong_mapping_differs(beta, delta, seed):
    """ε = δ (forgetting the (1 − β)) gives a different trajectory: the equivalence test can fail."""
    problem = quadratic_problem(seed)
    ra = trajectory(lambda p: RunningAverageSGD(p, lr=delta, beta=beta), problem, 20)
    wrong = trajectory(lambda p: SGDMomentum(p, lr=delta, momentum=beta), problem, 20)
    assert (ra - wrong).abs().max() > 1e-6


def test_mapping_values_and_inverse():
    assert momentum_from_running_average(0.9, 0.5) == (0.9, pytest.approx(0.05))
    beta, lr = running_average_from_momentum(*momentum_from_running_average(0.75, 0.2))
    assert beta == 0.75 and lr == pytest.approx(0.2)


@settings(max_examples=30, deadline=None)
@given(beta=st.floats(0.01, 0.999), c=st.floats(-10, 10), steps=st.integers(1, 50))
def test_debias_is_exact_on_a_constant_stream(beta, c, steps):
    """With g_t = c for all t, v̂_t = v_t / (1 − β^t) = c at every t; without debias the step is (1 − β^t)c."""
    for debias in (False, True):
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = RunningAverageSGD([p], lr=1.0, beta=beta, debias=debias)
        for t in range(1, steps + 1):
            before = p.detach().clone()
            p.grad = torch.full_like(p, c)
            opt.step()
            step = (before - p.detach()).item()
            expected = c if debias else (1 - beta**t) * c
            assert step == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_running_average_unrolled_closed_form():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    beta = 0.8
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = RunningAverageSGD([p], lr=1.0, beta=beta)
    for t in range(1, 31):
        p.grad = g[t - 1].clone()
        opt.step()
        weights = torch.tensor([(1 - beta) * beta ** (t - i) for i in range(1, t + 1)], dtype=torch.float64)
        assert torch.allclose(opt.state[p]["running_average"], weights @ g[:t], atol=1e-14)
        assert weights.sum().item() == pytest.approx(1 - beta**t, abs=1e-14)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_beta_outside_open_interval_is_rejected(bad):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=f"beta value: {bad}"):
        RunningAverageSGD([p], lr=0.1, beta=bad)
    with pytest.raises(ValueError, match="beta"):
        momentum_from_running_average(bad, 0.1)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_bad_learning_rate_is_rejected(bad):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=f"learning rate: {bad}"):
        SGDMomentum([p], lr=bad, momentum=0.9)
    with pytest.raises(ValueError, match=f"learning rate: {bad}"):
        RunningAverageSGD([p], lr=bad, beta=0.9)


def test_negative_momentum_is_rejected():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="momentum value: -0.5"):
        SGDMomentum([p], lr=0.1, momentum=-0.5)


def test_bad_lr_set_on_a_group_later_is_rejected_at_step():
    p = torch.zeros(2, requires_grad=True)
    opt = SGDMomentum([p], lr=0.1, momentum=0.9)
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="learning rate: -1.0"):
        opt.step()


def test_momentum_matches_torch_sgd_at_constant_lr():
    """SGDMomentum (lr inside the buffer) == torch.optim.SGD(momentum, dampening 0) at a constant lr."""
    problem = quadratic_problem(3)
    ours = trajectory(lambda p: SGDMomentum(p, lr=0.05, momentum=0.9), problem, 50)
    ref = trajectory(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), problem, 50)
    assert torch.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("make", [lambda p: SGDMomentum(p, lr=0.05, momentum=0.9),
                                  lambda p: RunningAverageSGD(p, lr=0.3, beta=0.9, debias=True)])
def test_state_dict_resume_is_bit_identical(make):
    problem = quadratic_problem(7)
    a, b, noise = problem
    full = trajectory(make, problem, 40)

    theta = torch.zeros(a.shape[0], dtype=torch.float64, requires_grad=True)
    opt = make([theta])

    def run(opt, theta, t0, t1, out):
        for t in range(t0, t1):
            opt.zero_grad()
            (0.5 * theta @ a @ theta - b @ theta + noise[t] @ theta).backward()
            opt.step()
            out.append(theta.detach().clone())

    out: list[torch.Tensor] = []
    run(opt, theta, 0, 20, out)
    saved_state, saved_theta = opt.state_dict(), theta.detach().clone()
    theta2 = saved_theta.clone().requires_grad_(True)
    opt2 = make([theta2])
    opt2.load_state_dict(saved_state)
    run(opt2, theta2, 20, 40, out)
    assert torch.equal(torch.stack(out), full)


def test_param_groups_and_lr_scheduler():
    w1 = torch.zeros(1, requires_grad=True)
    w2 = torch.zeros(1, requires_grad=True)
    opt = RunningAverageSGD([{"params": [w1]}, {"params": [w2], "lr": 0.2}], lr=0.1, beta=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps = []
    for _ in range(3):
        before = (w1.item(), w2.item())
        w1.grad, w2.grad = torch.ones(1), torch.ones(1)
        opt.step()
        sched.step()
        steps.append((before[0] - w1.item(), before[1] - w2.item()))
    # v_t = 1 - 0.5^t; lr halves every step; group 2 has twice the lr
    for t, (s1, s2) in enumerate(steps, start=1):
        assert s1 == pytest.approx(0.1 * 0.5 ** (t - 1) * (1 - 0.5**t))
        assert s2 == pytest.approx(2 * s1)


def test_closure_and_parameters_without_grad():
    w = torch.ones(3, requires_grad=True)
    frozen = torch.ones(3, requires_grad=True)
    opt = SGDMomentum([w, frozen], lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))
    assert torch.equal(frozen.detach(), torch.ones(3)) and frozen not in opt.state


def test_float32_parameters_stay_float32():
    w = torch.randn(5, requires_grad=True)
    opt = RunningAverageSGD([w], lr=0.1, beta=0.9, debias=True)
    w.grad = torch.randn(5)
    opt.step()
    assert w.dtype == torch.float32 and opt.state[w]["running_average"].dtype == torch.float32
    assert math.isfinite(w.sum().item())


@pytest.mark.parametrize("cls, kwargs", [(SGDMomentum, {"momentum": 0.9}), (RunningAverageSGD, {"beta": 0.9})])
def test_the_nonfinite_policy_is_a_constructor_argument_as_the_error_message_says(cls, kwargs):
    """A NaN gradient's error says "pass nonfinite='skip'"; these two took no such argument (TypeError)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], lr=0.1, nonfinite="skip", **kwargs)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.skipped_steps == 1
    with pytest.raises(NonFiniteGradientError, match="nonfinite='skip'"):
        cls([p], lr=0.1, **kwargs).step()
    with pytest.raises(ValueError, match="Invalid nonfinite policy: 'x'"):
        cls([p], lr=0.1, nonfinite="x", **kwargs)


def test_under_a_schedule_the_twin_of_the_running_average_is_torchs_form():
    """What the docs now say: SGDMomentum (lr inside the buffer) parts from RunningAverageSGD under a StepLR, and
    SGD(lr=δ(1−β), momentum=β) (lr outside) stays its twin under any schedule."""
    from theorylab.optim import SGD

    beta, delta = 0.9, 0.2
    a, b, noise = quadratic_problem(3)

    def scheduled(make):
        theta = torch.zeros(a.shape[0], dtype=torch.float64, requires_grad=True)
        opt = make([theta])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        out = []
        for t in range(60):
            opt.zero_grad()
            (0.5 * theta @ a @ theta - b @ theta + noise[t] @ theta).backward()
            opt.step()
            sched.step()
            out.append(theta.detach().clone())
        return torch.stack(out)

    ra = scheduled(lambda p: RunningAverageSGD(p, lr=delta, beta=beta))
    alpha, eps = momentum_from_running_average(beta, delta)
    mom = scheduled(lambda p: SGDMomentum(p, lr=eps, momentum=alpha))
    torch_form = scheduled(lambda p: SGD(p, lr=eps, momentum=beta))
    scale = ra.abs().max().clamp(min=1.0)
    assert torch.allclose(ra, torch_form, rtol=0, atol=1e-12 * scale)
    assert (ra - mom).abs().max() > 1e-3 * scale
