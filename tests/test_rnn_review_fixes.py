"""Regression tests for the RNN review findings: second derivatives through RNN.forward, the Lyapunov starting
directions and ordering, non-finite parameters, Certificate at T = 0, argument types, and non-real input dtypes."""

import math
import re

import numpy as np
import pytest
import torch

from theorylab.rnn import (
    RNN,
    Certificate,
    certificate,
    derivative_bound,
    get_activation,
    log_jacobian_norms,
    lyapunov_from_factors,
    lyapunov_spectrum,
)
from theorylab.rnn.jacobian import jacobian_factors

F64 = torch.float64


def fixed_rnn(W: torch.Tensor, act: str = "tanh") -> RNN:
    """A one-input RNN with the given W and U = 0, b = 0 (so x = 0, h0 = 0 stays at the origin)."""
    rnn = RNN(1, W.shape[0], activation=act).double()
    with torch.no_grad():
        rnn.W.copy_(W)
        rnn.U.zero_()
        rnn.b.zero_()
    return rnn


def seeded_rnn(form: str = "h", hidden: int = 3, inputs: int = 2, seed: int = 0) -> RNN:
    torch.manual_seed(seed)
    return RNN(inputs, hidden, form=form).double()


def input_gradient_penalty(forward, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """P = ‖∂(Σ s)/∂x‖²: the reviewer's case, whose incoming gradient (ones) does not require grad."""
    states, _ = forward(x, h0)
    (gx,) = torch.autograd.grad(states.sum(), x, create_graph=True)
    return (gx**2).sum()


# -- 1. second derivatives through RNN.forward ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["h", "g"])
def test_input_gradient_penalty_through_forward_raises_naming_forward_reference(form):
    """Old code: backward() succeeded with dP/dW = None and a wrong dP/dU (13.74 vs 13.42)."""
    rnn = seeded_rnn(form)
    x = torch.randn(1, 4, 2, dtype=F64, requires_grad=True)
    penalty = input_gradient_penalty(rnn, x)  # building the graph is allowed: the error comes when it is used
    with pytest.raises(RuntimeError, match="forward_reference"):
        penalty.backward()


@pytest.mark.parametrize("target", ["x", "h0", "W", "U", "b"])
def test_every_second_derivative_target_raises(target):
    """Whatever is differentiated (inputs or parameters), the hand-written sweep is on the path and raises."""
    rnn = seeded_rnn()
    x = torch.randn(2, 5, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    penalty = input_gradient_penalty(rnn, x, h0)
    wrt = {"x": x, "h0": h0, "W": rnn.W, "U": rnn.U, "b": rnn.b}[target]
    with pytest.raises(RuntimeError, match="differentiate twice.*forward_reference"):
        torch.autograd.grad(penalty, wrt)


@pytest.mark.parametrize("form", ["h", "g"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_first_order_gradients_match_the_reference(form, create_graph):
    rnn = seeded_rnn(form)
    x = torch.randn(2, 6, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    weights = torch.randn(2, 6, 3, dtype=F64)
    wrt = [x, h0, rnn.W, rnn.U, rnn.b]
    fast = torch.autograd.grad((rnn(x, h0)[0] * weights).sum(), wrt, create_graph=create_graph)
    ref = torch.autograd.grad((rnn.forward_reference(x, h0)[0] * weights).sum(), wrt, create_graph=create_graph)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_forward_reference_gives_the_penalty_gradient():
    """The remedy the error names: dP/dW from forward_reference matches a central finite difference."""
    rnn = seeded_rnn()
    x = torch.randn(1, 4, 2, dtype=F64, requires_grad=True)
    input_gradient_penalty(rnn.forward_reference, x).backward()
    assert rnn.W.grad is not None and rnn.U.grad is not None
    direction = torch.randn(3, 3, dtype=F64)
    eps = 1e-6
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            rnn.W.add_(sign * eps * direction)
        values.append(input_gradient_penalty(rnn.forward_reference, x).item())
        with torch.no_grad():
            rnn.W.sub_(sign * eps * direction)
    finite_difference = (values[0] - values[1]) / (2 * eps)
    assert (rnn.W.grad * direction).sum().item() == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)


# -- 2. Lyapunov: shared starting directions, sorted rows, seed -------------------------------------------------


def test_identical_rows_give_identical_exponents():
    """Old code drew a different Q per row: four copies of one sequence gave four different spectra."""
    gen = torch.Generator().manual_seed(1)
    rnn = RNN(1, 5).double()
    x = torch.randn(1, 7, 1, generator=gen, dtype=F64).expand(4, 7, 1).contiguous()
    lam = lyapunov_spectrum(rnn, x, None, 3)
    for row in lam[1:]:
        torch.testing.assert_close(row, lam[0], rtol=0, atol=1e-12)


def test_top_exponent_does_not_depend_on_k():
    """Nested starting directions: λ₁ is the first direction's estimate for every k (old code: a fresh draw per k).

    At T = 3 the estimates already come out ordered here (1.126, 0.398, 0.132, −0.738), so sorting is a no-op.
    """
    gen = torch.Generator().manual_seed(5)
    rnn = fixed_rnn(1.5 * torch.randn(4, 4, generator=gen, dtype=F64))
    x = torch.randn(2, 3, 1, generator=gen, dtype=F64)
    top = [lyapunov_spectrum(rnn, x, None, k)[:, 0] for k in (1, 2, 4)]
    torch.testing.assert_close(top[1], top[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(top[2], top[0], rtol=0, atol=1e-12)


def test_rows_are_sorted_in_descending_order():
    gen = torch.Generator().manual_seed(6)
    for act in ("tanh", "relu", "gelu"):
        rnn = RNN(2, 6, activation=act).double()
        with torch.no_grad():
            rnn.W.mul_(4.0)
        for steps in (1, 2, 5):
            lam = lyapunov_spectrum(rnn, torch.randn(8, steps, 2, generator=gen, dtype=F64), None, 6)
            assert (lam[:, :-1] >= lam[:, 1:]).all(), (act, steps, lam)


def test_diagonal_w_single_step():
    """W = diag(1, ½), x = 0, h0 = 0, T = 1: J_1 = W, singular values 1 and ½.

    The QR estimates at T = 1 are log‖W q₁‖ and log|det W| − log‖W q₁‖ for the starting direction q₁, not
    log σᵢ = (0, −log 2). Before the fix each row drew its own q and some rows came out unsorted (λ₂ > λ₁). Now
    every row gives the same sorted pair, with seed 0: (−0.0528, −0.6404); its sum is log|det W| = log ½ for any
    directions, and both lie in [log ½, 0]. k = 1 computes only the first direction's estimate, −0.6404, which the
    sort places second: at such a short T, λ₁ can depend on k (see the module docstring).
    """
    rnn = fixed_rnn(torch.diag(torch.tensor([1.0, 0.5], dtype=F64)))
    x = torch.zeros(4, 1, 1, dtype=F64)
    lam = lyapunov_spectrum(rnn, x, None, 2)
    assert (lam[:, 0] >= lam[:, 1]).all()
    for row in lam[1:]:
        torch.testing.assert_close(row, lam[0], rtol=0, atol=1e-12)
    assert lam.sum(-1).tolist() == pytest.approx([math.log(0.5)] * 4, abs=1e-12)
    assert ((lam >= math.log(0.5) - 1e-12) & (lam <= 1e-12)).all()
    assert lam[0].tolist() == pytest.approx([-0.0528, -0.6404], abs=1e-4)
    assert lyapunov_spectrum(rnn, x, None, 1)[:, 0].tolist() == pytest.approx([-0.6404] * 4, abs=1e-4)


def test_diagonal_w_long_horizon_converges_to_log_singular_values():
    rnn = fixed_rnn(torch.diag(torch.tensor([1.0, 0.5], dtype=F64)))
    lam = lyapunov_spectrum(rnn, torch.zeros(2, 400, 1, dtype=F64), None, 2)
    torch.testing.assert_close(lam, torch.tensor([[0.0, math.log(0.5)]] * 2, dtype=F64), rtol=0, atol=5e-3)


def test_seed_is_passed_through():
    """At T = 1 the estimates depend on the starting directions, so a different seed shows up in the result."""
    rnn = fixed_rnn(torch.diag(torch.tensor([1.0, 0.5], dtype=F64)))
    x = torch.zeros(1, 1, 1, dtype=F64)
    factors = jacobian_factors(rnn, x, None)
    for seed in (0, 1, np.int64(2)):
        torch.testing.assert_close(lyapunov_spectrum(rnn, x, None, 2, seed=seed),
                                   lyapunov_from_factors(factors, 2, seed=seed), rtol=0, atol=0)
    assert not torch.allclose(lyapunov_spectrum(rnn, x, None, 2, seed=0), lyapunov_spectrum(rnn, x, None, 2, seed=1))


@pytest.mark.parametrize("seed", [-1, True, 1.5, "0"])
def test_bad_seed_is_named(seed):
    rnn = RNN(1, 2).double()
    with pytest.raises(ValueError, match=f"seed must be .*got {re.escape(repr(seed))}"):
        lyapunov_spectrum(rnn, torch.zeros(1, 3, 1, dtype=F64), None, 1, seed=seed)


# -- 3. non-finite parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["W", "U", "b"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_parameter_is_named_by_check_and_lyapunov(name, bad):
    """Old code: lyapunov_spectrum returned nan/inf exponents silently."""
    rnn = RNN(2, 3).double()
    with torch.no_grad():
        getattr(rnn, name).view(-1)[0] = bad
    message = f"parameter {name} is not finite \\(contains NaN or inf\\)"
    with pytest.raises(ValueError, match=message):
        rnn.check_finite_parameters()
    with pytest.raises(ValueError, match=message):
        lyapunov_spectrum(rnn, torch.randn(1, 1, 2, dtype=F64), None, 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_certificate_names_a_non_finite_w(bad):
    """Old code: NaN raised torch's LinAlgError from the SVD, inf returned sigma_max = nan."""
    rnn = RNN(2, 3).double()
    with torch.no_grad():
        rnn.W[1, 2] = bad
    with pytest.raises(ValueError, match="parameter W is not finite"):
        certificate(rnn)


def test_certificate_reads_w_alone():
    """δ = σ_max(W)·γ does not involve U or b, so a NaN bias does not stop the certificate."""
    rnn = RNN(2, 3).double()
    clean = certificate(rnn)
    with torch.no_grad():
        rnn.b[0] = math.nan
    assert certificate(rnn) == clean
    rnn.check_finite_parameters("W", "U")
    with pytest.raises(ValueError, match="parameter b is not finite"):
        rnn.check_finite_parameters("b")


def test_check_finite_parameters_names_an_unknown_parameter_and_skips_meta():
    with pytest.raises(ValueError, match="'V'"):
        RNN(2, 3).check_finite_parameters("V")
    RNN(2, 3).to("meta").check_finite_parameters()  # no values to inspect: nothing to report


# -- 4. Certificate.log_bound / bound at T = 0 and bad step counts ----------------------------------------------


def test_log_bound_at_zero_steps_is_zero_even_for_delta_zero():
    """δ⁰ = 1 for every δ, so log_bound(0) = 0 (old code: −inf when δ = 0, while bound(0) = 1)."""
    zero = certificate(fixed_rnn(torch.zeros(3, 3, dtype=F64)))
    assert zero.delta == 0.0
    assert zero.log_bound(0) == 0.0 and zero.bound(0) == 1.0
    assert zero.log_bound(5) == -math.inf and zero.bound(5) == 0.0
    other = certificate(fixed_rnn(2 * torch.eye(3, dtype=F64)))
    assert other.log_bound(0) == 0.0 and other.bound(0) == 1.0
    assert math.exp(other.log_bound(3)) == pytest.approx(other.bound(3))


@pytest.mark.parametrize("steps", [-1, -0.5, math.nan, -math.inf, True, "3", None])
@pytest.mark.parametrize("method", ["log_bound", "bound"])
def test_bad_step_counts_are_named(steps, method):
    """Old code: log_bound(-1) = +0.14 (a bound that grows backwards), log_bound(nan) = nan."""
    cert = certificate(RNN(1, 3).double())
    with pytest.raises(ValueError, match=f"steps must be .*got {re.escape(repr(steps))}"):
        getattr(cert, method)(steps)


@pytest.mark.parametrize("delta, log_limit, limit", [(0.5, -math.inf, 0.0), (1.0, 0.0, 1.0), (2.0, math.inf, math.inf)])
def test_infinite_horizon_is_the_limit(delta, log_limit, limit):
    cert = Certificate(sigma_max=delta, gamma=1.0, delta=delta, vanishing_guaranteed=delta < 1)
    assert cert.log_bound(math.inf) == log_limit and cert.bound(math.inf) == limit
    assert cert.log_bound(np.int64(4)) == pytest.approx(4 * math.log(delta))


# -- 5. argument types -------------------------------------------------------------------------------------------


def test_k_accepts_any_integer_but_bool():
    """Old code: k=True gave "TypeError: an integer is required", k=np.int64(2) a ValueError."""
    rnn = RNN(1, 4).double()
    x = torch.randn(2, 6, 1, dtype=F64)
    torch.testing.assert_close(lyapunov_spectrum(rnn, x, None, np.int64(2)), lyapunov_spectrum(rnn, x, None, 2))
    torch.testing.assert_close(lyapunov_spectrum(rnn, x, None, 2, reorthonormalize_every=np.int32(2)),
                               lyapunov_spectrum(rnn, x, None, 2, reorthonormalize_every=2))
    factors = jacobian_factors(rnn, x, None)
    torch.testing.assert_close(lyapunov_from_factors(factors, np.int64(3)), lyapunov_from_factors(factors, 3))
    for k in (True, False, 2.0, torch.tensor(2)):
        with pytest.raises(ValueError, match=f"k must be .*got {re.escape(repr(k))}"):
            lyapunov_spectrum(rnn, x, None, k)
        with pytest.raises(ValueError, match=f"k must be .*got {re.escape(repr(k))}"):
            lyapunov_from_factors(factors, k)
    with pytest.raises(ValueError, match="reorthonormalize_every must be .*got True"):
        lyapunov_spectrum(rnn, x, None, 2, reorthonormalize_every=True)


@pytest.mark.parametrize("name", [["tanh"], {"tanh": 1}, None, 3])
def test_activation_name_of_the_wrong_type_is_named(name):
    """Old code: derivative_bound(["tanh"]) raised "TypeError: unhashable type: 'list'" from its cache."""
    for fn in (derivative_bound, get_activation):
        with pytest.raises(ValueError, match=re.escape(f"unknown activation {name!r}")):
            fn(name)
    assert derivative_bound("tanh") == 1.0  # the cache still serves valid names


def test_lyapunov_names_a_wrong_rnn_type():
    with pytest.raises(ValueError, match=r"theorylab.rnn.RNN \(or torch.compile of one\), got RNN"):
        lyapunov_spectrum(torch.nn.RNN(2, 2), torch.randn(1, 2, 2), None, 1)


def test_non_finite_factors_are_named():
    rnn = RNN(1, 3).double()
    factors = jacobian_factors(rnn, torch.randn(1, 4, 1, dtype=F64), None)
    factors.A = factors.A.clone()
    factors.A[0, 0] = math.nan
    with pytest.raises(ValueError, match="factors.A is not finite"):
        lyapunov_from_factors(factors, 2)


# -- 6. non-real input dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.int64, torch.int32, torch.bool])
def test_non_real_floating_x_is_a_type_error_naming_the_dtype(dtype):
    """Old code: complex x ran a complex recurrence (the diagnostics dropped the imaginary part with a warning),
    integer and bool x were cast silently."""
    rnn = RNN(3, 4)
    x = torch.ones(2, 5, 3, dtype=dtype)
    calls = (lambda: rnn(x), lambda: rnn.forward_reference(x), lambda: log_jacobian_norms(rnn, x),
             lambda: lyapunov_spectrum(rnn, x, None, 2))
    for call in calls:
        with pytest.raises(TypeError, match=f"x must be real floating point.*{dtype}"):
            call()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_non_real_floating_h0_is_a_type_error_naming_the_dtype(dtype):
    rnn = RNN(3, 4)
    with pytest.raises(TypeError, match=f"h0 must be real floating point.*{dtype}"):
        rnn(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=dtype))


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_complex_parameters_are_a_type_error_naming_the_parameter():
    rnn = RNN(3, 4).to(torch.complex64)
    with pytest.raises(TypeError, match="parameter W must be real floating point.*complex64"):
        rnn(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="parameter W must be real floating point"):
        certificate(rnn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_real_floating_dtypes_still_run(dtype):
    rnn = RNN(3, 4).to(dtype)
    states, last = rnn(torch.randn(2, 5, 3, dtype=dtype))
    assert states.dtype == dtype and last.shape == (2, 4)


@pytest.mark.parametrize("form", ["h", "g"])
def test_chaotic_unit_matches_autograd_through_the_models_own_forward(form):
    """λ₁ > 0 (W = 3Q): the diagnostics recomputed the trajectory with other float ops than RNN.forward, one ulp
    apart at t = 1 and amplified by e^{λ₁t}: 1.2e-5 relative off autograd at t = 100, 8e-3 at t = 150."""
    torch.manual_seed(0)
    H, T = 16, 150
    rnn = RNN(2, H, form=form).double()
    with torch.no_grad():
        rnn.W.copy_(3 * torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))[0])
    x, h0 = torch.randn(1, T, 2, dtype=torch.float64), torch.randn(1, H, dtype=torch.float64)
    ours = log_jacobian_norms(rnn, x, h0)[0]
    for t in (100, 150):
        jac = torch.autograd.functional.jacobian(lambda s, t=t: rnn(x[:, :t], s)[1], h0)[0, :, 0, :]
        ref = torch.log(torch.linalg.matrix_norm(jac, ord=2))
        assert float(((ours[t - 1] - ref) / ref).abs()) <= 1e-8


# ---------------------------------------------------------------------------------------------------------------
# the ninth session's review: products that shrink by more than float64's range in one step, Benettin's carry
# between QRs, Certificate.bound at large T, and the arguments of the public helpers


def _relu_rnn(W: torch.Tensor) -> RNN:
    """relu, U = 0, b = 1: from h0 = 1 every state stays positive, so every J_t = W."""
    rnn = RNN(1, W.shape[0], activation="relu").double()
    with torch.no_grad():
        rnn.W.copy_(W)
        rnn.U.zero_()
        rnn.b.fill_(1.0)
    return rnn


@pytest.mark.parametrize("method", ["svd", "iterative"])
def test_a_product_that_shrinks_by_1e200_in_one_step_keeps_its_norm(method):
    """W = [[0, 1], [1e-200, 0]]: W² = 1e-200·I, W³ = 1e-200·W, W⁴ = 1e-400·I. θ = ‖M‖² had underflowed to 0
    and the norms read −inf from t = 2."""
    from theorylab.rnn import log_norms_of_products

    rnn = _relu_rnn(torch.tensor([[0.0, 1.0], [1e-200, 0.0]], dtype=F64))
    x, h0 = torch.zeros(1, 4, 1, dtype=F64), torch.ones(1, 2, dtype=F64)
    got = log_norms_of_products(jacobian_factors(rnn, x, h0), method=method)
    tiny = math.log(1e-200)
    torch.testing.assert_close(got, torch.tensor([[0.0, tiny, tiny, 2 * tiny]], dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [182.0, 186.5, 200.0, 350.0])
def test_one_saturated_step_is_measured_to_full_precision(a):
    """tanh, W = diag(1, 0), h0 = (a, 0), T = 1: ‖∂h_1/∂h_0‖ = sech²(a). Relative error had been 5.5e-2 at
    a = 186.5 and −inf at a = 200."""
    from theorylab.rnn import log_jacobian_profile

    rnn = fixed_rnn(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
    x, h0 = torch.zeros(1, 1, 1, dtype=F64), torch.tensor([[a, 0.0]], dtype=F64)
    exact = math.log(4.0) - 2 * a - 2 * math.log1p(math.exp(-2 * a))
    for got in (log_jacobian_norms(rnn, x, h0), log_jacobian_profile(rnn, x, h0)):
        assert abs(float(got[0, 0]) - exact) <= 1e-12 * abs(exact)


def test_lyapunov_with_sparse_qr_neither_underflows_nor_overflows():
    """Between QRs Q had been carried unscaled: a contracting unit underflowed to −inf, a growing one to NaN."""
    contracting = _relu_rnn(1e-10 * torch.eye(2, dtype=F64))
    x, h0 = torch.zeros(1, 100, 1, dtype=F64), torch.ones(1, 2, dtype=F64)
    for every in (1, 40, 100):
        got = lyapunov_spectrum(contracting, x, h0, 2, reorthonormalize_every=every)
        torch.testing.assert_close(got, torch.full((1, 2), math.log(1e-10), dtype=F64), rtol=1e-12, atol=1e-12)
    rotating = fixed_rnn(1e3 * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64))  # stays at the origin: J = W
    x = torch.zeros(1, 300, 1, dtype=F64)
    for every in (1, 300):
        got = lyapunov_spectrum(rotating, x, None, 2, reorthonormalize_every=every)
        torch.testing.assert_close(got, torch.full((1, 2), math.log(1e3), dtype=F64), rtol=1e-12, atol=1e-12)


def test_certificate_bound_overflows_to_inf_as_documented():
    cert = Certificate(1.5, 1.0, 1.5, False)
    assert cert.bound(2000) == math.inf and cert.log_bound(2000) == pytest.approx(2000 * math.log(1.5))
    assert Certificate(0.5, 1.0, 0.5, True).bound(2000) == 0.0


@pytest.mark.parametrize("kwargs, name", [({"block": 0}, "block"), ({"block": -1}, "block"),
                                          ({"block": 2.0}, "block"), ({"max_dim": 0}, "max_dim"),
                                          ({"tol": float("nan")}, "tol"), ({"tol": -1e-3}, "tol"),
                                          ({"tol": 0.0}, "tol")])
def test_log_norms_of_products_refuses_bad_iteration_settings(kwargs, name):
    """block = 0 had looped forever (the search space never grew)."""
    from theorylab.rnn import log_norms_of_products

    rnn = RNN(1, 6)
    factors = jacobian_factors(rnn, torch.randn(1, 5, 1, generator=torch.Generator().manual_seed(0)), None)
    with pytest.raises(ValueError, match=name):
        log_norms_of_products(factors, method="iterative", **kwargs)


def test_non_finite_factors_and_scales_are_named_by_every_consumer():
    from theorylab.rnn import JacobianFactors, log_norms_of_products

    A, d = torch.eye(2, dtype=F64), torch.ones(1, 3, 2, dtype=F64)
    bad_A = A.clone()
    bad_A[0, 1] = math.nan
    with pytest.raises(ValueError, match="factors.A is not finite"):
        log_norms_of_products(JacobianFactors(bad_A, d, True))
    scale = torch.zeros(1, 3, dtype=F64)
    scale[0, 1] = math.nan
    for fn in (log_norms_of_products, lambda f: lyapunov_from_factors(f, 1)):
        with pytest.raises(ValueError, match="d_log_scale"):
            fn(JacobianFactors(A, d, True, scale))
    scale[0, 1] = -math.inf  # an exactly zero step is allowed
    assert float(log_norms_of_products(JacobianFactors(A, d, True, scale))[0, -1]) == -math.inf


def test_trajectory_derivatives_refuses_an_unknown_form():
    from theorylab.rnn.jacobian import trajectory_derivatives

    W, U, b = torch.eye(2, dtype=F64), torch.zeros(2, 1, dtype=F64), torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="form must be one of 'h', 'g', got 'H'"):
        trajectory_derivatives(W, U, b, "tanh", torch.zeros(1, 3, 1, dtype=F64), None, "H")


@pytest.mark.parametrize("clip", [-1.0, 0.0, float("nan"), float("inf"), True])
def test_train_refuses_a_clip_that_is_not_a_positive_number(clip):
    """clip_grad_norm_ takes a negative max_norm and flips every gradient (the adding task's loss went to 41)."""
    from theorylab.rnn.tasks import train

    with pytest.raises(ValueError, match="clip must be None or a finite number > 0"):
        train("adding", 5, clip=clip, iterations=1)


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_numpy_blas_threads_follow_torch_for_large_products(monkeypatch, torch_threads):
    """On a busy machine torch.set_num_threads(1) is the documented cure; the norms' numpy BLAS must follow it
    (on two shared cores, two BLAS threads made H = 256 2× slower than one)."""
    import contextlib

    from theorylab.rnn import jacobian

    limits = []

    @contextlib.contextmanager
    def recording(limit):
        limits.append(limit)
        yield

    monkeypatch.setattr(jacobian, "numpy_blas_threads", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        rnn = RNN(2, 128)  # B·H³ = 2²¹: a "large" product per step
        log_jacobian_norms(rnn, torch.randn(1, 3, 2), None)
        small = RNN(2, 8)
        log_jacobian_norms(small, torch.randn(1, 3, 2), None)
    finally:
        torch.set_num_threads(before)
    assert limits[0] == torch_threads  # the large product's loop
    assert limits[-1] == 1  # small products: always one thread


def test_numpy_blas_threads_never_exceed_a_callers_limit():
    """threadpool_limits(1) set by the caller holds inside the norms' loops, whatever torch's thread count."""
    from threadpoolctl import threadpool_limits

    from theorylab.rnn._threads import _blas_libraries, numpy_blas_threads

    libs = _blas_libraries()
    if not libs:
        pytest.skip("numpy reports no BLAS library to threadpoolctl")
    with threadpool_limits(1, user_api="blas"), numpy_blas_threads(4):
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
