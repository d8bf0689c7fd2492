"""Deep saturation, degenerate horizons and replaced parameters: finite answers or clear errors, never a silent −inf
or a wrong second derivative."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from theorylab.rnn import RNN, certificate, log_jacobian_norms, log_jacobian_profile, lyapunov_spectrum
from theorylab.rnn.activations import ACTIVATIONS

F64 = torch.float64
_MPMATH_DERIV = {
    "tanh": lambda x: mpmath.sech(x) ** 2,
    "sigmoid": lambda x: mpmath.exp(-abs(x)) / (1 + mpmath.exp(-abs(x))) ** 2,
    "relu": lambda x: mpmath.mpf(1) if x > 0 else mpmath.mpf(0),
    "gelu": lambda x: mpmath.ncdf(x) + x * mpmath.npdf(x),
    "silu": lambda x: (1 + x / (1 + mpmath.exp(x))) / (1 + mpmath.exp(-x)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_log_derivative_matches_extended_precision_far_into_saturation(name):
    """log|σ'| and sign σ' against 50-digit arithmetic, from the centre to where σ' is far below float64's range."""
    mpmath.mp.dps = 50
    xs = [-1e10, -1000.0, -800.0, -50.0, -20.0, -5.5, -4.9, -1.0, -0.3, 0.3, 1.0, 4.9, 20.0, 50.0, 800.0, 1000.0,
          1e10]
    log_abs, sign = ACTIVATIONS[name].log_deriv(torch.tensor(xs, dtype=F64))
    for x, got_log, got_sign in zip(xs, log_abs.tolist(), sign.tolist(), strict=True):
        exact = _MPMATH_DERIV[name](mpmath.mpf(x))
        if exact == 0:
            assert got_log == -math.inf and got_sign == 0.0, (name, x)
            continue
        want = float(mpmath.log(abs(exact)))
        assert got_log == pytest.approx(want, rel=1e-10, abs=1e-12), (name, x, got_log, want)
        assert got_sign == (1.0 if exact > 0 else -1.0), (name, x)


def _saturated_unit(activation: str = "tanh") -> RNN:
    rnn = RNN(1, 1, activation=activation).double()
    with torch.no_grad():
        rnn.W.fill_(1.0)
        rnn.U.fill_(1000.0)
        rnn.b.zero_()
    return rnn


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "gelu", "silu"])
def test_deep_saturation_gives_finite_log_norms(activation):
    """W = 1, U x_t = ±1000: σ'(h_t) is far below float64's range (sech²(1000) ≈ e^{−1999}), yet the log-norm of
    the 1×1 product is finite and equals Σ log|σ'(h_{t−1})|, computed in 50-digit arithmetic."""
    mpmath.mp.dps = 50
    drive = -1000.0 if activation in ("gelu", "silu") else 1000.0  # their saturated side is the left one
    rnn = _saturated_unit(activation)
    with torch.no_grad():
        rnn.U.fill_(drive)
    x = torch.ones(1, 3, 1, dtype=F64)
    sigma = {"tanh": mpmath.tanh, "sigmoid": lambda v: 1 / (1 + mpmath.exp(-v)),
             "gelu": lambda v: v * mpmath.ncdf(v), "silu": lambda v: v / (1 + mpmath.exp(-v))}[activation]
    h, total, want = mpmath.mpf(0), mpmath.mpf(0), []
    for _ in range(3):  # h-form: J_t = W σ'(h_{t−1}), h_t = W σ(h_{t−1}) + U x_t
        total += mpmath.log(abs(_MPMATH_DERIV[activation](h)))
        want.append(float(total))
        h = sigma(h) + drive
    got = log_jacobian_norms(rnn, x)[0].tolist()
    assert all(math.isfinite(v) for v in got)
    assert got == pytest.approx(want, rel=1e-10)
    assert lyapunov_spectrum(rnn, x)[0, 0].item() == pytest.approx(want[-1] / 3, rel=1e-10)
    assert log_jacobian_profile(rnn, x)[0, 0].item() == pytest.approx(want[-1], rel=1e-10)


def test_exactly_dead_relu_still_gives_minus_inf():
    rnn = RNN(1, 1, activation="relu").double()
    with torch.no_grad():
        rnn.W.fill_(1.0)
        rnn.U.fill_(-5.0)
        rnn.b.zero_()
    x = torch.ones(1, 3, 1, dtype=F64)
    assert torch.isneginf(log_jacobian_norms(rnn, x)).all()
    assert torch.isneginf(lyapunov_spectrum(rnn, x)).all()


def test_lyapunov_of_an_empty_sequence_is_an_error_not_nan():
    with pytest.raises(ValueError, match="T = 0"):
        lyapunov_spectrum(RNN(3, 4), torch.randn(2, 0, 3), None, 2)
    assert log_jacobian_norms(RNN(3, 4), torch.randn(2, 0, 3)).shape == (2, 0)  # no steps: no norms


@pytest.mark.parametrize("form", ["h", "g"])
def test_second_derivatives_through_forward_raise_instead_of_being_wrong(form):
    rnn = RNN(3, 4, form=form).double()
    x = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    states, _ = rnn(x)
    (gx,) = torch.autograd.grad((states**2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (gx**2).sum().backward()
    # the reference loop supports them
    states, _ = rnn.forward_reference(x)
    (gx,) = torch.autograd.grad((states**2).sum(), x, create_graph=True)
    (gx**2).sum().backward()
    assert torch.isfinite(rnn.W.grad).all()


@pytest.mark.parametrize("name, shape", [("W", (4, 5)), ("W", (3, 3)), ("U", (4, 2)), ("b", (5,))])
def test_replaced_parameter_of_the_wrong_shape_is_named(name, shape):
    rnn = RNN(3, 4)
    setattr(rnn, name, torch.nn.Parameter(torch.randn(shape)))
    x = torch.randn(2, 5, 3)
    for call in (lambda: rnn(x), lambda: log_jacobian_norms(rnn, x), lambda: lyapunov_spectrum(rnn, x),
                 lambda: certificate(rnn)):
        with pytest.raises(ValueError, match=f"parameter {name} must have shape"):
            call()


@pytest.mark.parametrize("args", [(3, True), (True, 4), (3, 4.0)])
def test_sizes_must_be_ints_not_bools_or_floats(args):
    with pytest.raises(ValueError, match="must be a"):
        RNN(*args)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_an_overflowing_trajectory_is_an_error_not_a_vanished_jacobian(activation):
    """Unbounded activations with a huge W overflow to inf/NaN: the Jacobian is undefined, not exactly zero."""
    torch.manual_seed(0)
    rnn = RNN(2, 4, activation=activation).double()
    with torch.no_grad():
        rnn.W.copy_(1e3 * (torch.eye(4) + torch.randn(4, 4)))
    x = torch.ones(1, 300, 2, dtype=F64)
    with pytest.raises(ValueError, match="not finite"):
        log_jacobian_norms(rnn, x)
    with pytest.raises(ValueError, match="not finite"):
        lyapunov_spectrum(rnn, x)
