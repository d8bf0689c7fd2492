"""theorylab.rnn: activations and γ, the RNN module in both forms (fast path vs reference), bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from theorylab.rnn import ACTIVATIONS, RNN, derivative_bound, get_activation

F64 = torch.float64
ACTS = list(ACTIVATIONS)


def test_derivative_bound_closed_forms():
    root2 = math.sqrt(2.0)
    assert derivative_bound("tanh") == pytest.approx(1.0, abs=1e-15)
    assert derivative_bound("sigmoid") == pytest.approx(0.25, abs=1e-15)
    assert derivative_bound("relu") == 1.0
    assert derivative_bound("gelu") == pytest.approx(norm.cdf(root2) + root2 * norm.pdf(root2), rel=1e-14)
    assert derivative_bound("gelu") == pytest.approx(1.1289, abs=1e-4)
    assert derivative_bound("silu") == pytest.approx(1.0998, abs=1e-4)


@pytest.mark.parametrize("act", ACTS)
def test_derivative_bound_is_the_sup_on_a_fine_grid(act):
    x = torch.linspace(-30, 30, 600_001, dtype=F64)
    grid_sup = get_activation(act).deriv(x).abs().max().item()
    assert grid_sup <= derivative_bound(act) * (1 + 1e-12)
    assert grid_sup >= derivative_bound(act) * (1 - 1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_derivative_matches_autograd(act):
    x = torch.cat([torch.linspace(-12, 12, 2001, dtype=F64), torch.tensor([0.3, -0.7], dtype=F64)])
    x = x[x != 0]  # relu' is a convention at 0
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(get_activation(act).fn(x).sum(), x)
    torch.testing.assert_close(get_activation(act).deriv(x.detach()), grad, rtol=1e-10, atol=1e-14)


def test_tanh_and_sigmoid_derivatives_keep_relative_precision_in_saturation():
    x = torch.tensor([20.0, 40.0, -40.0], dtype=F64)
    exact_tanh = 4.0 / (torch.exp(x) + torch.exp(-x)) ** 2
    torch.testing.assert_close(get_activation("tanh").deriv(x), exact_tanh, rtol=1e-13, atol=0)
    exact_sig = torch.exp(-x.abs()) / (1 + torch.exp(-x.abs())) ** 2
    torch.testing.assert_close(get_activation("sigmoid").deriv(x), exact_sig, rtol=1e-13, atol=0)
    assert (get_activation("tanh").deriv(x) > 0).all()  # 1 − tanh² would give exactly 0 here


def naive_forward(rnn: RNN, x, h0):
    """h_t = W σ(h_{t-1}) + U x_t + b  /  g_t = σ(W g_{t-1} + U x_t + b), one matrix-vector product at a time."""
    sigma = get_activation(rnn.activation).fn
    s = torch.zeros(x.shape[0], rnn.hidden_size, dtype=x.dtype) if h0 is None else h0
    out = []
    for t in range(x.shape[1]):
        pre = x[:, t] @ rnn.U.T + rnn.b
        s = sigma(s) @ rnn.W.T + pre if rnn.form == "h" else sigma(s @ rnn.W.T + pre)
        out.append(s)
    return torch.stack(out, 1)


@pytest.mark.parametrize("form", ["h", "g"])
@pytest.mark.parametrize("act", ACTS)
def test_forward_and_gradients_match_naive_reference(act, form):
    torch.manual_seed(0)
    rnn = RNN(3, 5, activation=act, form=form).double()
    x = torch.randn(2, 9, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=F64, requires_grad=True)
    w = torch.randn(2, 9, 5, dtype=F64)
    states, last = rnn(x, h0)
    ref = naive_forward(rnn, x, h0)
    torch.testing.assert_close(states, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, states[:, -1], rtol=0, atol=0)  # the reference's op order rounds differently
    params = [x, h0, rnn.W, rnn.U, rnn.b]
    fast = torch.autograd.grad((states * w).sum() + last.square().sum(), params)
    slow = torch.autograd.grad((ref * w).sum() + ref[:, -1].square().sum(), params)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the module's own autograd-loop reference
    ref2, _ = rnn.forward_reference(x, h0)
    torch.testing.assert_close(states, ref2, rtol=1e-12, atol=1e-12)


def test_gradcheck_fused_recurrence():
    torch.manual_seed(1)
    for form in ("h", "g"):
        rnn = RNN(2, 4, activation="tanh", form=form).double()
        x = torch.randn(2, 5, 2, dtype=F64, requires_grad=True)
        h0 = torch.randn(2, 4, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, rnn=rnn: rnn(a, b)[0], (x, h0))


@settings(max_examples=25, deadline=None)
@given(act=st.sampled_from(ACTS), seed=st.integers(0, 2**16), steps=st.integers(1, 300))
def test_g_form_from_sigma_h0_equals_sigma_of_h_form(act, seed, steps):
    """Claim 1.1: g_0 = σ(h_0) ⇒ g_t = σ(h_t), with a contracting W (σ_max γ = 0.9)."""
    gen = torch.Generator().manual_seed(seed)
    h_rnn = RNN(2, 6, activation=act, form="h").double()
    with torch.no_grad():
        w = torch.randn(6, 6, generator=gen, dtype=F64)
        h_rnn.W.copy_(w * 0.9 / derivative_bound(act) / torch.linalg.matrix_norm(w, 2))
    g_rnn = RNN(2, 6, activation=act, form="g").double()
    g_rnn.load_state_dict(h_rnn.state_dict())  # same parameters for both forms
    x = torch.randn(3, steps, 2, generator=gen, dtype=F64)
    h0 = torch.randn(3, 6, generator=gen, dtype=F64)
    with torch.no_grad():
        h, _ = h_rnn(x, h0)
        g, _ = g_rnn(x, h_rnn.sigma(h0))
        g_naive = naive_forward(g_rnn, x, h_rnn.sigma(h0))
    assert (g - h_rnn.sigma(h)).abs().max() < 1e-12
    assert (g_naive - h_rnn.sigma(h)).abs().max() < 1e-12


def test_forms_differ_without_the_sigma_on_h0():
    """g_0 = h_0 (forgetting σ) breaks the equivalence: the test above can fail."""
    torch.manual_seed(0)
    h_rnn = RNN(2, 4, form="h").double()
    g_rnn = RNN(2, 4, form="g").double()
    g_rnn.load_state_dict(h_rnn.state_dict())
    x, h0 = torch.randn(1, 3, 2, dtype=F64), 2 * torch.randn(1, 4, dtype=F64)
    with torch.no_grad():
        assert (g_rnn(x, h0)[0] - h_rnn.sigma(h_rnn(x, h0)[0])).abs().max() > 1e-3


def test_h0_none_means_zeros_and_state_dict_names():
    rnn = RNN(3, 4).double()
    x = torch.randn(2, 5, 3, dtype=F64)
    torch.testing.assert_close(rnn(x)[0], rnn(x, torch.zeros(2, 4, dtype=F64))[0], rtol=0, atol=0)
    assert set(rnn.state_dict()) == {"W", "U", "b"}
    assert rnn.W.shape == (4, 4) and rnn.U.shape == (4, 3) and rnn.b.shape == (4,)
    states, last = rnn(torch.zeros(2, 0, 3, dtype=F64))
    assert states.shape == (2, 0, 4) and torch.equal(last, torch.zeros(2, 4, dtype=F64))


def test_float32_forward_runs():
    rnn = RNN(3, 4)
    states, last = rnn(torch.randn(2, 5, 3))
    assert states.dtype == torch.float32 and torch.isfinite(states).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 0}, "hidden_size"), ({"hidden_size": -3}, "hidden_size"),
    ({"hidden_size": 4, "activation": "swish"}, "swish"), ({"hidden_size": 4, "form": "z"}, "'z'"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RNN(3, **kwargs)


def test_bad_inputs_name_the_shape():
    rnn = RNN(3, 4)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        rnn(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(2, 5, 2\)"):
        rnn(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        rnn(torch.randn(2, 5, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="activation"):
        derivative_bound("softplus")


def test_device_and_dtype_keywords_as_torch_nn_rnn_takes_them():
    rnn = RNN(2, 3, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in rnn.parameters())
    assert RNN(2, 3, dtype=torch.float64).W.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype.*'float32'"):
        RNN(2, 3, dtype="float32")


def test_an_input_on_another_device_is_named():
    """x on the CPU and the parameters on meta gave torch's "Tensor on device cpu is not on the expected device
    meta!", which names neither."""
    rnn = RNN(2, 3, device="meta")
    with pytest.raises(ValueError, match="x is on cpu but the RNN's parameters are on meta"):
        rnn(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="h0 is on cpu but the RNN's parameters are on meta"):
        rnn(torch.zeros(1, 4, 2, device="meta"), torch.zeros(1, 3))
