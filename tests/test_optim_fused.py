"""``Adam(fused=True)``: torch's fused kernel against the chain, which is the definition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from optim_helpers import make_problem, single_thread  # noqa: F401 (an autouse fixture)

from theorylab.optim import Adam, AdamW, NonFiniteGradientError

STEPS = 100
HYPER = {"decoupled": 1e-2, "decoupled_lr": 5e-2, "l2": 1e-2}  # λ per mode: each decay visibly matters


def cosine(steps: int):
    return lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch, steps) / steps))


def train(decay: str, fused: bool, dtype: torch.dtype = torch.float32, steps: int = STEPS, lr: float = 1e-2):
    params, loss_fn = make_problem(dtype)
    opt = Adam(params, lr=lr, weight_decay=HYPER[decay], decay=decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
        sched.step()
    return params, opt


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


def run_steps(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("decay", ["l2", "decoupled", "decoupled_lr"])
def test_fused_agrees_with_chain(decay, dtype, tol):
    chain_params, chain_opt = train(decay, fused=False, dtype=dtype)
    fused_params, fused_opt = train(decay, fused=True, dtype=dtype)
    assert max_diff(chain_params, fused_params) <= tol
    start, _ = make_problem(dtype)
    assert max_diff(start, chain_params) > 1e-2  # the run went somewhere: the agreement is not vacuous
    for p, q in zip(chain_params, fused_params, strict=True):
        a, b = chain_opt.state[p], fused_opt.state[q]
        assert set(a) == set(b) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(a["step"], b["step"]) and b["step"].dtype == torch.float32 and float(b["step"]) == STEPS
        assert float((a["exp_avg"] - b["exp_avg"]).abs().max()) <= tol
        assert float((a["exp_avg_sq"] - b["exp_avg_sq"]).abs().max()) <= tol


def test_decoupled_multiplier_follows_the_schedule():
    """lr -> 0 freezes the decay of "decoupled" too (λ/lr0 times lr), in the fused path as in the chain."""
    params, loss_fn = make_problem()
    opt = Adam(params, lr=1e-2, weight_decay=0.5, decay="decoupled", fused=True)
    run_steps(opt, params, loss_fn, 2)
    opt.param_groups[0]["lr"] = 0.0
    frozen = [p.detach().clone() for p in params]
    run_steps(opt, params, loss_fn, 2)
    assert all(torch.equal(a, b) for a, b in zip(frozen, params, strict=True))


def test_decoupled_with_zero_initial_lr_runs_the_chain():
    """initial_lr == 0: the chain's multiplier is 1, which the kernel cannot express; the group uses the chain."""
    results = []
    for fused in (False, True):
        params, loss_fn = make_problem()
        opt = Adam(params, lr=0.0, weight_decay=0.1, decay="decoupled", fused=fused)
        opt.param_groups[0]["lr"] = 1e-2
        run_steps(opt, params, loss_fn, 3)
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_fused_is_torch_adamw_fused(weight_decay):
    params, loss_fn = make_problem()
    ref_params, _ = make_problem()
    ours = AdamW(params, lr=1e-2, weight_decay=weight_decay, fused=True)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=weight_decay, fused=True)
    run_steps(ours, params, loss_fn, 20)
    run_steps(ref, ref_params, loss_fn, 20)
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))
    for p, q in zip(params, ref_params, strict=True):
        assert all(torch.equal(ours.state[p][k], ref.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_adam_l2_fused_is_torch_adam_fused():
    params, loss_fn = make_problem()
    ref_params, _ = make_problem()
    ours = Adam(params, lr=1e-2, weight_decay=0.05, fused=True)
    ref = torch.optim.Adam(ref_params, lr=1e-2, weight_decay=0.05, fused=True)
    run_steps(ours, params, loss_fn, 20)
    run_steps(ref, ref_params, loss_fn, 20)
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))


@pytest.mark.parametrize(("saved_fused", "loaded_fused"), [(True, False), (False, True)])
def test_state_dict_resumes_across_fused_and_chain(saved_fused, loaded_fused):
    def factory(ps, fused):
        return Adam(ps, lr=1e-2, weight_decay=1e-2, decay="decoupled", fused=fused)

    params, loss_fn = make_problem()
    opt = factory(params, saved_fused)
    run_steps(opt, params, loss_fn, 10)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run_steps(opt, params, loss_fn, 15)

    params2, loss_fn2 = make_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params, strict=True):
            p.copy_(s)
    opt2 = factory(params2, loaded_fused)
    opt2.load_state_dict(saved_state)
    assert opt2.param_groups[0]["fused"] is loaded_fused  # the loading optimizer's choice, not the saved one
    run_steps(opt2, params2, loss_fn2, 15)
    assert max_diff(params, params2) <= 1e-5
    assert all(float(opt2.state[p]["step"]) == 25 for p in params2)


def test_nonfinite_raise_changes_nothing():
    params, loss_fn = make_problem()
    opt = Adam(params, lr=1e-2, weight_decay=1e-2, fused=True)
    run_steps(opt, params, loss_fn, 2)
    params_before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn(params).backward()
    params[2].grad[0, 1] = math.nan
    with pytest.raises(NonFiniteGradientError, match=r"parameter index\(es\) \[2\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params_before, params, strict=True))
    after = opt.state_dict()["state"]
    for i, s in state_before["state"].items():
        assert all(torch.equal(v, after[i][k]) for k, v in s.items()), i


def test_nonfinite_skip_changes_nothing():
    params, loss_fn = make_problem()
    opt = AdamW(params, lr=1e-2, nonfinite="skip", fused=True)
    run_steps(opt, params, loss_fn, 2)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.full_like(p, math.inf)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    after = opt.state_dict()["state"]
    assert all(torch.equal(v, after[i][k]) for i, s in state_before["state"].items() for k, v in s.items())


def test_params_without_grads_are_skipped_and_keep_their_own_step_count():
    """The late parameter starts at step 1 while the others are at 4: per-parameter bias corrections."""
    results = []
    for fused in (False, True):
        params, loss_fn = make_problem()
        late = torch.randn(5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        opt = Adam([*params, late], lr=1e-2, weight_decay=1e-2, fused=fused)
        run_steps(opt, params, loss_fn, 3)
        assert late not in opt.state or not opt.state[late]
        run_steps(opt, [*params, late], lambda ps, f=loss_fn: f(ps[:4]) + (ps[4] ** 2).sum(), 2)
        assert float(opt.state[late]["step"]) == 2 and float(opt.state[params[0]]["step"]) == 5
        results.append([*params, late])
    assert max_diff(*results) <= 1e-6


def test_non_contiguous_parameter_falls_back_to_the_chain():
    """The kernel walks memory linearly: a transposed parameter with a contiguous gradient must not reach it."""
    results = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(4, 6, generator=gen).t().requires_grad_()  # strides (1, 6)
        g = torch.randn(6, 4, generator=gen)  # contiguous
        opt = AdamW([p], lr=0.1, fused=fused)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("bad", ["yes", 2, -1, 1.0])  # 0, 1 and None (torch's default) are accepted, as by torch
def test_invalid_fused_values_raise(bad):
    params, _ = make_problem()
    with pytest.raises(ValueError, match="Invalid fused value"):
        Adam(params, fused=bad)
    with pytest.raises(ValueError, match="Invalid fused value"):
        AdamW(params, fused=bad)
    opt = Adam(params[:2])
    with pytest.raises(ValueError, match="Invalid fused value"):
        opt.add_param_group({"params": params[2:], "fused": bad})
    assert len(opt.param_groups) == 1


def test_unsupported_dtype_raises_naming_it():
    """float8 is floating point but not among the kernel's dtypes (complex ones are: as their real views)."""
    z = torch.zeros(3, dtype=torch.float8_e4m3fn, requires_grad=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        AdamW([z], fused=True)
    params, _ = make_problem()
    opt = Adam(params, fused=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    chain = Adam([z], fused=False)  # the chain takes it, and refuses its gradient at the step (torch lacks float8 ops)
    z.grad = torch.zeros(3, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        chain.step()
    Adam([torch.zeros(3, dtype=torch.complex128, requires_grad=True)], fused=True)


def test_fused_none_is_torch_default_the_chain():
    params, _ = make_problem()
    opt = Adam(params[:2], fused=None)
    opt.add_param_group({"params": params[2:], "fused": None})
    assert [g["fused"] for g in opt.param_groups] == [False, False]


@pytest.mark.parametrize("decay", ["l2", "decoupled", "decoupled_lr"])
def test_fused_calls_torch_2_4_signatures(decay, monkeypatch):
    """torch < 2.7's functional adam() has no decoupled_weight_decay keyword: fused decoupled decay raised
    TypeError there. Here adam() is made to refuse it, as it did."""
    from theorylab.optim import adam as ours

    real = ours.torch_adam

    def adam_2_4(*args, **kwargs):
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("adam() got an unexpected keyword argument 'decoupled_weight_decay'")
        return real(*args, **kwargs)

    monkeypatch.setattr(ours, "torch_adam", adam_2_4)
    fused, _ = train(decay, fused=True, steps=10)
    chain, _ = train(decay, fused=False, steps=10)
    assert max_diff(fused, chain) < 1e-5
