"""``torch.compile(opt.step)``: the chain is traced (not skipped), equals the eager step under an lr scheduler,
compiles a bounded number of graphs, and inductor computes no power of the step count per element."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from attention_helpers import needs_cxx_compiler
from optim_helpers import make_problem
from torch._dynamo.utils import counters

from theorylab.optim import SGD, Adam, AdamW, NonFiniteGradientError, RunningAverageSGD, SGDMomentum

CASES = [
    (AdamW, {"lr": 1e-2}),
    (Adam, {"lr": 1e-2, "weight_decay": 0.1, "decay": "decoupled"}),
    (Adam, {"lr": 1e-2, "weight_decay": 0.1, "decay": "l2", "amsgrad": True, "maximize": True}),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (SGDMomentum, {"lr": 1e-2, "momentum": 0.9}),
    (RunningAverageSGD, {"lr": 1e-2, "beta": 0.9, "debias": True}),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k != 'lr')}" for cls, kw in CASES]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _run(cls, kw, steps, *, backend=None, dtype=torch.float64, grads_nan_at=None, schedule="step"):
    """Train make_problem for ``steps`` with the step eager (backend None) or compiled, under StepLR (a new lr every
    step), OneCycleLR (new lr, betas and momentum every step) or a constant lr (schedule None)."""
    params, loss_fn = make_problem(dtype)
    opt = cls(params, **kw)
    if schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    elif schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5 * kw["lr"], total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend)
    for i in range(steps):
        opt.zero_grad()  # fresh gradient tensors every step, as in training
        loss_fn(params).backward()
        if i == grads_nan_at:
            params[1].grad[0] = float("nan")
        step()
        sched.step()
    return params, opt


@pytest.mark.parametrize(("cls", "kw"), CASES, ids=IDS)
def test_compiled_step_equals_the_eager_step_under_a_scheduler(cls, kw):
    eager, _ = _run(cls, kw, 6)
    compiled, _ = _run(cls, kw, 6, backend="aot_eager")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_no_frame_of_the_step_is_skipped():
    """torch.compile's trace of an optimizer's step sets ``capturable=True`` in every group it sees, which the
    step refused with a ValueError; with that and graph breaks inside loops, torch.compile skipped frames of the
    step (6 of 42 in 12 steps) and ran them eagerly. (A constant lr: torch 2.4 specialises floats, so there
    every new lr recompiles, as for torch.optim's optimizers with a float lr.)"""
    _run(AdamW, {"lr": 1e-2}, 12, backend="aot_eager", schedule=None)
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0


@pytest.mark.parametrize(("cls", "kw", "grad", "param"), [
    (SGD, {"lr": 0.0}, [math.inf, 1.0, 2.0], [1.0, 1.0, 1.0]),  # a group frozen by lr 0: eager leaves it alone
    (SGDMomentum, {"lr": 0.0, "momentum": 0.9}, [math.inf, 1.0, 2.0], [1.0, 1.0, 1.0]),
    (SGD, {"lr": 0.1, "momentum": 0.9}, [1.0, 1.0], [math.inf, 1.0]),  # no decay: 0·inf must not poison the buffer
    (Adam, {"lr": 0.0}, [math.inf, 1.0, 2.0], [1.0, 1.0, 1.0]),  # Adam's m/denom is NaN here, eager and compiled
], ids=["SGD-lr0", "SGDMomentum-lr0", "SGD-inf-param", "Adam-lr0"])
def test_non_finite_values_under_propagate_match_the_eager_step(cls, kw, grad, param):
    """Under compile the lr and decay factors are tensors whose values are not read back: a decay or an update
    that eager skips as zero was applied as 0·inf = NaN."""
    def run(compiled):
        p = torch.tensor(param, requires_grad=True)
        opt = cls([p], **kw, nonfinite="propagate")
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(2):
            p.grad = torch.tensor(grad)
            step()
        return [p.detach(), *(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, equal_nan=True)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_the_nonfinite_policy_holds_under_compile(policy):
    kw = {"lr": 1e-2, "nonfinite": policy}
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="parameter index"):
            _run(AdamW, kw, 3, backend="aot_eager", grads_nan_at=2)
        return
    params, opt = _run(AdamW, kw, 3, backend="aot_eager", grads_nan_at=2)
    reference, _ = _run(AdamW, kw, 2)  # the skipped third step changes nothing
    assert opt.skipped_steps == 1
    for a, b in zip(reference, params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_a_state_saved_after_compiled_steps_resumes_eagerly():
    params, opt = _run(Adam, {"lr": 1e-2, "weight_decay": 0.1, "decay": "decoupled"}, 3, backend="aot_eager")
    reference, _ = _run(Adam, {"lr": 1e-2, "weight_decay": 0.1, "decay": "decoupled"}, 3)
    for a, b in zip(reference, params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    state = opt.state_dict()
    assert all(isinstance(s["step"], torch.Tensor) and float(s["step"]) == 3 for s in state["state"].values())
    fresh = Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-2, weight_decay=0.1,
                 decay="decoupled")
    fresh.load_state_dict(state)
    assert all(float(fresh.state[p]["step"]) == 3 for p in fresh.param_groups[0]["params"])


@needs_cxx_compiler
@pytest.mark.slow
@pytest.mark.parametrize(("cls", "kw", "schedule"), [
    (AdamW, {"lr": 1e-2, "weight_decay": 0.5}, "step"),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.5}, "onecycle"),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, "onecycle"),
], ids=["AdamW-StepLR", "AdamW-OneCycleLR", "SGD-nesterov-OneCycleLR"])
def test_inductor_follows_the_schedule_compiles_twice_and_computes_no_power_per_element(cls, kw, schedule):
    """Failures of the compiled step under inductor (torch 2.13), each measured on the code before:
    - the step count was a Python int, specialised and then symbolic: under a scheduler the step recompiled at
      every step until dynamo's limit of 8, then ran eagerly;
    - with the step count symbolic, Adam's bias corrections ``β**t`` were computed inside every kernel's loop
      (``std::pow`` per vector, which inductor does not hoist: 4× the step time on 10M parameters);
    - a float of the group given to a foreach op (or to lerp_'s weight) became a constant of the graph: OneCycleLR's
      betas and momentum recompiled at every step;
    - (found on the way) a float made from the lr, used both in a foreach op's scalar and in tensor arithmetic, was
      baked into the graph without a guard, so the decay ignored the scheduler's later learning rates."""
    graph_lowering = pytest.importorskip("torch._inductor.graph").GraphLowering
    if not hasattr(graph_lowering, "save_output_code"):
        pytest.skip("this torch's inductor has no save_output_code hook")
    codes: list[str] = []
    with mock.patch.object(graph_lowering, "save_output_code", codes.append):
        compiled_params, _ = _run(cls, kw, 10, backend="inductor", schedule=schedule)
    eager, _ = _run(cls, kw, 10, schedule=schedule)
    for a, b in zip(eager, compiled_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert 1 <= len(codes) <= 3  # the first step (which makes the state), the steady state
    assert not any("pow" in code for code in codes)


def test_the_traced_chain_keeps_its_flags_python_bools_and_its_weights_tensors():
    """What the graph of a compiled step may hold, checked without compiling (the failures showed on torch 2.11
    alone, on the GPU machine of the twenty-fifth session; torch 2.13 compiled both forms):
    - a traced lr (a 0-dim tensor here) made ``decay_added |= lam != 0`` a graph value: torch 2.11 wrote
      ``False |= ...`` into the graph's code, a SyntaxError, for Adam(decay="decoupled") under a scheduler;
    - ``1.0 - β`` of a symbolic β was specialised by torch 2.11: OneCycleLR's β₁ recompiled every step."""
    from theorylab.optim.transforms import AddDecayedWeights, StepContext

    p = torch.ones(3, dtype=torch.float64)
    group = {"lr": torch.tensor(0.5, dtype=torch.float64), "initial_lr": 1.0, "weight_decay": 0.1}
    ctx = StepContext(params=[p], states=[{}], group=group, step=1, compiling=True)
    ctx.decay = ctx.number(0.0)
    AddDecayedWeights(schedule=True).update([p], ctx)
    assert ctx.decay_added is True and float(ctx.decay) == pytest.approx(0.05)
    zero = StepContext(params=[p], states=[{}], group={**group, "weight_decay": 0.0}, step=1, compiling=True)
    AddDecayedWeights().update([p], zero)
    assert zero.decay_added is False  # a decay that is 0 as a number adds no op to the graph
    weight = ctx.complement(0.9)
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float64 and float(weight) == pytest.approx(0.1)
    assert StepContext(params=[p], states=[{}], group=group, step=1).complement(0.9) == pytest.approx(0.1)
