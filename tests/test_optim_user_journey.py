"""What session 28's journeys found in theorylab.optim, and the documented numbers they checked."""

import math
import warnings

import pytest
import torch

from theorylab.optim import SGD, Adam


def test_fused_float16_adam_steps_are_too_long_by_the_documented_factor():
    """The docs said 1.4×, 9.8× and 31× at steps 2, 100 and 1000 for fused float16 Adam, whose stored second
    moment stays 0; 31× was float16 rounding of an accumulated parameter (2⁻⁵/1e-3). Each step alone is
    √((1 − β₂ᵗ)/(1 − β₂)) too long: 1.41, 9.76, 25.1."""
    g, eps, lr, beta2 = 1e-3, 1e-7, 1e-3, 0.999
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Adam([p], lr=lr, eps=eps, fused=True)
        factors = {}
        for t in range(1, 1001):
            with torch.no_grad():
                p.zero_()  # p then holds exactly this step's update
            p.grad = torch.full((1,), g, dtype=torch.float16)
            opt.step()
            factors[t] = -float(p.detach()) / (lr * g / (g + eps))
    assert float(opt.state[p]["exp_avg_sq"]) == 0.0
    for t, documented in ((2, 1.4), (100, 9.8), (1000, 25.0)):
        expected = math.sqrt((1 - beta2**t) / (1 - beta2))
        assert factors[t] == pytest.approx(expected, rel=1e-2)  # the first moment, kept in float16, rounds too
        assert round(expected, 1) == pytest.approx(documented, abs=0.15)


@pytest.mark.parametrize("make", [lambda p: Adam([p], lr=0.1, decay="decoupled_lr", nonfinite="skip"),
                                  lambda p: SGD([p], lr=0.1, nonfinite="skip")])
def test_state_dict_post_hooks_see_the_whole_state(make):
    """The post-hooks of state_dict and load_state_dict ran before theorylab's own additions: a hook saw no
    theorylab_optimizer / theorylab_skipped_steps keys (nor Adam's decoupled_weight_decay flag) and could not
    change them, and a load post-hook read the old skipped_steps (0 where 1 was loaded)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = make(p)
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert opt.skipped_steps == 1
    seen = {}

    def post(optimizer, state_dict):
        seen["keys"] = set(state_dict)
        seen["flag"] = state_dict["param_groups"][0].get("decoupled_weight_decay")
        state_dict["param_groups"][0]["lr"] = 0.05  # a hook may change what is saved
        return state_dict

    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert {"theorylab_optimizer", "theorylab_skipped_steps"} <= seen["keys"] and saved["theorylab_skipped_steps"] == 1
    assert seen["flag"] == (True if isinstance(opt, Adam) else None)
    other = make(torch.nn.Parameter(torch.ones(2)))
    loaded = {}
    other.register_load_state_dict_post_hook(
        lambda o: loaded.update(skipped=o.skipped_steps, lr=o.param_groups[0]["lr"]))
    other.load_state_dict(saved)
    assert loaded == {"skipped": 1, "lr": 0.05} and other.skipped_steps == 1
    assert "decoupled_weight_decay" not in other.param_groups[0]
    opt.register_state_dict_post_hook(lambda o, sd: None)  # a hook that returns nothing keeps the dict
    assert opt.state_dict()["theorylab_skipped_steps"] == 1


def _dcp_form(opt):
    """The state as torch.distributed.checkpoint hands it back: without theorylab's top-level keys."""
    saved = opt.state_dict()
    return {"state": saved["state"], "param_groups": saved["param_groups"]}


def test_an_sgd_state_without_its_kind_is_refused_by_sgd_momentum():
    """Saved through torch.distributed.checkpoint (which drops the kind key), momentum SGD's state loaded into
    SGDMomentum without a word, and its next step was 1/lr times too long (its buffer is in gradient units,
    SGDMomentum's in lr·gradient units). Its groups' hyperparameters now say whose it is."""
    from theorylab.optim import RunningAverageSGD, SGDMomentum

    def trained(make):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make([p])
        for _ in range(3):
            p.grad = torch.tensor([1.0, -2.0, 0.5])
            opt.step()
        return opt

    sgd = trained(lambda ps: SGD(ps, lr=0.01, momentum=0.9))
    with pytest.raises(ValueError, match="has 'dampening', 'nesterov', 'weight_decay', 'decay', which SGDMomentum"):
        SGDMomentum([torch.nn.Parameter(torch.ones(3))], lr=0.01, momentum=0.9).load_state_dict(_dcp_form(sgd))
    # each optimizer still takes its own state in that form
    for make in (lambda ps: SGD(ps, lr=0.01, momentum=0.9), lambda ps: SGDMomentum(ps, lr=0.01, momentum=0.9),
                 lambda ps: RunningAverageSGD(ps, lr=0.01, beta=0.9), lambda ps: Adam(ps, lr=0.01)):
        source = trained(make)
        target = make([torch.nn.Parameter(torch.ones(3))])
        target.load_state_dict(_dcp_form(source))
        assert torch.equal(next(iter(target.state.values()))["step"], next(iter(source.state.values()))["step"])


def test_state_dict_called_inside_a_hook_keeps_the_outer_call_whole():
    """The first version installed its hook under one key per optimizer: state_dict() called inside a pre-hook
    removed the outer call's hook, whose dict then lacked theorylab's keys (and Adam's decoupled_weight_decay,
    which torch.optim.Adam needs to load a "decoupled_lr" run as such) and loaded without a word (the review)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = Adam([p], lr=0.1, decay="decoupled_lr", nonfinite="skip")
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    inner, calls = [], []

    def pre(o):
        if not calls:  # once: the inner call runs this hook too
            calls.append("state_dict")
            inner.append(o.state_dict())

    def load_pre(o, state_dict):
        if len(calls) == 1:
            calls.append("load_state_dict")
            inner.append(o.state_dict())

    opt.register_state_dict_pre_hook(pre)
    opt.register_load_state_dict_pre_hook(load_pre)
    outer = opt.state_dict()
    for saved in (outer, inner[0]):
        assert saved["theorylab_skipped_steps"] == 1 and saved["param_groups"][0]["decoupled_weight_decay"] is True
    opt.load_state_dict(outer)
    assert opt.skipped_steps == 1 and inner[1]["theorylab_skipped_steps"] == 1
    assert not any(isinstance(k, str) for hooks in (opt._optimizer_state_dict_post_hooks,
                                                   opt._optimizer_load_state_dict_pre_hooks,
                                                   opt._optimizer_load_state_dict_post_hooks) for k in hooks)
