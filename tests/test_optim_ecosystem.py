"""Optimizers in PyTorch's own workflows (found by a review that compared each with torch.optim).

* After a resume (load_state_dict, deepcopy, unpickling) torch's ``__setstate__`` put "differentiable" into
  ``defaults``; a group added later carried it, and a state_dict saved without our kind key (DCP, FSDP, ZeRO keep
  only "state" and "param_groups") was then refused as "a torch.optim state_dict".
* torch.optim's positional order differs after the first hyperparameters; a torch argument given by position
  that lands on ``decay`` says so.
"""

import copy
import pickle

import pytest
import torch

from theorylab.optim import SGD, Adam, AdamW, RunningAverageSGD, SGDMomentum

MAKERS = {
    "Adam": lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3, decay="decoupled"),
    "AdamW": lambda ps: AdamW(ps, lr=1e-2),
    "SGD": lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "SGDMomentum": lambda ps: SGDMomentum(ps, lr=0.1, momentum=0.9),
    "RunningAverageSGD": lambda ps: RunningAverageSGD(ps, lr=0.1, beta=0.9),
}
RESUMES = {
    "load_state_dict": lambda opt: (opt.load_state_dict(opt.state_dict()), opt)[1],
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
}


def _step(opt, params):
    opt.zero_grad()
    sum((p**2).sum() for p in params).backward()
    opt.step()


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("resume", list(RESUMES))
def test_group_added_after_a_resume_saves_a_state_that_loads(name, resume):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = MAKERS[name](list(a.parameters()))
    _step(opt, list(a.parameters()))
    opt = RESUMES[resume](opt)
    params_a = [p for g in opt.param_groups for p in g["params"]]
    opt.add_param_group({"params": list(b.parameters())})  # e.g. unfreezing a layer
    assert not any(k in g for g in opt.param_groups for k in ("differentiable", "foreach", "capturable"))
    _step(opt, params_a + list(b.parameters()))
    saved = opt.state_dict()
    consolidated = {"state": saved["state"], "param_groups": saved["param_groups"]}  # what DCP returns
    fresh = MAKERS[name](params_a)
    fresh.add_param_group({"params": list(b.parameters())})
    fresh.load_state_dict(consolidated)
    assert fresh.state_dict()["state"].keys() == saved["state"].keys()


def test_a_leftover_differentiable_key_alone_is_not_taken_for_torch():
    """Checkpoints written before the fix carry it in added groups; they still load."""
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = Adam(p, lr=1e-2)
    saved = opt.state_dict()
    saved = {"state": saved["state"], "param_groups": [{**g, "differentiable": False} for g in saved["param_groups"]]}
    Adam(p, lr=1e-2).load_state_dict(saved)


@pytest.mark.parametrize("torch_opt, ours", [
    (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: Adam(p, lr=1e-2)),  # AdamW's decay is not Adam's L2
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: SGD(p, lr=0.1, momentum=0.9)),
])
def test_a_torch_optim_state_is_still_refused(torch_opt, ours):
    p = [torch.nn.Parameter(torch.ones(3))]
    saved = torch_opt(p).state_dict()
    for group in saved["param_groups"]:  # even with every hyperparameter of ours present
        group.setdefault("decay", "l2")
        group.setdefault("nonfinite", "raise")
    with pytest.raises(ValueError, match=r"looks like a torch.optim|it is a torch.optim.(Adam or )?AdamW state"):
        ours(p).load_state_dict(saved)


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, 0.1, 0.9, 0, 5e-4),  # torch.optim.SGD: dampening=0, weight_decay=5e-4
    lambda p: Adam(p, 1e-3, (0.9, 0.999), 1e-8, 0, False),  # torch.optim.Adam: amsgrad=False
])
def test_a_torch_positional_argument_landing_on_decay_is_explained(make):
    with pytest.raises(ValueError, match="by keyword") as info:
        make([torch.nn.Parameter(torch.ones(3))])
    assert "Invalid decay mode" in str(info.value)


@pytest.mark.parametrize("step_of", [int, float, lambda t: torch.tensor(int(t), dtype=torch.int64)])
@pytest.mark.parametrize("pair", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)])
def test_a_step_count_saved_as_a_number_loads_and_resumes_as_torch_does(pair, step_of):
    """torch.optim before 1.12 saved ``state["step"]`` as a number, which torch still loads; it had loaded here
    and then failed at the next step with "'int' object has no attribute 'item'", after one count had moved."""
    ours, theirs = pair
    results = []
    for cls in (ours, theirs):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
        opt = cls([p], lr=0.1, weight_decay=0.01)
        for _ in range(3):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
        saved = copy.deepcopy(opt.state_dict())
        saved["state"][0]["step"] = step_of(saved["state"][0]["step"])
        resumed = cls([p], lr=0.1, weight_decay=0.01)
        resumed.load_state_dict(saved)
        for _ in range(3):
            p.grad = torch.sin(p.detach() * 3)
            resumed.step()
        assert float(resumed.state[p]["step"]) == 6.0
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), float("inf"), "3", True, None, torch.tensor([1.0, 2.0])])
def test_a_step_count_that_is_not_a_count_is_refused_at_the_load(bad):
    p = torch.nn.Parameter(torch.randn(3))
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = bad
    fresh = SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"state of parameter 0 has step .*, not a count of steps"):
        fresh.load_state_dict(saved)
    assert fresh.state_dict()["state"] == {}


@pytest.mark.parametrize("count", [2**24 + 1, 10**39])
def test_a_step_count_beyond_float32s_exact_integers_is_refused(count):
    """10**39 had loaded as inf and failed at the next step; 2**24 + 1 rounded and never advanced."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = count
    with pytest.raises(ValueError, match=r"beyond the 2\*\*24 steps"):
        Adam([p], lr=0.1).load_state_dict(saved)
    saved["state"][0]["step"] = 2**24  # the largest exact count loads
    Adam([p], lr=0.1).load_state_dict(saved)
