"""Hostile input for the optimizers: complex parameters, hyperparameters that arrive late (new groups, loaded
state, edits of ``param_groups``), state_dicts from other optimizers, decays that flip the weights' sign, and
numbers of unusual types."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from optim_helpers import single_thread  # noqa: F401 (an autouse fixture)

from theorylab.optim import (
    SGD,
    Adam,
    AdamW,
    RunningAverageSGD,
    SGDMomentum,
    decay_param_groups,
    decayed_names,
    momentum_from_running_average,
    running_average_from_momentum,
)
from theorylab.optim.base import STATE_KIND_KEY, NonFiniteGradientError

STEPS = 100

# ---------------------------------------------------------------------------------------------------------------
# complex parameters: torch.optim's convention, a complex number is a pair of reals (view_as_real)


def complex_problem(dtype: torch.dtype = torch.complex64, seed: int = 0):
    """A complex least-squares problem with a non-linear term: |tanh-free| but the Adam moments see varied gradients
    across components (real and imaginary parts of different scale)."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.float64

    def draw(*shape, scale=1.0):
        return torch.complex(torch.randn(*shape, generator=gen, dtype=real),
                             0.3 * torch.randn(*shape, generator=gen, dtype=real)) * scale

    x, y = draw(64, 8), draw(64, 5)
    params = [draw(8, 5, scale=0.5).to(dtype).requires_grad_(), torch.zeros(5, dtype=dtype, requires_grad=True)]
    x, y = x.to(dtype), y.to(dtype)

    def loss_fn(ps):
        w, b = ps
        r = x @ w + b - y  # (64, 5)
        return (r.abs() ** 2).mean() + 0.05 * (w.abs() ** 4).mean()

    return params, loss_fn


def complex_trajectory(factory, steps: int = STEPS, dtype: torch.dtype = torch.complex64) -> list[torch.Tensor]:
    params, loss_fn = complex_problem(dtype)
    opt = factory(params)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
    return [p.detach() for p in params]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


LR, LAM = 1e-2, 0.05
ADAM_VS_TORCH = {  # our (decay, weight_decay) -> torch's optimizer on the same parameters, constant lr
    "l2": (lambda p, fused: Adam(p, lr=LR, weight_decay=LAM, decay="l2", fused=fused),
           lambda p: torch.optim.Adam(p, lr=LR, weight_decay=LAM)),
    "decoupled_lr": (lambda p, fused: Adam(p, lr=LR, weight_decay=LAM, decay="decoupled_lr", fused=fused),
                     lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=LAM)),
    # the paper's λ per step is torch's lr·λ': λ = lr·λ' at a constant lr
    "decoupled": (lambda p, fused: Adam(p, lr=LR, weight_decay=LR * LAM, decay="decoupled", fused=fused),
                  lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=LAM)),
    "adamw": (lambda p, fused: AdamW(p, lr=LR, weight_decay=LAM, fused=fused),
              lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=LAM)),
}


@pytest.mark.parametrize("fused", [False, True], ids=["chain", "fused"])
@pytest.mark.parametrize("mode", sorted(ADAM_VS_TORCH))
def test_complex_adam_matches_torch(mode, fused):
    ours_factory, ref_factory = ADAM_VS_TORCH[mode]
    ours = complex_trajectory(lambda p: ours_factory(p, fused))
    ref = complex_trajectory(ref_factory)
    assert max_diff(ours, ref) <= 1e-5
    start, _ = complex_problem()
    assert max_diff(start, ref) > 1e-2  # it moved: the comparison is not vacuous


@pytest.mark.parametrize("fused", [False, True], ids=["chain", "fused"])
def test_complex_adam_first_step_follows_the_imaginary_gradient(fused):
    """g = i: Adam's first step is -lr·sign per component, -0.1i; treating g·g = -1 as the second moment gave
    -0.1 - 1e-9i (a step along the real axis)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex64))
    opt = Adam([p], lr=0.1, fused=fused)
    p.grad = torch.tensor([1j], dtype=torch.complex64)
    opt.step()
    real, imag = torch.view_as_real(p.detach())[0].tolist()
    assert real == 0.0 and imag == pytest.approx(-0.1, rel=1e-6)
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.complex64  # torch's layout
    assert torch.equal(torch.view_as_real(state["exp_avg_sq"]), torch.tensor([[0.0, 0.001]]))


COMPLEX_FACTORIES = {
    "sgd": lambda p: SGD(p, lr=0.05),
    "sgd_momentum_l2": lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov_decoupled": lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                            decay="decoupled"),
    "sgd_momentum": lambda p: SGDMomentum(p, lr=0.05, momentum=0.9),
    "running_average": lambda p: RunningAverageSGD(p, lr=0.1, beta=0.9, debias=True),
    "adam_l2": lambda p: Adam(p, lr=1e-2, weight_decay=0.05),
    "adam_decoupled": lambda p: Adam(p, lr=1e-2, weight_decay=1e-3, decay="decoupled"),
    "adamw": lambda p: AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw_fused": lambda p: AdamW(p, lr=1e-2, weight_decay=0.05, fused=True),
}


@pytest.mark.parametrize("name", sorted(COMPLEX_FACTORIES))
def test_complex_parameter_is_its_real_view(name):
    """The definition: stepping a complex parameter is stepping the real (…, 2) tensor view_as_real gives."""
    factory = COMPLEX_FACTORIES[name]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, dtype=torch.complex64, generator=gen).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()  # (4, 3, 2)
    opt_z, opt_r = factory([z]), factory([r])
    for _ in range(30):
        g = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
        z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    for key, value in opt_z.state[z].items():
        if key != "step":  # buffers stay complex and shaped like the parameter, as torch.optim keeps them
            assert value.dtype == torch.complex64 and value.shape == z.shape, key
            assert torch.equal(torch.view_as_real(value), opt_r.state[r][key]), key


@pytest.mark.parametrize("fused", [False, True], ids=["chain", "fused"])
def test_complex_and_real_parameters_in_one_group(fused):
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(3, dtype=torch.complex64, generator=gen), torch.randn(2, 2, generator=gen)]
    ours = [t.clone().requires_grad_() for t in start]
    ref = [t.clone().requires_grad_() for t in start]
    opt, ref_opt = AdamW(ours, lr=0.1, fused=fused), torch.optim.AdamW(ref, lr=0.1)
    for _ in range(20):
        grads = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in start]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert max_diff(ours, ref) <= 1e-6


@pytest.mark.parametrize("kwargs", [dict(lr=0.05), dict(lr=0.05, momentum=0.9, weight_decay=0.01),
                                    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)])
def test_complex_sgd_matches_torch_sgd(kwargs):
    ours = complex_trajectory(lambda p: SGD(p, **kwargs))
    ref = complex_trajectory(lambda p: torch.optim.SGD(p, **kwargs))
    assert max_diff(ours, ref) <= 1e-5


def test_complex_momentum_forms_match_torch_sgd():
    """SGDMomentum and RunningAverageSGD (under the mapping) are torch's heavy ball at a constant lr, complex too."""
    ref = complex_trajectory(lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8))
    mom = complex_trajectory(lambda p: SGDMomentum(p, lr=0.02, momentum=0.8))
    beta, lr = running_average_from_momentum(0.8, 0.02)
    ra = complex_trajectory(lambda p: RunningAverageSGD(p, lr=lr, beta=beta))
    assert max_diff(mom, ref) <= 1e-5 and max_diff(ra, ref) <= 1e-5


@pytest.mark.parametrize(("saved_fused", "loaded_fused"), [(False, True), (True, False)])
def test_complex_adam_state_dict_resumes_across_paths(saved_fused, loaded_fused):
    straight = complex_trajectory(lambda p: AdamW(p, lr=1e-2, fused=saved_fused), steps=20)
    params, loss_fn = complex_problem()
    opt = AdamW(params, lr=1e-2, fused=saved_fused)
    for _ in range(10):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = AdamW(params2, lr=1e-2, fused=loaded_fused)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt2.zero_grad()
        loss_fn(params2).backward()
        opt2.step()
    assert max_diff(straight, params2) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# hyperparameters validated wherever they enter: constructor, add_param_group, load_state_dict, edits before a step

BAD_GROUP_VALUES = {
    "sgd_momentum": (lambda p: SGDMomentum(p, lr=0.1, momentum=0.9),
                     [({"momentum": math.nan}, "momentum value: nan"), ({"momentum": -1.0}, "momentum value: -1.0"),
                      ({"lr": -1.0}, "learning rate: -1.0"), ({"lr": math.nan}, "learning rate: nan"),
                      ({"momentum": math.inf}, "momentum value: inf")]),
    "running_average": (lambda p: RunningAverageSGD(p, lr=0.1, beta=0.9),
                        [({"beta": math.nan}, "beta value: nan"), ({"beta": 1.0}, "beta value: 1.0"),
                         ({"beta": 2.0}, "beta value: 2.0"), ({"lr": -1.0}, "learning rate: -1.0"),
                         ({"lr": math.nan}, "learning rate: nan"), ({"debias": "no"}, "debias value: 'no'")]),
    "sgd": (lambda p: SGD(p, lr=0.1, momentum=0.9),
            [({"momentum": math.nan}, "momentum value: nan"), ({"lr": -1.0}, "learning rate: -1.0"),
             ({"nesterov": "yes"}, "nesterov value: 'yes'"), ({"maximize": "yes"}, "maximize value: 'yes'")]),
    "adam": (lambda p: Adam(p, lr=0.1),
             [({"betas": (0.9, math.nan)}, "beta2"), ({"eps": 0.0}, "eps value: 0.0"),
              ({"amsgrad": 2}, "amsgrad value: 2"), ({"maximize": None}, "maximize value: None")]),
}
BAD_CASES = [(name, bad, match) for name, (_, cases) in BAD_GROUP_VALUES.items() for bad, match in cases]


@pytest.mark.parametrize(("name", "bad", "match"), BAD_CASES)
def test_bad_values_in_a_new_group_are_rejected(name, bad, match):
    opt = BAD_GROUP_VALUES[name][0]([torch.ones(2, requires_grad=True)])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("name", "bad", "match"), BAD_CASES)
def test_bad_values_edited_into_param_groups_are_rejected_at_step(name, bad, match):
    p = torch.ones(2, requires_grad=True)
    opt = BAD_GROUP_VALUES[name][0]([p])
    opt.param_groups[0].update(bad)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(2)) and not opt.state[p]


@pytest.mark.parametrize(("name", "bad", "match"), BAD_CASES)
def test_bad_values_in_a_loaded_state_dict_are_rejected_at_load(name, bad, match):
    p = torch.ones(2, requires_grad=True)
    opt = BAD_GROUP_VALUES[name][0]([p])
    p.grad = torch.ones(2)
    opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["param_groups"][0].update(bad)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"parameter group 0: .*{match}"):
        opt.load_state_dict(state_dict)
    assert opt.state_dict()["param_groups"] == before["param_groups"]  # nothing was loaded


def test_momentum_nan_no_longer_reaches_the_parameters():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SGDMomentum([a], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum value: nan"):
        opt.add_param_group({"params": [b], "momentum": math.nan})
    opt.param_groups[0]["momentum"] = -5.0
    a.grad = torch.ones(2)
    with pytest.raises(ValueError, match="momentum value: -5.0"):
        opt.step()


# ---------------------------------------------------------------------------------------------------------------
# state_dicts load only into the optimizer that saved them

MAKERS = {
    "SGD": lambda p: SGD(p, lr=0.1, momentum=0.9),
    "SGDMomentum": lambda p: SGDMomentum(p, lr=0.1, momentum=0.9),
    "RunningAverageSGD": lambda p: RunningAverageSGD(p, lr=0.1, beta=0.9),
    "Adam": lambda p: Adam(p, lr=0.1),
    "AdamW": lambda p: AdamW(p, lr=0.1),
    "Adam fused": lambda p: Adam(p, lr=0.1, fused=True),
    "torch.optim.SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "torch.optim.Adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "torch.optim.AdamW": lambda p: torch.optim.AdamW(p, lr=0.1),
}
KIND = {"SGD": "SGD", "SGDMomentum": "SGDMomentum", "RunningAverageSGD": "RunningAverageSGD", "Adam": "Adam",
        "AdamW": "Adam", "Adam fused": "Adam"}


def saved_after_steps(name: str, steps: int = 3):
    p = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))
    opt = MAKERS[name]([p])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = torch.randn(3, generator=gen)
        opt.step()
    return p.detach().clone(), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("loader", sorted(KIND))
@pytest.mark.parametrize("saver", sorted(MAKERS))
def test_state_dict_loads_only_into_its_own_kind(saver, loader):
    value, state_dict = saved_after_steps(saver)
    q = torch.nn.Parameter(value.clone())
    opt = MAKERS[loader]([q])
    if KIND.get(saver) == KIND[loader] or _same_adam_update(saver, loader, state_dict):
        opt.load_state_dict(state_dict)
        return
    if saver in KIND:
        match = f"saved by {KIND[saver]}, "
    else:  # torch.optim's are named, even where no key is missing (torch's SGD buffer is not SGDMomentum's)
        match = {"torch.optim.SGD": "torch.optim.SGD ", "torch.optim.Adam": "torch.optim.Adam ",
                 "torch.optim.AdamW": "torch.optim.AdamW "}[saver]
        if saver != "torch.optim.SGD" and "decoupled_weight_decay" not in state_dict["param_groups"][0]:
            match = "torch.optim.Adam or AdamW "  # older torch (2.4) saves Adam and AdamW alike
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert not opt.state  # nothing was loaded


def _same_adam_update(saver: str, loader: str, state_dict) -> bool:
    """torch.optim.Adam (no weight decay: every mode agrees) loads into Adam and AdamW; torch.optim.AdamW (decay
    λ = 0.01) into AdamW only, and only where it says it is AdamW (torch 2.4 saves Adam and AdamW alike)."""
    if saver == "torch.optim.Adam":
        return loader in ("Adam", "Adam fused", "AdamW")
    flagged = "decoupled_weight_decay" in state_dict["param_groups"][0]
    return saver == "torch.optim.AdamW" and loader == "AdamW" and flagged


@pytest.mark.parametrize("torch_name, ours", [("torch.optim.Adam", "AdamW"), ("torch.optim.AdamW", "AdamW"),
                                              ("torch.optim.Adam", "Adam fused")])
def test_a_torch_adam_state_resumes_as_it_would_have_in_torch(torch_name, ours):
    """A run moves from torch.optim.Adam(W) to theorylab's and goes on as in torch (it had been refused)."""
    value, state_dict = saved_after_steps(torch_name)
    if not _same_adam_update(torch_name, ours, state_dict):  # torch 2.4 saves Adam and AdamW alike
        with pytest.raises(ValueError, match="torch.optim.Adam or AdamW state with weight decay"):
            MAKERS[ours]([torch.nn.Parameter(value.clone())]).load_state_dict(state_dict)
        return
    p, q = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
    theirs, mine = MAKERS[torch_name]([p]), MAKERS[ours]([q])
    theirs.load_state_dict(copy.deepcopy(state_dict))
    mine.load_state_dict(copy.deepcopy(state_dict))
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        p.grad = torch.randn(3, generator=gen)
        q.grad = p.grad.clone()
        theirs.step()
        mine.step()
    torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    again = MAKERS[ours]([torch.nn.Parameter(value.clone())])
    again.load_state_dict(mine.state_dict())  # saved by theorylab now, with its kind


def test_a_torch_state_a_different_update_is_refused():
    """torch.optim.AdamW's decay (lr·λ·θ) is not Adam(decay="l2")'s; capturable states are refused too."""
    _, state_dict = saved_after_steps("torch.optim.AdamW")
    with pytest.raises(ValueError, match=r"group 0: it is a torch.optim.(AdamW state, whose decay is theorylab's "
                                         r"decay='decoupled_lr'; this group's is 'l2'|Adam or AdamW state with weight "
                                         r"decay, saved by a torch \(2.4\))"):
        Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1).load_state_dict(state_dict)
    with_decay = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=0.1).state_dict()
    if "decoupled_weight_decay" in with_decay["param_groups"][0]:  # torch >= 2.5 says which it is
        with pytest.raises(ValueError, match=r"build the optimizer with theorylab.optim.Adam\(decay='l2'\)"):
            AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1).load_state_dict(with_decay)  # not AdamW(decay=)
    _, state_dict = saved_after_steps("torch.optim.Adam")
    state_dict["param_groups"][0]["capturable"] = True  # the message had blamed the decay
    with pytest.raises(ValueError, match="torch.optim.Adam.* state saved with capturable=True"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1).load_state_dict(state_dict)


def test_torch_state_dict_error_names_the_missing_keys():
    _, state_dict = saved_after_steps("torch.optim.SGD")
    with pytest.raises(ValueError, match="lacks 'decay'.*torch.optim.SGD state_dict"):
        SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9).load_state_dict(state_dict)
    _, state_dict = saved_after_steps("Adam")
    del state_dict[STATE_KIND_KEY]  # an Adam state_dict saved before the marker existed
    with pytest.raises(ValueError, match="lacks 'momentum', 'dampening', 'nesterov'"):
        SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1).load_state_dict(state_dict)
    with pytest.raises(ValueError, match="lacks 'beta', 'debias'"):
        RunningAverageSGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, beta=0.9).load_state_dict(state_dict)


@pytest.mark.parametrize("name", ["SGD", "SGDMomentum", "RunningAverageSGD", "Adam", "Adam fused"])
def test_unmarked_state_dict_still_resumes_bit_identically(name):
    """A state_dict saved before the marker (and before ``nonfinite``) loads and continues exactly."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, generator=gen) for _ in range(6)]
    p = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))
    opt = MAKERS[name]([p])
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    del state_dict[STATE_KIND_KEY]
    state_dict["param_groups"][0].pop("nonfinite", None)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = MAKERS[name]([q])
    opt2.load_state_dict(state_dict)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


def test_our_state_dict_still_loads_into_torch_optim():
    value, state_dict = saved_after_steps("Adam")
    q = torch.nn.Parameter(value.clone())
    ref = torch.optim.Adam([q], lr=0.1)
    ref.load_state_dict(state_dict)  # the marker is an extra top-level key, which torch ignores
    assert torch.equal(ref.state[q]["exp_avg"], state_dict["state"][0]["exp_avg"])


# ---------------------------------------------------------------------------------------------------------------
# decoupled decay: the shrink per step must be < 1


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, weight_decay=5.0, decay="decoupled"),
                                  lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1.0, decay="decoupled"),
                                  lambda p: Adam(p, lr=0.1, weight_decay=5.0, decay="decoupled"),
                                  lambda p: Adam(p, lr=0.1, weight_decay=5.0, decay="decoupled", fused=True)])
def test_decoupled_weight_decay_of_one_or_more_is_rejected(make):
    with pytest.raises(ValueError, match=r"weight_decay value: (5|1)\.0 for decay='decoupled'"):
        make([torch.ones(1, requires_grad=True)])


def test_decoupled_weight_decay_is_checked_in_new_groups():
    opt = SGD([torch.ones(1, requires_grad=True)], lr=0.1, decay="decoupled")
    with pytest.raises(ValueError, match="weight_decay value: 2.0 for decay='decoupled'"):
        opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "weight_decay": 2.0})


def test_decoupled_with_zero_gradient_shrinks_and_never_flips():
    p = torch.nn.Parameter(torch.ones(1))
    opt = SGD([p], lr=0.1, weight_decay=0.5, decay="decoupled")
    for _ in range(50):
        p.grad = torch.zeros(1)
        opt.step()
    assert 0 < float(p.detach()) <= 0.5**50 * 1.0001


@pytest.mark.parametrize("make", [lambda p: AdamW(p, lr=0.1, weight_decay=10.0),
                                  lambda p: AdamW(p, lr=0.1, weight_decay=10.0, fused=True),
                                  lambda p: SGD(p, lr=0.5, weight_decay=3.0, decay="decoupled_lr")])
def test_decoupled_lr_with_lr_times_weight_decay_of_one_or_more_is_rejected(make):
    with pytest.raises(ValueError, match="lr \\* weight_decay = (1|1.5) must be < 1"):
        make([torch.ones(1, requires_grad=True)])


def test_decoupled_rates_are_checked_at_step_time():
    """Edits and schedules that push the shrink per step to >= 1 raise before the step, naming the values."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdamW([p], lr=0.1, weight_decay=5.0)  # 0.5 per step
    opt.param_groups[0]["lr"] = 0.3  # 1.5 per step
    p.grad = torch.zeros(2)
    with pytest.raises(ValueError, match="lr=0.3, weight_decay=5.0: the decay per step lr \\* weight_decay = 1.5"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(2))

    q = torch.nn.Parameter(torch.ones(2))
    opt = SGD([q], lr=0.01, weight_decay=0.4, decay="decoupled")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 + t)  # a warm-up above the initial lr
    for _ in range(2):
        q.grad = torch.zeros(2)
        opt.step()
        sched.step()
    q.grad = torch.zeros(2)
    with pytest.raises(ValueError, match="weight_decay \\* lr / initial_lr = 1.2"):
        opt.step()


def test_propagate_leaves_the_rate_unchecked_as_torch_does():
    """nonfinite='propagate' is torch.optim's behaviour: a grid cell with lr·λ >= 1 may diverge, as with torch."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdamW([p], lr=0.1, weight_decay=300.0, nonfinite="propagate")
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2,), 1 - 30.0))
    with pytest.raises(ValueError, match="for decay='decoupled'"):  # λ >= 1 itself is never meaningful
        SGD([p], lr=0.1, weight_decay=1.0, decay="decoupled", nonfinite="propagate")


# ---------------------------------------------------------------------------------------------------------------
# numbers of other types: numpy scalars and one-element tensors are numbers; the rest is a TypeError naming the type


def test_tensor_and_numpy_hyperparameters_are_read_as_floats():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, generator=gen) for _ in range(5)]

    def run(**kwargs):
        p = torch.nn.Parameter(torch.ones(3))
        opt = Adam([p], **kwargs)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.param_groups[0]

    plain, _ = run(lr=0.25, betas=(0.5, 0.75), eps=0.125, weight_decay=0.5)
    for kwargs in (dict(lr=torch.tensor(0.25), betas=(torch.tensor(0.5), torch.tensor(0.75)),
                        eps=torch.tensor(0.125), weight_decay=torch.tensor(0.5)),
                   dict(lr=np.float32(0.25), betas=(np.float64(0.5), np.float32(0.75)), eps=np.float16(0.125),
                        weight_decay=np.float32(0.5))):
        result, group = run(**kwargs)
        assert torch.equal(result, plain)
        assert all(type(group[k]) is float for k in ("lr", "eps", "weight_decay", "lr_at_construction"))
        assert all(type(b) is float for b in group["betas"])


def test_numpy_and_tensor_values_in_groups_and_helpers():
    opt = SGDMomentum([torch.ones(1, requires_grad=True)], lr=np.float32(0.5), momentum=np.float64(0.5))
    opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "lr": torch.tensor(0.25), "momentum": 0})
    assert [(type(g["lr"]), g["lr"]) for g in opt.param_groups] == [(float, 0.5), (float, 0.25)]
    opt.param_groups[0]["lr"] = np.float64(0.125)  # an edit of another type is read as a float at the step
    for p in (g["params"][0] for g in opt.param_groups):
        p.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.125 and type(opt.param_groups[0]["lr"]) is float
    beta, lr = momentum_from_running_average(np.float32(0.75), np.float64(0.5))
    assert (beta, lr) == (0.75, 0.125) and type(beta) is float and type(lr) is float
    assert RunningAverageSGD([torch.ones(1, requires_grad=True)], lr=0.1, beta=0.5,
                             debias=np.bool_(True)).param_groups[0]["debias"] is True


@pytest.mark.parametrize(("bad", "type_name"), [("0.1", "str"), (True, "bool"), (None, "NoneType"),
                                                (torch.tensor([0.1, 0.2]), "Tensor"), (1j, "complex"),
                                                (torch.tensor(True), "Tensor"), (np.bool_(True), "bool")])
@pytest.mark.parametrize("make", [lambda p, v: SGD(p, lr=v), lambda p, v: Adam(p, lr=v),
                                  lambda p, v: SGDMomentum(p, lr=v, momentum=0.9),
                                  lambda p, v: RunningAverageSGD(p, lr=v, beta=0.9)])
def test_wrong_type_is_a_type_error_naming_the_type(make, bad, type_name):
    with pytest.raises(TypeError, match=f"learning rate: .* has type {type_name}.*expected a real number"):
        make([torch.ones(1, requires_grad=True)], bad)


def test_wrong_type_in_the_helpers_names_the_type():
    with pytest.raises(TypeError, match="beta value: '0.9' has type str"):
        momentum_from_running_average("0.9", 0.1)
    with pytest.raises(TypeError, match=r"momentum value: \[0.9\] has type list"):
        SGD([torch.ones(1, requires_grad=True)], lr=0.1, momentum=[0.9])


def test_a_step_that_fails_on_a_later_group_changes_nothing():
    """Every group is checked before any is stepped: the scheduled decay rate of group 1 becoming >= 1 (or a NaN
    gradient there) must not leave group 0 stepped, or a retry would step it twice."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Adam([{"params": [a]}, {"params": [b], "weight_decay": 0.5}], lr=0.1, decay="decoupled")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: 1.0 + 3 * t])  # group 1's lr rises
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        before = (a.detach().clone(), b.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()})
        try:
            opt.step()
        except ValueError as e:
            assert "must be < 1" in str(e)
            assert torch.equal(a, before[0]) and torch.equal(b, before[1])
            assert all(torch.equal(opt.state[a][k], v) for k, v in before[2].items())
            break
        sched.step()
    else:
        raise AssertionError("the decay-rate check never fired")
    a.grad, b.grad = torch.ones(3), torch.full((3,), float("nan"))
    opt2 = Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(NonFiniteGradientError):
        opt2.step()
    assert not opt2.state[a]  # group 0 untouched, as the error message says


@pytest.mark.parametrize("make", [lambda p: SGD([p], lr=0.1, momentum=0.9, nesterov=1),
                                  lambda p: RunningAverageSGD([p], lr=0.1, beta=0.9, debias=1),
                                  lambda p: RunningAverageSGD([p], lr=0.1, beta=0.9, debias=0)])
def test_switches_accept_the_integers_0_and_1_as_torch_optim_does(make):
    p = torch.nn.Parameter(torch.ones(2))
    make(p)


# --- found by the fifth session's review: torch.optim interop ------------------------------------------------


def _stepped(factory):
    model = torch.nn.Linear(3, 2)
    opt = factory(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


OPTIMIZERS = {
    "SGD": lambda p: SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: Adam(p, lr=1e-2),
    "AdamW": lambda p: AdamW(p, lr=1e-2),
    "SGDMomentum": lambda p: SGDMomentum(p, lr=0.1, momentum=0.9),
    "RunningAverageSGD": lambda p: RunningAverageSGD(p, lr=0.1, beta=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_loads_twice_and_after_deepcopy_and_pickling(name):
    """torch's Optimizer.__setstate__ adds 'differentiable' to defaults; a second load_state_dict, a deepcopy or
    an unpickled optimizer then refused every state_dict ("lacks 'differentiable'")."""
    model, opt = _stepped(OPTIMIZERS[name])
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    opt.load_state_dict(saved)
    copy.deepcopy(opt).load_state_dict(saved)
    pickle.loads(pickle.dumps(opt)).load_state_dict(saved)


def test_a_hand_written_schedule_is_measured_against_the_constructors_lr():
    """The constructor's lr is recorded, so lr set by hand every step (a warm-up starting at 1e-6) gives the
    decoupled multiplier lr / lr_0 <= 1; measured against the first step's lr instead, it would reach 1e4."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Adam([p], lr=1e-2, weight_decay=0.1, decay="decoupled")
    expected = 1.0
    for lr in (1e-6, 1e-4, 1e-2):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.zeros(3, dtype=torch.float64)  # Adam's own step is then 0: only the decay moves p
        opt.step()
        expected *= 1 - 0.1 * lr / 1e-2
    assert "initial_lr" not in opt.param_groups[0] and opt.param_groups[0]["lr_at_construction"] == 1e-2
    assert torch.allclose(p.detach(), torch.full((3,), expected, dtype=torch.float64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# found by the ninth session's review


@pytest.mark.parametrize("make", [lambda p: Adam([p], lr=0.1), lambda p: SGD([p], lr=0.1, momentum=0.9),
                                  lambda p: Adam([p], lr=0.1, weight_decay=0.01, decay="decoupled", fused=True)])
def test_cyclic_lr_starts_at_base_lr_as_with_torch(make):
    """CyclicLR moves the lr to base_lr and then lets LRScheduler record initial_lr with setdefault; an
    initial_lr recorded at construction had made the first step run at the constructor's lr (100× base_lr)."""
    lrs = {}
    for name, build in (("ours", make), ("torch", lambda p: torch.optim.SGD([p], lr=0.1))):
        p = torch.nn.Parameter(torch.ones(3))
        opt = build(p)
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=5,
                                                  cycle_momentum=False)
        lrs[name] = []
        for _ in range(3):
            lrs[name].append(opt.param_groups[0]["lr"])
            p.grad = torch.zeros(3)
            opt.step()
            sched.step()
    assert lrs["ours"] == lrs["torch"] and lrs["ours"][0] == 0.001


def test_a_scheduler_created_after_a_hand_set_lr_starts_from_it_as_with_torch():
    p = torch.nn.Parameter(torch.ones(3))
    for opt in (Adam([p], lr=0.1), torch.optim.Adam([p], lr=0.1)):
        opt.param_groups[0]["lr"] = 0.05
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        assert opt.param_groups[0]["initial_lr"] == 0.05


def test_cyclic_lr_decoupled_multiplier_is_lr_over_base_lr():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Adam([p], lr=0.1, weight_decay=0.01, decay="decoupled")
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=5,
                                              cycle_momentum=False)
    expected = 1.0
    with pytest.warns(UserWarning, match="above the group's initial_lr"):
        for _ in range(6):
            expected *= 1 - 0.01 * opt.param_groups[0]["lr"] / 0.001
            p.grad = torch.zeros(3, dtype=torch.float64)
            opt.step()
            sched.step()
    assert torch.allclose(p.detach(), torch.full((3,), expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf")])
def test_bad_initial_lr_is_refused_where_it_enters(bad):
    """NaN made the decoupled decay NaN, a negative one made the weights grow, inf switched the decay off."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid initial_lr value"):
        Adam([{"params": [p], "initial_lr": bad}], lr=0.1, weight_decay=0.1, decay="decoupled")
    opt = Adam([p], lr=0.1, weight_decay=0.1, decay="decoupled")
    saved = opt.state_dict()
    saved["param_groups"][0]["initial_lr"] = bad
    with pytest.raises(ValueError, match="parameter group 0: Invalid initial_lr value"):
        opt.load_state_dict(saved)
    opt.param_groups[0]["initial_lr"] = bad  # written by hand: caught at the step, before p changes
    p.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="Invalid initial_lr value"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("bad, error", [(10**400, ValueError), ("0.01", TypeError)])
def test_an_initial_lr_beyond_a_float_or_not_a_number_is_named_before_it_is_divided_by(bad, error):
    """check_group divided lr by initial_lr before initial_lr was checked: OverflowError / an unexplained TypeError."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(error, match="initial_lr"):
        Adam([{"params": [p], "initial_lr": bad}], lr=0.1, weight_decay=0.1, decay="decoupled")
    opt = Adam([p], lr=0.1, weight_decay=0.1, decay="decoupled")
    saved = opt.state_dict()
    saved["param_groups"][0]["initial_lr"] = bad
    with pytest.raises(error, match="cannot load this state_dict into Adam: its parameter group 0: .*initial_lr"):
        opt.load_state_dict(saved)


def test_a_misspelt_nonfinite_policy_written_into_a_group_is_caught_at_the_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p])
    opt.param_groups[0]["nonfinite"] = "propogate"
    p.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="Invalid nonfinite policy: 'propogate'"):
        opt.step()


@pytest.mark.parametrize("name", ["lr", "weight_decay", "momentum"])
def test_a_hyperparameter_beyond_the_float_range_is_a_value_error_naming_it(name):
    from fractions import Fraction

    kwargs = {"lr": 0.1, name: 10**400}
    with pytest.raises(ValueError, match="too large for a float"):
        SGD([torch.nn.Parameter(torch.ones(2))], **kwargs)
    kwargs[name] = Fraction(10**400, 3)
    with pytest.raises(ValueError, match="Fraction value too large"):
        SGD([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_adam_in_float16_with_zero_gradient_entries_matches_torch():
    """δ·√(1−β₂ᵗ) (1e-7 · 0.03) rounds to 0 in float16: a zero gradient entry gave 0/0 = NaN in the parameter."""
    for decay, ref_cls in (("l2", torch.optim.Adam), ("decoupled_lr", torch.optim.AdamW)):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        q = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        ours = Adam([p], lr=1e-3, eps=1e-7, weight_decay=0.01, decay=decay)
        ref = ref_cls([q], lr=1e-3, eps=1e-7, weight_decay=0.01, foreach=True)
        g = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float16)
        for _ in range(5):
            p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        assert torch.isfinite(p).all() and torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_l2_without_momentum_keeps_its_decay_in_half_precision(dtype):
    """Deferred to a separate p.mul_(1 - lr·λ), the decay rounded back to p in bfloat16 (|p| 0.9999 after 200
    steps against torch's 0.9714): the L2 term is now added to the gradient first, as torch does."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1000, generator=gen).to(dtype)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ours, ref = SGD([a], lr=0.1, weight_decay=0.01), torch.optim.SGD([b], lr=0.1, weight_decay=0.01, foreach=True)
    for _ in range(200):
        g = (0.01 * torch.randn(1000, generator=gen)).to(dtype)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a.detach(), b.detach())
    assert float(a.detach().float().norm()) < 0.99 * float(p0.float().norm())


def test_skip_skips_the_whole_step_as_grad_scaler_does():
    """A NaN in the bias group stepped the weight group anyway (half a step), and counted once per group."""
    model = torch.nn.Linear(3, 2)
    opt = Adam([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).sum().backward()
    model.bias.grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


def test_loading_keeps_the_loaders_nonfinite_policy():
    _, saver = _stepped(lambda p: Adam(p, lr=1e-2, nonfinite="propagate"))
    _, loader = _stepped(lambda p: Adam(p, lr=1e-2, nonfinite="raise"))
    loader.load_state_dict(saver.state_dict())
    assert loader.param_groups[0]["nonfinite"] == "raise"


def test_meta_parameters_step_with_the_default_policy():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    for opt in (Adam([p], lr=1e-2), SGD([p], lr=0.1, momentum=0.9)):
        opt.step()


def test_decay_param_groups_spares_every_kind_of_bias_and_allows_add_param_group():
    """LSTM's bias_ih_l0, MultiheadAttention's in_proj_bias and the RNN's b were decayed; and the groups' names
    made torch refuse a later add_param_group without names."""
    from theorylab.rnn import RNN

    net = torch.nn.ModuleDict({"lstm": torch.nn.LSTM(4, 4), "mha": torch.nn.MultiheadAttention(4, 2),
                               "rnn": RNN(4, 4), "head": torch.nn.Linear(4, 2)})
    groups = decay_param_groups(net, 0.1)
    named = decayed_names(net, groups)
    assert {n for n, wd in named.items() if wd} == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "mha.in_proj_weight",
                                                    "mha.out_proj.weight", "rnn.W", "rnn.U", "head.weight"}
    opt = AdamW(groups, lr=1e-3)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    torch.optim.AdamW(decay_param_groups(net, 0.1)).add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_load_state_dict_pre_hooks_run_before_validation_and_once():
    """A pre-hook that adapts an old checkpoint (here: fills in a missing hyperparameter) runs before our checks, as
    torch runs it before its own; it had run after them, so the checkpoint was refused first."""
    _, saver = _stepped(lambda p: Adam(p, lr=1e-2, weight_decay=0.1, decay="decoupled"))
    old = saver.state_dict()
    for group in old["param_groups"]:
        del group["decay"]
    _, loader = _stepped(lambda p: Adam(p, lr=1e-2))
    with pytest.raises(ValueError, match="lacks 'decay'"):
        loader.load_state_dict(old)
    calls = []

    def fill_in(opt, state_dict):
        calls.append(1)
        groups = [{**g, "decay": g.get("decay", "decoupled")} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    handle = loader.register_load_state_dict_pre_hook(fill_in)
    loader.load_state_dict(old)
    assert calls == [1] and loader.param_groups[0]["decay"] == "decoupled"
    assert "decay" not in old["param_groups"][0]  # the caller's dict is not changed
    handle.remove()
    with pytest.raises(ValueError, match="lacks 'decay'"):
        loader.load_state_dict(old)
    assert calls == [1]


def test_a_pre_hook_registered_during_a_load_is_kept():
    """The hooks were held back in a temporary dict during torch's load, and one registered then was dropped."""
    _, saver = _stepped(lambda p: Adam(p, lr=1e-2))
    _, loader = _stepped(lambda p: Adam(p, lr=1e-2))
    calls = []

    def registers(opt):
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(1))

    handle = loader.register_load_state_dict_post_hook(registers)
    loader.load_state_dict(saver.state_dict())
    handle.remove()
    loader.load_state_dict(saver.state_dict())
    assert calls == [1]


def test_a_pre_hook_registered_during_a_load_can_be_removed_and_prepended():
    """Registered during a load, a pre-hook went into a temporary dict: its handle could not remove it, and
    prepend=True put it last."""
    _, saver = _stepped(lambda p: Adam(p, lr=1e-2))
    _, loader = _stepped(lambda p: Adam(p, lr=1e-2))
    calls, handles = [], []
    loader.register_load_state_dict_pre_hook(lambda o, sd: calls.append("A"))

    def registers(opt):
        handles.append(opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("first"), prepend=True))

    post = loader.register_load_state_dict_post_hook(registers)
    loader.load_state_dict(saver.state_dict())
    post.remove()
    calls.clear()
    loader.load_state_dict(saver.state_dict())
    assert calls == ["first", "A"]
    handles[0].remove()
    calls.clear()
    loader.load_state_dict(saver.state_dict())
    assert calls == ["A"]


class _DocumentedSGD(SGD):
    """A subclass that keeps SGD's chain (a docstring, as a user's own wrapper would)."""


class _DocumentedMomentum(SGDMomentum):
    def step(self, closure=None):  # a hook of the user's, the same update
        return super().step(closure)


class _OtherChain(SGD):
    def transforms(self, group):  # another chain: its state means something else
        return super().transforms(group)


@pytest.mark.parametrize(("base", "sub", "kw"), [(SGD, _DocumentedSGD, {"momentum": 0.9}),
                                                 (SGDMomentum, _DocumentedMomentum, {"momentum": 0.9})])
def test_a_subclass_that_keeps_the_chain_loads_its_base_state_and_back(base, sub, kw):
    """A user's subclass of SGD or SGDMomentum that keeps the chain refused the base class's checkpoint ("it was
    saved by theorylab's SGD, whose state ... means something else"), where AdamW's subclasses loaded Adam's."""
    value, _ = saved_after_steps("SGD")
    for saver, loader in ((base, sub), (sub, base)):
        p = torch.nn.Parameter(value.clone())
        opt = saver([p], lr=0.1, **kw)
        p.grad = torch.ones(3)
        opt.step()
        q = torch.nn.Parameter(p.detach().clone())
        other = loader([q], lr=0.1, **kw)
        other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares the tensors otherwise
        p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
        opt.step()
        other.step()
        assert torch.equal(p, q)


def test_a_subclass_with_its_own_chain_keeps_its_own_kind():
    p = torch.nn.Parameter(torch.ones(3))
    state_dict = SGD([p], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"saved by SGD, .*class attribute state_kind"):
        _OtherChain([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).load_state_dict(state_dict)
    own = _OtherChain([p], lr=0.1, momentum=0.9).state_dict()
    _OtherChain([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).load_state_dict(own)


def test_a_state_saved_under_a_subclass_name_still_loads_into_it():
    """Before its kind followed the class that defines the chain, a subclass saved its own name: still accepted."""
    p = torch.nn.Parameter(torch.ones(3))
    state_dict = _DocumentedSGD([p], lr=0.1).state_dict()
    assert state_dict[STATE_KIND_KEY] == "SGD"
    state_dict[STATE_KIND_KEY] = "_DocumentedSGD"
    _DocumentedSGD([torch.nn.Parameter(torch.ones(3))], lr=0.1).load_state_dict(state_dict)


class _Clip:  # a mixin that changes the chain of whatever optimizer it is mixed into
    def transforms(self, group):
        return list(super().transforms(group))


class _ClipSGD(_Clip, SGD):
    pass


class _ClipSGDMomentum(_Clip, SGDMomentum):
    pass


class _SubClipSGD(_ClipSGD):
    pass


class _AscentAdam(Adam):
    def transforms(self, group):  # another chain under Adam's name
        return super().transforms(group)


def test_a_mixin_s_chain_is_the_kind_of_the_class_it_makes():
    """The first version of the subclass rule took the first class defining ``transforms``: a mixin's name, shared
    by every optimizer it was mixed into, so ClipSGD's state (gradient units) loaded into ClipSGDMomentum (lr units)
    and stepped 0.92 instead of 0.029 (the review of the twenty-fifth session)."""
    p = torch.nn.Parameter(torch.ones(3))
    clip_sgd = _ClipSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    clip_sgd.step()
    with pytest.raises(ValueError, match="saved by _ClipSGD, "):
        _ClipSGDMomentum([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).load_state_dict(
            clip_sgd.state_dict())
    with pytest.raises(ValueError, match="saved by _ClipSGD, "):
        SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).load_state_dict(clip_sgd.state_dict())
    _SubClipSGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).load_state_dict(
        copy.deepcopy(clip_sgd.state_dict()))  # keeps ClipSGD's chain: its kind


def test_an_adam_subclass_with_its_own_chain_refuses_adams_state_and_adamw_still_loads_it():
    """Adam's ``state_kind = "Adam"`` (so that AdamW loaded Adam's state) was inherited by subclasses that change
    the chain: AscentAdam loaded Adam's state and Adam AscentAdam's. AdamW now shares Adam's kind by the rule."""
    p = torch.nn.Parameter(torch.ones(3))
    adam = Adam([p], lr=0.1, decay="decoupled_lr")
    p.grad = torch.ones(3)
    adam.step()
    with pytest.raises(ValueError, match="saved by Adam, "):
        _AscentAdam([torch.nn.Parameter(torch.ones(3))], lr=0.1, decay="decoupled_lr").load_state_dict(
            adam.state_dict())
    AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1).load_state_dict(copy.deepcopy(adam.state_dict()))
    assert adam.state_dict()[STATE_KIND_KEY] == AdamW([torch.nn.Parameter(torch.ones(1))]).state_dict()[
        STATE_KIND_KEY] == "Adam"


def test_the_nan_check_reads_every_groups_gradients_at_once(monkeypatch):
    """One check (one read-back per device) per step, not one per group: with 30 small groups the per-group
    read-backs made the default step 1.6× slower than nonfinite="propagate" (5.8 against 2.9 ms)."""
    from theorylab.optim import base

    calls = []
    real = base._all_finite
    monkeypatch.setattr(base, "_all_finite", lambda tensors: calls.append(len(tensors)) or real(tensors))
    params = [torch.nn.Parameter(torch.randn(2)) for _ in range(30)]
    opt = Adam([{"params": [p]} for p in params], lr=0.1)
    for p in params:
        p.grad = torch.ones(2)
    opt.step()
    assert calls == [30]


@pytest.mark.parametrize("policies, nan_in, expected", [
    (("propagate", "skip", "raise"), (0, 1, 2), "group 2"),  # group 0's NaN would propagate; the raise wins
    (("skip", "propagate", "skip"), (0, 1, 2), "skip"),
    (("raise", "raise", "skip"), (1, 2), "group 1"),
])
def test_mixed_policies_find_the_group_with_the_nonfinite_gradient(policies, nan_in, expected):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in policies]
    opt = SGD([{"params": [p], "nonfinite": policy} for p, policy in zip(params, policies, strict=True)], lr=0.1)
    for i, p in enumerate(params):
        p.grad = torch.tensor([1.0, math.nan]) if i in nan_in else torch.ones(2)
    if expected == "skip":
        opt.step()
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(NonFiniteGradientError, match=f"parameter {expected},"):
            opt.step()
        assert opt.skipped_steps == 0
    assert all(torch.equal(p.detach(), torch.zeros(2)) for p in params)


def test_the_nan_check_of_groups_of_mixed_dtypes_reads_back_once_and_converts_nothing():
    """Groups of bfloat16, float32, float64 and complex gradients: one read-back, and no sum converted to a common
    dtype (converting every sum to float64 made the check 2-3x slower once groups were checked together)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from theorylab.optim.base import _all_finite

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    grads = [torch.ones(3, dtype=dtype) for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.complex64)]
    with Ops() as ops:
        assert _all_finite(grads)
    assert ops.names.count("_local_scalar_dense.default") == 1
    assert not [name for name in ops.names if name.startswith("_to_copy")]
    for i, bad in enumerate((math.nan, math.inf, -math.inf, complex(0, math.nan))):
        broken = [g.clone() for g in grads]
        broken[i if i < 3 else 3][0] = bad
        assert not _all_finite(broken)


def test_complex32_parameters_step_with_the_default_nan_check():
    """torch has no sum of complex32 on the CPU: the default step failed with NotImplementedError ("sum_cpu")."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex32))
    opt = SGD([p], lr=0.5)
    p.grad = torch.ones(3, dtype=torch.complex32)
    opt.step()
    assert torch.equal(torch.view_as_real(p.detach()).float(), torch.tensor([[0.5, 0.0]] * 3))
    p.grad = torch.tensor([1, complex(math.nan, 0), 1], dtype=torch.complex32)
    with pytest.raises(NonFiniteGradientError, match=r"index\(es\) \[0\]"):
        opt.step()


def test_a_step_reads_every_step_count_at_once(monkeypatch):
    """A `+= 1` and an `.item()` per parameter made a small model's step ~40 µs slower than torch's: the counts
    are advanced by one op and read together; each keeps its own value."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    late = torch.nn.Parameter(torch.zeros(3))
    opt = Adam([{"params": list(model.parameters())}, {"params": [late]}], lr=0.1, nonfinite="propagate")
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    late.grad = torch.ones(3)
    reads, adds, real_item, real_add = [], [], torch.Tensor.item, torch._foreach_add_
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or real_item(t))
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: adds.append(a) or real_add(*a, **k))
    opt.step()
    counts = [opt.state[p]["step"] for p in [*model.parameters(), late]]
    assert not reads and len([a for a in adds if any(x is counts[0] for x in a[0])]) == 1
    assert [int(opt.state[p]["step"]) for p in model.parameters()] == [2] * 4 and int(opt.state[late]["step"]) == 1
    opt.state[late]["step"] = torch.tensor(1.0, dtype=torch.float64)  # loaded by hand in another dtype: still counted
    opt.step()
    assert float(opt.state[late]["step"]) == 2.0 and int(opt.state[model[0].weight]["step"]) == 3


def test_a_step_count_set_by_hand_to_a_numpy_number_still_counts():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step"] = np.float64(5)
    opt.step()
    assert opt.state[p]["step"] == 6


def test_a_lazily_conjugated_complex_gradient_steps_as_its_resolved_value():
    """A model using p.conj() gets a gradient with the conjugate bit set, which view_as_real refuses: every
    optimizer failed where torch.optim.SGD steps it."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    (p.conj() * torch.tensor([1j, 2, 3])).real.sum().backward()
    assert p.grad.is_conj()
    ref = torch.nn.Parameter(p.detach().clone())
    ref.grad = p.grad.resolve_conj()
    SGD([p], lr=0.5).step()
    torch.optim.SGD([ref], lr=0.5).step()
    assert torch.equal(p.detach(), ref.detach())
    fused, chain = (torch.nn.Parameter(torch.ones(3, dtype=torch.complex64)) for _ in range(2))
    fused.grad, chain.grad = p.grad, p.grad.resolve_conj()
    Adam([fused], lr=0.1, fused=True).step()  # the kernel's path too
    Adam([chain], lr=0.1).step()
    torch.testing.assert_close(fused.detach(), chain.detach())
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.complex32))
    q.grad = torch.tensor([1, 2, 3], dtype=torch.complex32).conj()
    Adam([q], lr=0.1).step()  # the NaN check's sum of complex32 too


def test_a_meta_gradient_beside_a_nan_is_left_out_of_the_error():
    """The error's index scan read the meta gradient's values (RuntimeError: Tensor.item() cannot be called on
    meta tensors) instead of raising NonFiniteGradientError."""
    real, meta = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))
    real.grad, meta.grad = torch.tensor([1.0, math.nan]), torch.zeros(2, device="meta")
    with pytest.raises(NonFiniteGradientError, match=r"index\(es\) \[1\]"):
        SGD([meta, real], lr=0.1).step()
