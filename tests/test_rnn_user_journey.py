"""What an RNN user's journey found (session 28): γ of an activation registered without σ'', an empty batch in
the norms, and the diagnostics inside torch.func transforms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from theorylab.rnn import (
    ACTIVATIONS,
    RNN,
    Activation,
    certificate,
    derivative_bound,
    jacobian_factors,
    log_jacobian_norms,
    log_jacobian_profile,
    log_norms_of_products,
    lyapunov_spectrum,
    register_activation,
    trajectory_derivatives,
)

F64 = torch.float64


def _hardtanh_deriv(h):
    return ((h > -1) & (h < 1)).to(h.dtype)  # torch's convention: 0 at the kinks


def _hardtanh_log_deriv(h):
    on = (h > -1) & (h < 1)
    return torch.where(on, 0.0, -math.inf).to(h.dtype), on.to(h.dtype)


@pytest.fixture
def registered():
    """Activations registered for one test, removed after it (the registry is the process's)."""
    names = []

    def add(act):
        register_activation(act)
        names.append(act.name)
        return act.name

    yield add
    for name in names:
        ACTIVATIONS.pop(name)


def _constant_input_rnn(activation, W, b):
    rnn = RNN(1, W.shape[0], activation=activation, dtype=F64)
    with torch.no_grad():
        rnn.W.copy_(W)
        rnn.U.zero_()
        rnn.b.fill_(b)
    return rnn


def test_gamma_without_second_derivative_reads_the_limits_at_infinity(registered):
    """Without σ'' the bound was max |σ'(±1)|: softplus registered so read γ = sigmoid(1) = 0.73 where
    sup σ' = 1 (at +∞, given in deriv_at_infinity), and the certificate promised vanishing while the norm grew
    as 1.2^T."""
    name = registered(Activation("softplus_no_second", F.softplus, torch.sigmoid, lambda x: 1 / (1 + math.exp(-x)),
                                 None, (0.0, 1.0), lambda h: (F.logsigmoid(h), torch.ones_like(h))))
    assert derivative_bound(name) == 1.0
    rnn = _constant_input_rnn(name, 1.2 * torch.eye(4, dtype=F64), 10.0)
    cert = certificate(rnn)
    assert not cert.vanishing_guaranteed
    T = 50
    measured = log_jacobian_norms(rnn, torch.zeros(1, T, 1, dtype=F64))[0, -1].item()
    assert measured > 0  # it grows: any certificate of vanishing would have been wrong
    assert measured <= cert.log_bound(T) + 1e-9  # and the bound δ^T holds


def test_gamma_of_a_piecewise_constant_derivative_is_its_largest_value(registered):
    """hardtanh (σ' = 1 on (−1, 1), 0 outside and at the kinks) read γ = 0 from σ'(±1): δ = 0 and
    'vanishing guaranteed' for W = 2I, whose Jacobian norm is 2^T at the origin."""
    name = registered(Activation("hardtanh_test", F.hardtanh, _hardtanh_deriv,
                                 lambda x: 1.0 if -1 < x < 1 else 0.0, None, (0.0, 0.0), _hardtanh_log_deriv))
    assert derivative_bound(name) == 1.0
    rnn = _constant_input_rnn(name, 2 * torch.eye(3, dtype=F64), 0.0)
    cert = certificate(rnn)
    assert cert.gamma == 1.0 and cert.delta == pytest.approx(2.0) and not cert.vanishing_guaranteed
    norms = log_jacobian_norms(rnn, torch.zeros(1, 10, 1, dtype=F64))[0]
    torch.testing.assert_close(norms, torch.arange(1, 11, dtype=F64) * math.log(2.0))


def test_relu_keeps_its_bound():
    assert derivative_bound("relu") == 1.0


@pytest.mark.parametrize("form", ["h", "g"])
def test_an_empty_batch_gives_empty_norms(form):
    """B = 0 failed in numpy ("cannot reshape array of size 0 into shape (0,newaxis)") where the forward pass and
    lyapunov_spectrum return empty results."""
    rnn = RNN(3, 8, form=form)
    x = torch.randn(0, 5, 3)
    stats = {}
    for out in (log_jacobian_norms(rnn, x), log_jacobian_profile(rnn, x),
                log_norms_of_products(jacobian_factors(rnn, x, None), stats=stats)):
        assert out.shape == (0, 5) and out.dtype == F64
    assert stats == dict(extensions=0, cholesky=0, fallbacks=0, rescaled=0, graded=0)
    assert lyapunov_spectrum(rnn, x, None, 2).shape == (0, 2)


class _Diagnose(torch.nn.Module):
    def __init__(self, rnn, measure):
        super().__init__()
        self.rnn, self.measure = rnn, measure

    def forward(self, x):
        return self.measure(self.rnn, x)


_MEASURES = {"norms": log_jacobian_norms, "profile": log_jacobian_profile,
             "lyapunov": lambda rnn, x: lyapunov_spectrum(rnn, x, None, 2),
             "certificate": lambda rnn, x: torch.tensor(certificate(rnn).delta)}


@pytest.mark.parametrize("measure", list(_MEASURES))
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_the_diagnostics_say_they_are_measurements_inside_torch_func(measure, transform):
    """Given W from inside grad or vmap they failed deep in torch ("Cannot access data pointer of Tensor that
    doesn't have storage", "data-dependent control flow"); they now say what they are and where to go instead.
    The certificate under grad reads δ as a number, as before."""
    torch.manual_seed(0)
    rnn, x = RNN(3, 8), torch.randn(2, 6, 3)
    model = _Diagnose(rnn, _MEASURES[measure])

    def f(W):
        return functional_call(model, {"rnn.W": W}, (x,), strict=False).sum()

    run = grad(f) if transform == "grad" else vmap(f)
    arg = rnn.W.detach() if transform == "grad" else torch.randn(3, 8, 8)
    if (measure, transform) == ("certificate", "grad"):
        assert torch.equal(run(arg), torch.zeros(8, 8))  # a number: no gradient flows through it
        return
    with pytest.raises(RuntimeError, match="cannot take W from inside a torch.func transform.*trajectory_deriv"):
        run(arg)
    assert not log_jacobian_norms(rnn, x).requires_grad  # outside: a measurement, no graph, as documented


@pytest.mark.parametrize("measure", list(_MEASURES))
def test_an_untouched_model_is_measured_inside_a_transform_over_other_data(measure):
    """The first version refused any call while a transform was active: logging δ or a norm of a model that the
    transform does not touch, inside a torch.func training step, broke (the review)."""
    torch.manual_seed(0)
    rnn, x = RNN(3, 8), torch.randn(2, 6, 3)
    expected = float(_MEASURES[measure](rnn, x).reshape(-1)[-1])
    seen = []

    def step(w):
        seen.append(float(_MEASURES[measure](rnn, x).reshape(-1)[-1]))
        return (w * w).sum()

    grad(step)(torch.ones(3))
    assert seen == [expected]
    with pytest.raises(RuntimeError, match="cannot take x from inside"):
        vmap(lambda xs: log_jacobian_norms(rnn, xs))(x[None])


def test_the_documented_route_for_many_weights_matches_a_loop():
    """What the error points to: batched W in trajectory_derivatives, then log_norms_of_products."""
    from theorylab.rnn import JacobianFactors

    torch.manual_seed(1)
    rnn = RNN(3, 5, dtype=F64)
    Ws = torch.randn(4, 5, 5, dtype=F64) * 0.6
    x = torch.randn(1, 7, 3, dtype=F64).expand(4, 7, 3)
    d, log_scale = trajectory_derivatives(Ws, rnn.U.detach(), rnn.b.detach(), "tanh", x, None, "h", scaled=True)
    batched = log_norms_of_products(JacobianFactors(Ws, d, True, log_scale))
    for i, W in enumerate(Ws):
        with torch.no_grad():
            rnn.W.copy_(W)
        torch.testing.assert_close(batched[i], log_jacobian_norms(rnn, x[:1])[0], rtol=1e-9, atol=1e-9)


def test_a_parametrized_weight_from_a_transform_is_refused_not_read_as_a_number():
    """With the transforms switched off for the whole diagnostic, an orthogonal W whose original came from grad
    was computed there as a plain tensor: log_jacobian_norms returned its value and grad a derivative of 0, where
    a plain W was refused (the second review)."""
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(0)
    rnn, x = RNN(3, 8), torch.randn(2, 6, 3)
    orthogonal(rnn, "W")
    model = _Diagnose(rnn, log_jacobian_norms)
    original = rnn.parametrizations.W.original.detach()

    def f(w):
        return functional_call(model, {"rnn.parametrizations.W.original": w}, (x,), strict=False)[:, -1].sum()

    for run, arg in ((grad(f), original), (vmap(f), original.expand(2, 8, 8))):
        with pytest.raises(RuntimeError, match="cannot take parametrizations.W.original from inside a torch.func"):
            run(arg)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap"])
def test_an_untouched_parametrized_model_is_measured_inside_a_transform(transform):
    """grad wraps every op's result at its level, so a parametrized W computed for the check looked wrapped: an
    untouched spectral_norm'd model was refused inside grad (the third review). The check reads the tensors the
    model holds instead."""
    from torch.func import jacrev
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    rnn, x = RNN(3, 8), torch.randn(2, 6, 3)
    spectral_norm(rnn, "W")
    expected = log_jacobian_norms(rnn, x)
    seen = []

    def step(w):
        seen.append(log_jacobian_norms(rnn, x))
        return (w * w).sum()

    {"grad": grad, "jacrev": jacrev, "vmap": vmap}[transform](step)(torch.ones(2))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_a_bad_call_inside_a_transform_is_named_as_outside():
    """The check's helpers were called first and named themselves ("rnn_inputs() missing 1 required positional
    argument"; the third review)."""
    rnn = RNN(3, 8)
    for call, name in ((lambda: log_jacobian_norms(rnn), "log_jacobian_norms"),
                       (lambda: certificate(rnn, 5), "certificate")):
        with pytest.raises(TypeError, match=rf"^{name}\(\)"):
            grad(lambda w, call=call: call() or (w * w).sum())(torch.ones(2))


def test_factors_from_a_transform_are_refused_not_read_as_numbers():
    """log_norms_of_products and lyapunov_from_factors under grad gave derivatives of 0 (the second review)."""
    from torch.func import jacrev

    from theorylab.rnn import JacobianFactors, lyapunov_from_factors

    torch.manual_seed(0)
    A, d = torch.randn(4, 4, dtype=F64), torch.rand(2, 5, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="cannot take factors.A from inside"):
        grad(lambda a: log_norms_of_products(JacobianFactors(a, d, True))[:, -1].sum())(A)
    with pytest.raises(RuntimeError, match="cannot take factors.d from inside"):
        jacrev(lambda dd: lyapunov_from_factors(JacobianFactors(A, dd, True), 1))(d)
    expected = log_norms_of_products(JacobianFactors(A, d, True))
    seen = []
    grad(lambda w: seen.append(log_norms_of_products(JacobianFactors(A, d, True))) or (w * w).sum())(torch.ones(2))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)  # plain factors inside a transform: measured
