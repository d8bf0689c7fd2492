"""torch.optim's ``maximize`` (SGD, Adam, AdamW) and ``amsgrad`` (Adam, AdamW): parity with torch.optim on the
chain and the fused path, state that resumes, and old checkpoints that load."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from optim_helpers import make_problem, single_thread  # noqa: F401 (an autouse fixture)
from test_optim_parity import STEPS, TOL, max_diff, trajectory

from theorylab.optim import SGD, Adam, AdamW, SGDMomentum
from theorylab.optim.transforms import Negate, StepContext, chain_step


def _ids(kwargs: dict) -> str:
    return ",".join(f"{a}={b}" for a, b in kwargs.items())


SGD_CASES = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=0.05),
    dict(lr=0.02, momentum=0.9, weight_decay=0.01),
    dict(lr=0.02, momentum=0.9, dampening=0.3),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=_ids)
def test_sgd_maximize_matches_torch(kwargs):
    ours = trajectory(lambda p: SGD(p, maximize=True, **kwargs))
    ref = trajectory(lambda p: torch.optim.SGD(p, maximize=True, **kwargs))
    assert max_diff(ours, ref) <= TOL
    descent = trajectory(lambda p: SGD(p, **kwargs), steps=2)
    assert float((ours[1] - descent[1]).abs().max()) > 1e-3  # the switch is not ignored


ADAM_CASES = [
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=0.05),
    dict(maximize=True),
    dict(maximize=True, weight_decay=0.05),
    dict(amsgrad=True, maximize=True, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6),
]


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=_ids)
@pytest.mark.parametrize("fused", [False, True], ids=["chain", "fused"])
def test_adam_switches_match_torch_adam(kwargs, fused):
    ours = trajectory(lambda p: Adam(p, lr=3e-3, fused=fused, **kwargs))
    ref = trajectory(lambda p: torch.optim.Adam(p, lr=3e-3, **kwargs))
    assert max_diff(ours, ref) <= TOL
    assert float((ours[-1] - ours[0]).abs().max()) > 1e-2


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=_ids)
@pytest.mark.parametrize("fused", [False, True], ids=["chain", "fused"])
def test_adamw_switches_match_torch_adamw(kwargs, fused):
    kwargs = {**kwargs, "weight_decay": kwargs.get("weight_decay", 1e-2) * 10}  # lr·λ large enough to matter
    ref = trajectory(lambda p: torch.optim.AdamW(p, lr=3e-3, **kwargs))
    assert max_diff(trajectory(lambda p: AdamW(p, lr=3e-3, fused=fused, **kwargs)), ref) <= TOL
    assert max_diff(trajectory(lambda p: Adam(p, lr=3e-3, decay="decoupled_lr", fused=fused, **kwargs)), ref) <= TOL


@pytest.mark.parametrize("decay", ["l2", "decoupled", "decoupled_lr"])
@pytest.mark.parametrize("switches", [dict(amsgrad=True), dict(maximize=True), dict(amsgrad=True, maximize=True)],
                         ids=_ids)
def test_fused_agrees_with_the_chain(decay, switches):
    make = lambda fused: lambda p: Adam(p, lr=3e-3, weight_decay=0.05, decay=decay, fused=fused,  # noqa: E731
                                        **switches)
    chain, fused = trajectory(make(False)), trajectory(make(True))
    assert max_diff(chain, fused) <= TOL
    plain = trajectory(lambda p: Adam(p, lr=3e-3, weight_decay=0.05, decay=decay), steps=STEPS)
    assert max_diff(chain, plain) > 1e-4  # the switches change the trajectory


def test_amsgrad_keeps_the_largest_second_moment():
    """Float64, against the definition: max_exp_avg_sq is the running maximum of exp_avg_sq, and the step uses it."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Adam([p], lr=0.1, betas=(0.5, 0.5), amsgrad=True)
    r_max = torch.zeros(3, dtype=torch.float64)
    for g in ([4.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        state = opt.state[p]
        r_max = torch.maximum(r_max, state["exp_avg_sq"])
        assert torch.equal(state["max_exp_avg_sq"], r_max)
    # at the third step exp_avg_sq has fallen below its maximum in every entry: the denominator is the maximum's
    assert bool((state["exp_avg_sq"] < state["max_exp_avg_sq"]).all())


def test_negate_is_exact_and_free():
    """The deferred negation flips scale and decay; applied, the step is p + lr·g exactly."""
    p = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.1, 0.2, -0.3])
    ctx = StepContext(params=[p], states=[{}], group={"lr": 0.5}, step=1)
    from theorylab.optim.transforms import ScaleByLearningRate

    chain_step([Negate(), ScaleByLearningRate()], ctx, [g])
    assert torch.equal(p, torch.tensor([1.0, -2.0, 3.0]) + 0.5 * g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.complex64], ids=str)
def test_amsgrad_and_maximize_in_other_dtypes_match_torch(dtype):
    torch.manual_seed(0)
    p0 = torch.randn(6, 5, dtype=dtype)
    grads = [torch.randn(6, 5, dtype=dtype) for _ in range(20)]

    def run(cls):
        p = torch.nn.Parameter(p0.clone())
        opt = cls([p], lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]["max_exp_avg_sq"]

    (ours, ours_max), (ref, ref_max) = run(Adam), run(torch.optim.Adam)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    assert ours_max.dtype == ref_max.dtype and ours_max.shape == ref_max.shape
    assert float((ours.to(torch.complex128) - ref.to(torch.complex128)).abs().max()) <= tol
    assert float((ours_max.to(torch.complex128) - ref_max.to(torch.complex128)).abs().max()) <= tol


def _run(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()


@pytest.mark.parametrize("saved_fused, loaded_fused", [(False, False), (False, True), (True, False)])
def test_amsgrad_state_resumes_bit_identically(saved_fused, loaded_fused):
    def fresh(fused):
        params, loss_fn = make_problem()
        return params, loss_fn, Adam(params, lr=3e-3, weight_decay=0.05, amsgrad=True, maximize=True, fused=fused)

    params, loss_fn, opt = fresh(saved_fused)
    _run(opt, params, loss_fn, 5)
    saved, at = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    assert all("max_exp_avg_sq" in s for s in saved["state"].values())
    _run(opt, params, loss_fn, 5)
    straight = [p.detach().clone() for p in params]

    resumed, loss_fn2, opt2 = fresh(loaded_fused)
    with torch.no_grad():
        for p, v in zip(resumed, at, strict=True):
            p.copy_(v)
    opt2.load_state_dict(saved)
    _run(opt2, resumed, loss_fn2, 5)
    same_path = saved_fused == loaded_fused
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b) if same_path else float((a - b.detach()).abs().max()) <= 1e-6


def test_amsgrad_switched_on_later_starts_its_maximum_at_the_current_moment():
    params, loss_fn = make_problem()
    opt = Adam(params, lr=3e-3)
    _run(opt, params, loss_fn, 3)
    opt.param_groups[0]["amsgrad"] = True
    _run(opt, params, loss_fn, 1)
    for p in params:
        assert torch.equal(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_a_checkpoint_saved_before_the_switches_existed_loads_with_them_off(cls):
    params, loss_fn = make_problem()
    opt = cls(params, lr=1e-2)
    _run(opt, params, loss_fn, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("maximize")
        group.pop("amsgrad", None)
    loaded = cls(params, lr=1e-2, maximize=True)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["maximize"] is False  # what that run was trained with
    _run(loaded, params, loss_fn, 1)


@pytest.mark.parametrize("resume", ["deepcopy", "pickle", "load_state_dict"])
def test_maximize_default_survives_a_resume_for_groups_added_later(resume):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = Adam(a.parameters(), lr=1e-2, maximize=True, amsgrad=True)
    if resume == "deepcopy":
        opt = copy.deepcopy(opt)
    elif resume == "pickle":
        opt = pickle.loads(pickle.dumps(opt))
    else:
        opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": list(b.parameters())})
    assert opt.param_groups[1]["maximize"] is True and opt.param_groups[1]["amsgrad"] is True


@pytest.mark.parametrize("cls, key", [(SGD, "maximize"), (Adam, "maximize"), (Adam, "amsgrad"),
                                      (AdamW, "amsgrad")])
@pytest.mark.parametrize("bad", ["yes", 2, None])
def test_bad_switch_values_raise_naming_them(cls, key, bad):
    with pytest.raises(ValueError, match=f"Invalid {key} value"):
        cls([torch.nn.Parameter(torch.ones(2))], lr=0.1, **{key: bad})


def test_a_bad_switch_written_into_a_group_is_caught_at_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = Adam([p], lr=0.1)
    opt.param_groups[0]["amsgrad"] = "on"
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="Invalid amsgrad value: 'on'"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(2)) and not opt.state[p]


def test_sgd_has_no_amsgrad_as_in_torch():
    with pytest.raises(TypeError, match="unexpected keyword argument 'amsgrad'"):
        SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, amsgrad=True)


def test_a_switch_on_that_the_loading_optimizer_lacks_is_refused():
    """An SGD(maximize=True) state saved as DCP saves it (no kind key) had loaded into SGDMomentum, which descends."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    opt = SGD([p], lr=0.1, maximize=True)
    opt.step()
    saved = opt.state_dict()
    unmarked = {"state": saved["state"], "param_groups": saved["param_groups"]}
    target = SGDMomentum([p], lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="parameter group 0 has maximize=True, which SGDMomentum does not"):
        target.load_state_dict(unmarked)
    unmarked["param_groups"][0]["maximize"] = False  # off, the group is still SGD's (dampening, nesterov, ...)
    with pytest.raises(ValueError, match="has 'dampening', 'nesterov', 'weight_decay', 'decay', which SGDMomentum"):
        target.load_state_dict(unmarked)


def test_an_optimizer_pickled_before_the_switches_existed_runs_with_them_off():
    """Pickled by an older version: groups and defaults without the keys; transforms() had raised KeyError."""
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for make in (lambda ps: Adam(ps, lr=1e-2, amsgrad=True), lambda ps: SGD(ps, lr=1e-2, maximize=True)):
        opt = make(list(a.parameters()))
        state = opt.__getstate__()
        for d in (state["defaults"], *state["param_groups"]):
            d.pop("maximize")
            d.pop("amsgrad", None)
        old = type(opt).__new__(type(opt))
        old.__setstate__(state)
        assert not any(isinstance(t, Negate) for t in old.transforms(old.param_groups[0]))
        old.add_param_group({"params": list(b.parameters())})
        assert all(g["maximize"] is False for g in old.param_groups)
        if isinstance(old, Adam):
            assert all(g["amsgrad"] is False for g in old.param_groups)
