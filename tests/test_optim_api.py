"""SGD/Adam/AdamW as real torch.optim.Optimizers: state_dict resume, schedulers, closures, dtypes, groups,
non-finite gradients and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from optim_helpers import make_problem, single_thread  # noqa: F401 (an autouse fixture)
from torch import nn

from theorylab.optim import (
    SGD,
    Adam,
    AdamW,
    NonFiniteGradientError,
    RunningAverageSGD,
    SGDMomentum,
    decay_param_groups,
    decayed_names,
)

FACTORIES = {
    "sgd": lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_decoupled": lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.001, decay="decoupled"),
    "adam": lambda p: Adam(p, lr=3e-3, weight_decay=0.01),
    "adam_decoupled": lambda p: Adam(p, lr=3e-3, weight_decay=1e-3, decay="decoupled"),
    "adamw": lambda p: AdamW(p, lr=3e-3),
}


def run_steps(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_resume_is_bit_identical(name):
    factory = FACTORIES[name]
    params, loss_fn = make_problem()
    opt = factory(params)
    run_steps(opt, params, loss_fn, 10)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run_steps(opt, params, loss_fn, 15)
    straight = [p.detach().clone() for p in params]

    params2, loss_fn2 = make_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params, strict=True):
            p.copy_(s)
    opt2 = factory(params2)
    opt2.load_state_dict(saved_state)
    run_steps(opt2, params2, loss_fn2, 15)
    for a, b in zip(straight, params2, strict=True):
        assert torch.equal(a, b.detach())


def test_lr_scheduler_is_honoured():
    """A scheduler that zeroes the lr freezes SGD (and "decoupled" decay, whose multiplier is lr/initial_lr)."""
    params, loss_fn = make_problem()
    opt = SGD(params, lr=0.1, momentum=0.0, weight_decay=0.01, decay="decoupled")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 3 else 0.0)
    assert opt.param_groups[0]["initial_lr"] == 0.1
    for _ in range(3):
        run_steps(opt, params, loss_fn, 1)
        sched.step()
    frozen = [p.detach().clone() for p in params]
    run_steps(opt, params, loss_fn, 3)
    assert all(torch.equal(a, b) for a, b in zip(frozen, params, strict=True))


def test_closure_is_called_and_its_loss_returned():
    params, loss_fn = make_problem()
    opt = Adam(params, lr=1e-2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(20):
        last = float(opt.step(closure).detach())
    assert len(calls) == 21 and first == calls[0]
    assert last < first


def test_lbfgs_style_closure_with_sgd_matches_manual():
    params, loss_fn = make_problem(torch.float64)
    opt = SGD(params, lr=0.1)
    w0 = params[0].detach().clone()

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(params[0].detach(), w0 - 0.1 * params[0].grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adam_decoupled"])
def test_dtypes_keep_dtype_and_track_float64(dtype, name):
    """Parameters and state keep their dtype; the trajectory follows the float64 one within the dtype's precision."""
    factory = FACTORIES[name]
    params64, loss64 = make_problem(torch.float64)
    params, loss_fn = make_problem(dtype)
    opt64, opt = factory(params64), factory(params)
    run_steps(opt64, params64, loss64, 20)
    run_steps(opt, params, loss_fn, 20)
    for p in params:
        assert p.dtype == dtype
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == dtype, key
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    diff = max(float((p.detach().double() - q.detach()).abs().max()) for p, q in zip(params, params64, strict=True))
    assert diff <= tol


def test_param_groups_with_different_hyperparameters():
    params, loss_fn = make_problem()
    opt = Adam([{"params": params[:2], "lr": 0.0}, {"params": params[2:]}], lr=1e-2)
    before = [p.detach().clone() for p in params]
    run_steps(opt, params, loss_fn, 5)
    assert torch.equal(before[0], params[0]) and torch.equal(before[1], params[1])
    assert not torch.equal(before[2], params[2])


def test_parameters_without_grad_are_skipped_and_keep_own_step_count():
    params, loss_fn = make_problem()
    opt = Adam(params, lr=1e-2)
    run_steps(opt, params, loss_fn, 3)
    params[3].grad = None
    params[3].requires_grad_(False)
    b = params[3].detach().clone()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
    assert torch.equal(b, params[3])
    assert float(opt.state[params[0]]["step"]) == 5 and float(opt.state[params[3]]["step"]) == 3


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: appears once


def test_decay_param_groups_excludes_biases_and_norm_weights():
    net = TinyNet()
    groups = decay_param_groups(net, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    named = decayed_names(net, groups)
    assert {n for n, wd in named.items() if wd} == {"embed.weight", "head.weight", "fc.weight"}  # every tied name
    assert {n for n, wd in named.items() if not wd} == {"fc.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias"}
    n_params = len({id(p) for p in net.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    no_emb = decay_param_groups(net, 0.1, decay_embeddings=False)
    assert {n for n, wd in decayed_names(net, no_emb).items() if wd} == {"fc.weight"}
    for opt in (AdamW(groups, lr=1e-3), torch.optim.AdamW(decay_param_groups(net, 0.1), lr=1e-3)):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_no_decay_group_is_not_decayed():
    """A zero gradient isolates the decay: only the decayed group shrinks, by exactly (1 - lr·λ) per step."""
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = AdamW(decay_param_groups(net, 0.5), lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n == "0.weight" else before[n]
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7), n


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_nonfinite_gradient_raises_and_changes_nothing(bad, name):
    params, loss_fn = make_problem()
    opt = FACTORIES[name](params)
    run_steps(opt, params, loss_fn, 2)
    params_before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn(params).backward()
    params[2].grad[0, 1] = bad
    with pytest.raises(NonFiniteGradientError, match=r"parameter index\(es\) \[2\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params_before, params, strict=True))
    after = opt.state_dict()["state"]
    for i, s in state_before["state"].items():
        for k, v in s.items():
            assert torch.equal(v, after[i][k]), (i, k)


def test_nonfinite_skip_and_propagate():
    params, loss_fn = make_problem()
    skip = Adam(params, lr=1e-2, nonfinite="skip")
    run_steps(skip, params, loss_fn, 2)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    skip.step()
    assert skip.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert float(skip.state[params[0]]["step"]) == 2

    prop = Adam(params, lr=1e-2, nonfinite="propagate")  # torch.optim's behaviour
    prop.step()
    assert all(torch.isnan(p).all() for p in params)
    assert all(torch.isnan(prop.state[p]["exp_avg"]).all() for p in params)


def test_finite_check_tolerates_huge_finite_gradients():
    """The fast check is a sum, which overflows for huge finite entries: those must not be called NaN."""
    p = torch.zeros(4, requires_grad=True)
    opt = SGD([p], lr=1e-30)
    p.grad = torch.full((4,), 3e38)
    opt.step()
    assert torch.isfinite(p.detach()).all() and float(p.detach()[0]) < 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_finite_check_finds_any_nan_or_inf_and_only_those(dtype):
    from theorylab.optim.base import _all_finite

    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max
    finite = [torch.full((1000,), big / 2, dtype=dtype), -torch.full((3,), big / 2, dtype=dtype)]
    assert _all_finite(finite)  # overflowing sums, cancelling sums: still finite
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.zeros(50, dtype=dtype)
        t[17] = bad
        assert not _all_finite([finite[0], t]), bad
        assert not _all_finite([torch.ones(3, dtype=torch.float64 if dtype != torch.float64 else torch.float32), t])


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda p: SGD(p, lr=-0.1), "learning rate: -0.1"),
        (lambda p: SGD(p, lr=math.nan), "learning rate: nan"),
        (lambda p: SGD(p, lr=0.1, momentum=-0.5), "momentum value: -0.5"),
        (lambda p: SGD(p, lr=0.1, weight_decay=-1e-3), "weight_decay value: -0.001"),
        (lambda p: SGD(p, lr=0.1, decay="L2"), "decay mode: 'L2'"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), "momentum=0.0"),
        (lambda p: SGD(p, lr=0.1, nonfinite="ignore"), "nonfinite policy: 'ignore'"),
        (lambda p: Adam(p, lr=-1.0), "learning rate: -1.0"),
        (lambda p: Adam(p, betas=(1.0, 0.999)), r"beta1 \(betas\[0\]\) value: 1.0"),
        (lambda p: Adam(p, betas=(0.9, -0.1)), r"beta2 \(betas\[1\]\) value: -0.1"),
        (lambda p: Adam(p, betas=(0.9,)), r"betas: \(0.9,\)"),
        (lambda p: Adam(p, eps=0.0), "eps value: 0.0"),
        (lambda p: Adam(p, eps=-1e-8), "eps value: -1e-08"),
        (lambda p: Adam(p, weight_decay=-0.1), "weight_decay value: -0.1"),
        (lambda p: Adam(p, decay="decoupled_LR"), "decay mode: 'decoupled_LR'"),
        (lambda p: AdamW(p, weight_decay=-1.0), "weight_decay value: -1.0"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(factory, match):
    with pytest.raises(ValueError, match=match):
        factory([torch.zeros(2, requires_grad=True)])


def test_bad_group_values_are_rejected_in_groups_and_at_step():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate: -1"):
        Adam([{"params": [p]}, {"params": [q], "lr": -1}])
    opt = Adam([p])
    with pytest.raises(ValueError, match="eps value: 0"):
        opt.add_param_group({"params": [q], "eps": 0})
    opt.param_groups[0]["betas"] = (0.9, 1.0)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="beta2"):
        opt.step()


def test_running_average_rejects_beta_one():
    from theorylab.optim import RunningAverageSGD

    with pytest.raises(ValueError, match="beta value: 1"):
        RunningAverageSGD([torch.zeros(2, requires_grad=True)], lr=0.1, beta=1.0)


def test_sparse_gradients_are_rejected():
    p = torch.zeros(3, requires_grad=True)
    opt = Adam([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls, options", [
    (Adam, {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "decoupled_weight_decay": False, "fused": None}),
    (AdamW, {"amsgrad": False, "maximize": False, "foreach": True, "capturable": False, "differentiable": False}),
    (SGD, {"maximize": False, "foreach": False, "differentiable": False, "fused": None}),
])
def test_torch_options_at_their_defaults_are_accepted_and_change_nothing(cls, options):
    """A configuration written for torch.optim (maximize=False, foreach=None, ...) raised TypeError."""
    def run(**kwargs):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
        opt = cls([p], lr=0.1, **kwargs)
        for t in range(5):
            p.grad = torch.sin(p.detach() * (t + 1))
            opt.step()
        return p.detach()

    assert torch.equal(run(**options), run())


@pytest.mark.parametrize("cls, key, value", [(Adam, "capturable", True), (AdamW, "differentiable", True),
                                             (SGD, "differentiable", True), (SGD, "fused", True)])
def test_torch_options_at_other_values_are_refused_by_name(cls, key, value):
    with pytest.raises(ValueError, match=f"{key}=True is not implemented"):
        cls([torch.nn.Parameter(torch.ones(2))], lr=0.1, **{key: value})


def test_torch_switches_take_the_values_torch_takes():
    import numpy as np

    p = [torch.nn.Parameter(torch.ones(2))]
    Adam(p, amsgrad=np.False_, maximize=0, foreach=np.True_, fused=np.False_)
    SGD(p, lr=0.1, foreach=1, fused=False)
    with pytest.raises(ValueError, match="Invalid foreach value: 'yes'"):
        Adam(p, foreach="yes")


def test_torch_decoupled_weight_decay_is_the_lr_scaled_decay():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert Adam(p, decoupled_weight_decay=True).param_groups[0]["decay"] == "decoupled_lr"
    assert Adam(p, decoupled_weight_decay=False).param_groups[0]["decay"] == "l2"
    with pytest.raises(ValueError, match="contradicts decay='decoupled'"):
        Adam(p, decay="decoupled", decoupled_weight_decay=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
        AdamW(p, decoupled_weight_decay=True)  # torch.optim.AdamW has no such keyword either


def test_an_unknown_keyword_is_a_type_error_as_in_torch():
    with pytest.raises(TypeError, match="unexpected keyword argument 'amsgrad'"):
        SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, amsgrad=False)  # torch's SGD has no amsgrad either


def _steps(opt, sched, n, p):
    for _ in range(n):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()


def test_decoupled_decay_warns_once_when_a_schedule_lifts_the_lr_above_its_initial_value():
    """OneCycleLR starts at max_lr/25, so Algorithm 2's multiplier lr/initial_lr reaches 25: a λ tuned at the
    start silently decayed 25x harder at the peak (test accuracy 0.86 -> 0.32 on digits, found by review)."""
    import warnings

    p = torch.nn.Parameter(torch.ones(3))
    lr_scheduler = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # schedules that never lift the lr above its start: no warning
        for make in (lambda o: lr_scheduler.CosineAnnealingLR(o, 10),
                     lambda o: lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10)):  # ends 2e-16 above
            opt = Adam([p], lr=1e-3, weight_decay=0.01, decay="decoupled")
            _steps(opt, make(opt), 12, p)
    opt = Adam([p], lr=1e-3, weight_decay=0.01, decay="decoupled")
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    with pytest.warns(UserWarning, match="choose weight_decay for that peak") as record:
        for _ in range(5):
            with warnings.catch_warnings():  # a library that touches the filters must not make it warn again
                warnings.simplefilter("always")
                _steps(opt, sched, 1, p)
    assert len([w for w in record if "choose weight_decay" in str(w.message)]) == 1


def test_rising_lr_warning_is_given_once_per_optimizer_not_once_per_process():
    """The second optimizer of a sweep (or a re-run notebook cell) gets the same 25x decay and its own warning; it
    had none, because one flag per process said the warning had been given (found by a user's journey)."""
    import warnings

    for run in range(3):
        p = torch.nn.Parameter(torch.ones(3))
        opt = (SGD if run == 1 else Adam)([p], lr=1e-3, weight_decay=0.01, decay="decoupled")
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _steps(opt, sched, 10, p)
        assert len([w for w in record if "choose weight_decay" in str(w.message)]) == 1, run


def test_decayed_names_refuses_groups_of_another_model():
    net, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="none of the 2 parameters in the groups belongs to the model"):
        decayed_names(net, decay_param_groups(other, 0.1))
    assert decayed_names(net, []) == {}
    assert decayed_names(net, [{"params": net.weight, "weight_decay": 0.1}]) == {"weight": 0.1}  # a lone tensor


@pytest.mark.parametrize("make", [lambda g: SGDMomentum(g, lr=0.1, momentum=0.9),
                                  lambda g: RunningAverageSGD(g, lr=0.1, beta=0.9)])
def test_momentum_forms_refuse_a_weight_decay_they_would_drop(make):
    """decay_param_groups' groups were accepted and their weight_decay ignored, while decayed_names reported the
    weights as decayed."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="has no weight decay, but a parameter group asks for weight_decay=0.5"):
        make(decay_param_groups(model, 0.5))
    make(decay_param_groups(model, 0.0))  # no decay asked for: fine


def test_decay_param_groups_exempts_embedding_bags_and_names_every_tied_alias():
    for emb in (nn.Embedding(5, 4), nn.EmbeddingBag(5, 4)):
        model = nn.Sequential(emb, nn.Linear(4, 2))
        assert decayed_names(model, decay_param_groups(model, 0.1, decay_embeddings=False))["0.weight"] == 0.0
    emb, out = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    out.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "out": out})
    names = decayed_names(model, decay_param_groups(model, 0.1))
    assert names == {"emb.weight": 0.1, "out.weight": 0.1}  # out.weight had been missing (KeyError)
