"""Tests written for the mutants a hand-made mutation pass over rnn/{lyapunov,activations,model}.py and
optim/{adam,decay,sgd,param_groups}.py left alive: each one fails on the mutant named in its docstring's comment
and passes on the code as it is."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from optim_helpers import single_thread  # noqa: F401 (an autouse fixture)
from torch import nn

from theorylab.optim import SGD, Adam, AdamW, decay_param_groups, decayed_names
from theorylab.optim.adam import _dense
from theorylab.optim.decay import check_decay_rate
from theorylab.rnn import RNN, certificate, lyapunov_spectrum
from theorylab.rnn.activations import ACTIVATIONS, _gelu_deriv_float, critical_points
from theorylab.rnn.lyapunov import _starting_directions

F64 = torch.float64


def _fixed_rnn(W: torch.Tensor, act: str = "tanh", form: str = "h") -> RNN:
    rnn = RNN(1, W.shape[0], activation=act, form=form).double()
    with torch.no_grad():
        rnn.W.copy_(W)
        rnn.U.zero_()
        rnn.b.zero_()
    return rnn


# --- rnn/lyapunov.py -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["h", "g"])
def test_lyapunov_k1_at_short_t_is_growth_of_the_starting_direction_under_the_true_product(form):
    """λ₁ (k = 1) at T = 3 is log‖(∂s_T/∂s_0) q₀‖ / T with the form's own Jacobian order (W D vs D W)."""
    # kills L5: the diag_right branches swapped (J = D W for the h-form, W D for the g-form)
    torch.manual_seed(0)
    rnn = RNN(2, 4, form=form).double()
    with torch.no_grad():
        rnn.W.mul_(4.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 2, generator=gen, dtype=F64)
    h0 = torch.randn(1, 4, generator=gen, dtype=F64)
    P = torch.autograd.functional.jacobian(lambda s: rnn.forward_reference(x, s[None])[1][0], h0[0])
    q0 = torch.from_numpy(_starting_directions(4, 1, 0))[:, 0]
    expected = torch.linalg.vector_norm(P @ q0).log() / 3
    lam = lyapunov_spectrum(rnn, x, h0, 1)[0, 0]
    assert lam.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_lyapunov_every_two_does_not_overflow_or_underflow(scale):
    """reorthonormalize_every=2 keeps Q at max-abs 1 between QRs: W = 1e±200·I gives exactly ±200·log 10."""
    # kills L7: the max-abs rescaling only for every > 2 (two unscaled steps overflow to NaN / underflow to -inf)
    rnn = _fixed_rnn(scale * torch.eye(2, dtype=F64))
    lam = lyapunov_spectrum(rnn, torch.zeros(1, 4, 1, dtype=F64), None, 2, reorthonormalize_every=2)
    torch.testing.assert_close(lam, torch.full((1, 2), math.log(scale), dtype=F64), rtol=1e-12, atol=0)


def test_lyapunov_nilpotent_w_gives_minus_inf_with_sparse_reorthonormalisation():
    """An exactly vanishing product gives −inf (not NaN or an error) also when QR runs only every 3 steps."""
    # kills L11: q_scale = q_max without the q_max > 0 guard (0/0 between QRs)
    gen = torch.Generator().manual_seed(3)
    rnn = _fixed_rnn(torch.triu(3 * torch.randn(6, 6, generator=gen, dtype=F64), 1))
    x, h0 = torch.zeros(1, 20, 1, dtype=F64), torch.randn(1, 6, generator=gen, dtype=F64)
    lam = lyapunov_spectrum(rnn, x, h0, 3, reorthonormalize_every=3)
    assert torch.isneginf(lam).all()


def test_certificate_delta_exactly_one_is_not_a_guarantee():
    """δ = 1 exactly (W = I, tanh) does not guarantee vanishing: the flag is δ < 1, strictly."""
    # kills L13: vanishing_guaranteed = delta <= 1
    cert = certificate(_fixed_rnn(torch.eye(3, dtype=F64)))
    assert cert.delta == 1.0
    assert cert.vanishing_guaranteed is False


# --- rnn/activations.py ----------------------------------------------------------------------------------------


def test_relu_derivative_is_zero_at_zero_like_torch_backward():
    """relu's σ'(0) is 0, and RNN.forward's gradient w.r.t. an h0 with exact zeros matches autograd's."""
    # kills A3: _relu_deriv as (h >= 0)
    assert ACTIVATIONS["relu"].deriv(torch.zeros(3, dtype=F64)).tolist() == [0.0, 0.0, 0.0]
    torch.manual_seed(0)
    rnn = RNN(2, 4, activation="relu").double()
    x = torch.randn(2, 3, 2, dtype=F64)
    h0 = torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]], dtype=F64)
    grads = []
    for fwd in (rnn.forward, rnn.forward_reference):
        h = h0.clone().requires_grad_()
        fwd(x, h)[0].sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_gelu_derivative_keeps_relative_precision_in_the_left_tail():
    """GELU's σ' at h = −10, −20, −30 matches Φ(h) + hφ(h) computed with erfc to ~1e-12 relative."""
    # kills A4: Φ(h) as 0.5 (1 + erf(h/√2)), which cancels to 0 for h ≲ −8
    h = torch.tensor([-10.0, -20.0, -30.0], dtype=F64)
    got = ACTIVATIONS["gelu"].deriv(h)
    expected = torch.tensor([_gelu_deriv_float(v) for v in h.tolist()], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_critical_points_lists_a_root_on_the_grid_once(name):
    """critical_points returns the root 0 of σ'' (a grid point) once, not twice."""
    # kills A9: the sign-change test v0 * v1 <= 0 (the grid interval ending at the root also reports it)
    assert critical_points(name) == [0.0]


# --- rnn/model.py ----------------------------------------------------------------------------------------------


def test_rnn_accepts_input_size_zero():
    """input_size = 0 (no input, an autonomous recurrence) is a valid non-negative int and runs."""
    # kills M2: input_size <= 0 rejected
    rnn = RNN(0, 3).double()
    states, last = rnn(torch.zeros(2, 4, 0, dtype=F64))
    assert states.shape == (2, 4, 3) and torch.isfinite(last).all()


def test_rnn_initialisation_bound_is_one_over_sqrt_h():
    """W, U, b are drawn uniform on [−1/√H, 1/√H]: with H = 64 the largest |W| is close to 1/8."""
    # kills M4: bound 1/H
    torch.manual_seed(0)
    rnn = RNN(3, 64)
    for p in (rnn.W, rnn.U, rnn.b):
        assert p.abs().max().item() <= 1 / 8
    assert rnn.W.abs().max().item() > 0.9 / 8


def test_rnn_forward_with_zero_steps_returns_h0_as_last():
    """With T = 0, forward returns s_0 = h0 (cast to the result dtype) as the last state."""
    # kills M8: zeros returned as the last state when T = 0
    rnn = RNN(2, 3).double()
    h0 = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
    states, last = rnn(torch.zeros(1, 0, 2, dtype=F64), h0)
    assert states.shape == (1, 0, 3)
    torch.testing.assert_close(last, h0, rtol=0, atol=0)


def test_rnn_forward_promotes_float32_input_to_float64_parameters():
    """A float32 x through a float64 RNN gives float64 states (promote_types), equal to the float64 run."""
    # kills M9: the result dtype taken from x alone
    torch.manual_seed(0)
    rnn = RNN(2, 3).double()
    x = torch.randn(2, 5, 2)
    states, last = rnn(x)
    assert states.dtype == F64 and last.dtype == F64
    torch.testing.assert_close(states, rnn(x.double())[0], rtol=0, atol=0)


@pytest.mark.parametrize("steps", [0, 3])
def test_rnn_forward_casts_h0_to_the_result_dtype(steps):
    """A float32 h0 with float64 x and parameters is cast to float64: same result as a float64 h0."""
    # kills M18: h0 used without .to(dtype) (T = 0 returns float32; T > 0 fails in addmm)
    torch.manual_seed(0)
    rnn = RNN(2, 3).double()
    x = torch.randn(2, steps, 2, dtype=F64)
    h0 = torch.randn(2, 3)
    states, last = rnn(x, h0)
    ref_states, ref_last = rnn(x, h0.double())
    assert last.dtype == F64
    torch.testing.assert_close(last, ref_last, rtol=0, atol=0)
    torch.testing.assert_close(states, ref_states, rtol=0, atol=0)


# --- optim/adam.py ---------------------------------------------------------------------------------------------


def test_dense_ignores_the_stride_of_size_one_dimensions():
    """_dense judges only the dimensions of size > 1: a transposed tensor with an odd size-1 stride is dense."""
    # kills D2: the `if sz != 1` filter dropped
    t = torch.empty_strided((4, 1, 3), (1, 100, 4))
    assert not t.is_contiguous()
    assert _dense(t)


def test_dense_accepts_a_permuted_three_dimensional_tensor():
    """_dense accumulates the product of the sizes: any permutation of a contiguous 3-d tensor is dense."""
    # kills D15: expected = size instead of expected *= size
    t = torch.empty(2, 3, 4).permute(2, 1, 0)
    assert _dense(t)
    assert not _dense(torch.empty(4, 6)[:, ::2])


def test_adam_betas_of_wrong_length_are_named():
    """A betas triple raises ValueError naming betas (not an unpacking error)."""
    # kills D16: len(betas) < 2 checked instead of != 2
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid betas"):
        Adam([p], betas=(0.9, 0.99, 0.999))


def test_fused_adam_state_keeps_a_transposed_parameters_layout():
    """The fused path creates exp_avg/exp_avg_sq with the parameter's strides (so the kernel keeps running)."""
    # kills D19: state created contiguous (zeros_like without preserve_format)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=gen, dtype=F64).t().detach().requires_grad_()
    assert not p.is_contiguous()
    opt = Adam([p], lr=0.1, fused=True)
    (p * torch.arange(15, dtype=F64).reshape(5, 3)).sum().backward()
    assert p.grad.stride() == p.stride()
    opt.step()
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][key].stride() == p.stride()


# --- optim/decay.py --------------------------------------------------------------------------------------------


def test_decoupled_rate_exactly_one_raises():
    """decay='decoupled' with λ·lr/lr₀ = 1 exactly (λ = 0.5, lr = 2·lr₀) is rejected: the weights would be zeroed."""
    # kills E2: rate > 1 instead of rate >= 1
    group = {"decay": "decoupled", "weight_decay": 0.5, "lr": 2.0, "initial_lr": 1.0, "nonfinite": "raise"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process rising-lr warning
        with pytest.raises(ValueError, match="must be < 1"):
            check_decay_rate(group)


def test_no_rising_lr_warning_without_weight_decay():
    """With weight_decay = 0 a rising lr under decay='decoupled' decays nothing, so it does not warn."""
    # kills E6: the early return for lam == 0 dropped
    group = {"decay": "decoupled", "weight_decay": 0.0, "lr": 5.0, "initial_lr": 1.0, "nonfinite": "raise"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_decay_rate(group)


def test_decoupled_lr_rate_is_checked_under_nonfinite_skip():
    """Only nonfinite='propagate' skips the lr·λ < 1 check: 'skip' still rejects lr·λ ≥ 1."""
    # kills E12: the check skipped for every policy other than 'raise'
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="must be < 1"):
        AdamW([p], lr=2.0, weight_decay=0.5, nonfinite="skip")
    AdamW([p], lr=2.0, weight_decay=0.5, nonfinite="propagate")


# --- optim/sgd.py ----------------------------------------------------------------------------------------------


def test_sgd_nesterov_rejects_dampening():
    """Nesterov momentum with non-zero dampening raises ValueError, as torch.optim.SGD does."""
    # kills S2: the dampening != 0 condition dropped
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, momentum=0.9, nesterov=True, dampening=0.1)


def test_sgd_rejects_negative_dampening():
    """dampening must be a finite number >= 0."""
    # kills S5: dampening not validated
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="dampening"):
        SGD([p], lr=0.1, momentum=0.9, dampening=-0.5)


# --- optim/param_groups.py -------------------------------------------------------------------------------------


def test_multi_dimensional_parameters_with_a_bias_name_part_are_not_decayed():
    """A parameter of 2+ dimensions whose name has a 'bias' part (MultiheadAttention's bias_k, (1, 1, E)) is not
    decayed."""
    # kills P2: only a parameter named exactly 'bias' counted by name
    torch.manual_seed(0)
    model = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    groups = decay_param_groups(model, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert model.bias_k.dim() == 3
    assert id(model.bias_k) in no_decay and id(model.bias_v) in no_decay
    assert id(model.in_proj_weight) not in no_decay


def test_a_name_merely_containing_bias_is_still_decayed():
    """The 'bias' rule matches a whole '_'-separated part: a 2-d 'debias_proj' weight is decayed."""
    # kills P3: substring test "bias" in name

    class Debias(nn.Module):
        def __init__(self):
            super().__init__()
            self.debias_proj = nn.Parameter(torch.zeros(4, 4))
            self.rel_bias = nn.Parameter(torch.zeros(4, 4))

    model = Debias()
    decayed = {id(p) for g in decay_param_groups(model, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.debias_proj)}


def test_frozen_parameters_are_left_out_of_the_groups():
    """Parameters with requires_grad=False are in no group (only trainable parameters are split)."""
    # kills P4: the requires_grad filter dropped
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    grouped = [p for g in decay_param_groups(model, 0.1) for p in g["params"]]
    assert {id(p) for p in grouped} == {id(model[1].weight), id(model[1].bias)}


def test_tied_weight_is_exempt_if_any_owner_exempts_it():
    """A weight tied between a Linear (visited first, decays) and an Embedding (exempt with
    decay_embeddings=False) lands in the no-decay group."""
    # kills P5: only the first owner of a shared parameter consulted

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.emb = nn.Embedding(10, 4)
            self.emb.weight = self.head.weight

    model = Tied()
    groups = decay_param_groups(model, 0.1, decay_embeddings=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert [id(p) for p in groups[0]["params"]] == [id(model.head.weight)]


def test_extra_no_decay_types_are_exempt():
    """Every parameter of a module type in extra_no_decay goes to the no-decay group."""
    # kills P7: extra_no_decay ignored
    model = nn.Sequential(nn.Linear(3, 4), nn.Bilinear(4, 4, 2))
    groups = decay_param_groups(model, 0.1, extra_no_decay=(nn.Bilinear,))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_empty_groups_are_left_out():
    """A model with nothing to decay (a LayerNorm) gets a single no-decay group, not an empty decayed one."""
    # kills P8: empty groups kept
    groups = decay_param_groups(nn.LayerNorm(5), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 2


def test_decay_param_groups_rejects_negative_weight_decay():
    """A negative weight_decay raises ValueError naming it."""
    # kills P11: the check_nonnegative validation dropped
    with pytest.raises(ValueError, match="weight_decay"):
        decay_param_groups(nn.Linear(3, 2), -0.1)


def test_decayed_names_refuses_a_group_without_a_weight_decay_key():
    """A group without 'weight_decay' gets the optimizer's default, which the groups do not tell: a ValueError
    naming the group (it had read as 0.0, "not decayed", although AdamW would decay it by 1e-2); the optimizer's
    own groups hold every value."""
    # kills P13 (g["weight_decay"]: a KeyError) and the earlier .get(..., 0.0) default
    model = nn.Linear(3, 2)
    groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias]}]
    with pytest.raises(ValueError, match="group 1 has no 'weight_decay'"):
        decayed_names(model, groups)
    names = decayed_names(model, AdamW(groups, lr=0.1).param_groups)
    assert names == {"weight": 0.1, "bias": 0.01}


def test_subclass_of_a_norm_type_is_exempt():
    """A LayerNorm subclass (fp32-LayerNorm style) with a 2-d normalized_shape is exempt: isinstance, not type."""
    # kills P14: type(module) in no_decay_types

    class LayerNorm32(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.Linear(3, 12), LayerNorm32((3, 4)))
    decayed = {id(p) for g in decay_param_groups(model, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    assert model[1].weight.dim() == 2
    assert decayed == {id(model[0].weight)}


def test_fused_adam_with_a_non_contiguous_gradient_matches_the_chain():
    """A contiguous parameter given a transposed gradient is stepped correctly by fused=True (chain fallback)."""
    # kills D20: _kernel_safe trusting any layout of the other tensors when the parameter is contiguous
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 3, generator=gen, dtype=F64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    g = torch.randn(3, 3, generator=gen, dtype=F64)
    p.grad, q.grad = g.t(), g.t().contiguous()
    Adam([p], lr=0.1, fused=True).step()
    Adam([q], lr=0.1).step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_fused_adam_rejects_a_meta_parameter():
    """fused=True names a parameter on a device the kernel does not run on (meta) at construction."""
    # kills D21: the device half of check_fused_params dropped
    p = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="on device meta"):
        Adam([p], fused=True)


def test_no_rising_lr_warning_for_decoupled_lr():
    """The rising-lr warning is about decay='decoupled' only: 'decoupled_lr' (lr·λ) does not warn."""
    # kills E13: the decay == 'decoupled' condition of the warning dropped
    group = {"decay": "decoupled_lr", "weight_decay": 0.01, "lr": 5.0, "initial_lr": 1.0, "nonfinite": "raise"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_decay_rate(group)
