"""Regressions found by the twentieth session's bug hunt of the optimizers: torch.optim's switches inside a parameter
group, the count of skipped steps across copies and checkpoints, and decoupled decay at lr 0."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from theorylab.optim import SGD, Adam, AdamW
from theorylab.optim.base import SKIPPED_STEPS_KEY, _all_finite

F64 = torch.float64


def _steps(opt, params, n=3):
    for _ in range(n):
        for p in params:
            p.grad = torch.full_like(p, 10.0)
        opt.step()


@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_a_groups_decoupled_weight_decay_is_torchs_adamw_convention(where):
    """torch.optim.Adam reads ``decoupled_weight_decay`` per group; ours kept it as an unknown key and ran L2
    (0.7000 against torch's 0.5721 after 3 steps)."""
    ours_p = torch.ones(3, dtype=F64, requires_grad=True)
    ref_p = ours_p.detach().clone().requires_grad_()
    group = lambda p: {"params": [p], "decoupled_weight_decay": True}  # noqa: E731
    if where == "constructor":
        ours = Adam([group(ours_p)], lr=0.1, weight_decay=0.5)
    else:
        ours = Adam([torch.zeros(1, requires_grad=True)], lr=0.1, weight_decay=0.5)
        ours.add_param_group(group(ours_p))
    ref = torch.optim.AdamW([ref_p], lr=0.1, weight_decay=0.5)
    _steps(ours, [ours_p])
    _steps(ref, [ref_p])
    assert ours.param_groups[-1]["decay"] == "decoupled_lr"
    assert "decoupled_weight_decay" not in ours.param_groups[-1]
    torch.testing.assert_close(ours_p, ref_p, atol=1e-15, rtol=0)


def test_a_groups_decoupled_weight_decay_false_is_l2_and_a_contradiction_is_refused():
    p = torch.ones(3, requires_grad=True)
    opt = AdamW([{"params": [p], "decoupled_weight_decay": False}], lr=0.1, weight_decay=0.5)
    assert opt.param_groups[0]["decay"] == "l2"
    with pytest.raises(ValueError, match="contradicts decay='decoupled'"):
        Adam([{"params": [p], "decoupled_weight_decay": True, "decay": "decoupled"}])


@pytest.mark.parametrize(("make", "key"), [(lambda g: Adam(g), "capturable"), (lambda g: Adam(g), "differentiable"),
                                           (lambda g: SGD(g, lr=0.1), "fused"),
                                           (lambda g: SGD(g, lr=0.1), "differentiable")])
def test_a_torch_switch_on_in_a_group_is_refused_as_the_keyword_is(make, key):
    """As keywords these raise when on; in a group they had been accepted and ignored."""
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=f"{key}=True is not implemented"):
        make([{"params": [p], key: True}])
    opt = make([{"params": [p], key: False, "foreach": True}])  # off (and foreach at any value): accepted
    assert key not in opt.param_groups[0] and "foreach" not in opt.param_groups[0]


def test_a_group_with_torchs_switches_off_still_loads_its_own_state_dict():
    """Two of torch's keys kept in a group made our state_dict, saved without its kind key (as DCP, FSDP and ZeRO
    save one: "state" and "param_groups" only), read as torch.optim's, which is refused on load."""
    p = torch.ones(3, requires_grad=True)
    opt = Adam([{"params": [p], "foreach": False, "differentiable": False}], lr=0.1)
    _steps(opt, [p], 1)
    saved = opt.state_dict()
    Adam([p], lr=0.1).load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]})


def _skipping_optimizer():
    p = torch.ones(3, requires_grad=True)
    opt = Adam([p], lr=0.1, nonfinite="skip")
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    p.grad = torch.ones(3)
    opt.step()
    return opt, p


def test_the_count_of_skipped_steps_survives_copies_and_checkpoints():
    """deepcopy, pickle and state_dict dropped it: a copied or resumed optimizer counted from 0 again."""
    opt, p = _skipping_optimizer()
    assert opt.skipped_steps == 1
    assert copy.deepcopy(opt).skipped_steps == 1 and pickle.loads(pickle.dumps(opt)).skipped_steps == 1
    state = opt.state_dict()
    assert state[SKIPPED_STEPS_KEY] == 1
    fresh = Adam([torch.ones(3, requires_grad=True)], lr=0.1, nonfinite="skip")
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 1
    older = {k: v for k, v in state.items() if k != SKIPPED_STEPS_KEY}  # saved before the count was kept
    fresh.load_state_dict(older)
    assert fresh.skipped_steps == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_a_skipped_steps_entry_that_is_not_a_count_is_refused(bad):
    opt, _ = _skipping_optimizer()
    state = {**opt.state_dict(), SKIPPED_STEPS_KEY: bad}
    with pytest.raises(ValueError, match="not a count"):
        opt.load_state_dict(state)
    assert opt.skipped_steps == 1  # nothing loaded


def test_decoupled_decay_leaves_a_group_at_lr_zero_alone():
    """lr 0 (a frozen group) gave the schedule multiplier 1 where lr₀ was 0 too, so the frozen weights decayed by
    λ every step; torch's AdamW, whose decay is λ·lr, leaves them."""
    for make in (lambda p: Adam([p], lr=0.0, weight_decay=0.1, decay="decoupled"),
                 lambda p: SGD([p], lr=0.0, weight_decay=0.1, decay="decoupled"),
                 lambda p: Adam([p], lr=0.0, weight_decay=0.1, decay="decoupled", fused=True)):
        p = torch.nn.Parameter(torch.ones(3))
        _steps(make(p), [p])
        assert torch.equal(p.detach(), torch.ones(3))
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.0, weight_decay=0.1, decay="decoupled")
    opt.param_groups[0]["lr"] = 1e-3  # a warm-up written by hand from 0: the multiplier is 1, as before
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))


def test_the_finite_check_still_finds_a_nan_in_any_tensor():
    """The check now reads each device apart (one stack over the per-gradient sums fails for a group on two
    devices). Only a GPU can show the two-device case (tests/test_cuda.py); here, on one device, the regrouping
    must still find a NaN in any tensor of any dtype."""
    ts = [torch.ones(4), torch.ones(2, dtype=F64), torch.ones(3, dtype=torch.bfloat16)]
    assert _all_finite(ts)
    for i in range(3):
        bad = [t.clone() for t in ts]
        bad[i][0] = float("nan")
        assert not _all_finite(bad)
    assert _all_finite([torch.ones(3, device="meta")])  # no values to check


def test_the_callers_group_dict_keeps_its_torch_keys():
    """They were popped from the dict passed in: the same dict given to torch.optim.Adam then ran L2 there, and a
    group refused once went through on a retry."""
    p = torch.ones(3, requires_grad=True)
    group = {"params": [p], "decoupled_weight_decay": True, "foreach": False}
    Adam([group], lr=0.1, weight_decay=0.5)
    assert group == {"params": [p], "decoupled_weight_decay": True, "foreach": False}
    bad = {"params": [torch.ones(2, requires_grad=True)], "capturable": True}
    opt = Adam([p], lr=0.1)
    for _ in range(2):
        with pytest.raises(ValueError, match="capturable=True"):
            opt.add_param_group(bad)


def test_a_groups_torch_flag_cannot_silently_replace_the_papers_decoupled_decay():
    """decay="decoupled" as the optimizer's, with a group's decoupled_weight_decay=True: the group ran
    "decoupled_lr" (λ·lr per step instead of λ); the keyword pair is refused, and so is this one."""
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="contradicts decay='decoupled'"):
        Adam([{"params": [p], "decoupled_weight_decay": True}], lr=0.1, weight_decay=0.5, decay="decoupled")


@pytest.mark.parametrize("how", ["by hand", "loaded"])
def test_a_torch_switch_that_reaches_a_group_after_it_was_added_is_refused(how):
    """Checked only when a group was added: written into param_groups, or loaded, it was ignored (the group ran
    L2 under decoupled_weight_decay=True)."""
    p = torch.ones(3, requires_grad=True)
    opt = Adam([p], lr=0.1, weight_decay=0.5)
    for key, message in (("decoupled_weight_decay", "contradicts the group's decay='l2'"),
                         ("capturable", "capturable=True is not implemented")):
        p.grad = torch.ones(3)
        if how == "by hand":
            opt.param_groups[0][key] = True
            with pytest.raises(ValueError, match=message):
                opt.step()
            del opt.param_groups[0][key]
        else:
            state = opt.state_dict()
            state["param_groups"][0][key] = True
            with pytest.raises(ValueError, match=message):
                opt.load_state_dict(state)
    sgd = SGD([p], lr=0.1)
    sgd.param_groups[0]["fused"] = True
    with pytest.raises(ValueError, match="fused=True is not implemented"):
        sgd.step()


def test_the_skipped_count_is_the_one_the_load_hooks_leave():
    """It was read from the dict passed in, not the one after the user's load pre-hooks and the validation."""
    opt, _ = _skipping_optimizer()
    state = opt.state_dict()
    handle = opt.register_load_state_dict_pre_hook(lambda o, s: {**s, SKIPPED_STEPS_KEY: 4})
    opt.load_state_dict(state)
    assert opt.skipped_steps == 4
    handle.remove()
    opt.register_load_state_dict_pre_hook(lambda o, s: {**s, SKIPPED_STEPS_KEY: "7"})
    with pytest.raises(ValueError, match="not a count"):
        opt.load_state_dict(state)
    assert opt.skipped_steps == 4
