"""Tests written for the mutants a hand-made mutation pass left alive (tenth session, docs/history.md): each one
fails on the mutant named in its docstring and passes on the code as it is."""

from __future__ import annotations

import math

import pytest
import torch

from theorylab.optim import SGD, Adam, AdamW, ChainOptimizer, NonFiniteGradientError, SGDMomentum
from theorylab.optim.transforms import (
    AddDecayedWeights,
    RunningAverage,
    ScaleByAdam,
    ScaleByLearningRate,
    Trace,
    schedule_multiplier,
)
from theorylab.rnn.jacobian import JacobianFactors, log_norms_of_products, stack_factors


def _chain(parts):
    class Chain(ChainOptimizer):
        def transforms(self, group):
            return parts

    return Chain


def test_a_part_after_trace_does_not_write_into_the_momentum_buffer():
    """Mutant: Trace returned its buffers still marked as owned, so a later part scaled them in place (the buffer
    read 0.011 instead of 0.271)."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    parts = [ScaleByLearningRate(), Trace(), ScaleByLearningRate(), RunningAverage()]
    opt = _chain(parts)([p], dict(lr=0.1, momentum=0.9, beta=0.5))
    for _ in range(3):
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((3,), 0.1 * (1 + 0.9 + 0.81),
                                                                             dtype=torch.float64))


def test_a_part_after_adams_scaling_does_not_write_into_its_state():
    """Mutant: ScaleByAdam returned its output still marked as owned (exp_avg 64.8 instead of 0.138, p −7.1). A
    chain L2 → Adam → momentum → lr against the same update written out in float64."""
    lr, mu, (b1, b2), eps, wd, g = 0.1, 0.5, (0.9, 0.999), 1e-8, 0.01, 0.5
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    parts = [AddDecayedWeights(), ScaleByAdam(), Trace(), ScaleByLearningRate()]
    opt = _chain(parts)([p], dict(lr=lr, momentum=mu, betas=(b1, b2), eps=eps, weight_decay=wd))
    theta, m, v, buf = 1.0, 0.0, 0.0, 0.0
    for t in range(1, 4):
        p.grad = torch.full((3,), g, dtype=torch.float64)
        opt.step()
        u = g + wd * theta
        m, v = b1 * m + (1 - b1) * u, b2 * v + (1 - b2) * u * u
        buf = mu * buf + (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        theta -= lr * buf
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((3,), m, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), torch.full((3,), theta, dtype=torch.float64))


def test_schedule_multiplier_is_one_when_the_initial_lr_is_zero():
    """Mutant: 0 instead of 1 for lr₀ = 0, which silently switched decoupled decay off for an optimizer built at
    lr = 0 (a warm-up written by hand)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.0, weight_decay=0.1, decay="decoupled")
    assert schedule_multiplier(opt.param_groups[0] | {"lr": 1e-3}) == 1.0
    opt.param_groups[0]["lr"] = 1e-3
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))  # decay λ = 0.1 per step, times the multiplier 1


def test_l2_in_a_group_mixing_bfloat16_and_float32_matches_torch_for_the_bfloat16_parameter():
    """Mutant: the half-precision L2 path taken only when every parameter of the group is half precision (the
    bfloat16 parameter then lost its decay: 1.0 against torch's 0.961)."""
    pb, pf = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(4))
    ref = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ours, theirs = SGD([pb, pf], lr=1e-2, weight_decay=0.1, decay="l2"), torch.optim.SGD([ref], lr=1e-2,
                                                                                        weight_decay=0.1)
    for _ in range(10):
        pb.grad, pf.grad = torch.full((4,), 0.15, dtype=torch.bfloat16), torch.zeros(4)
        ref.grad = torch.full((4,), 0.15, dtype=torch.bfloat16)
        ours.step()
        theirs.step()
    assert torch.equal(pb.detach(), ref.detach()) and float(ref.detach()[0]) < 0.97


OPTIMIZERS = {
    "sgd": lambda p: SGD(p, lr=0.1),
    "sgd-l2": lambda p: SGD(p, lr=0.1, weight_decay=0.1, decay="l2"),
    "sgd-momentum": lambda p: SGD(p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1),
    "sgd-nesterov": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-nesterov-l2": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd-momentum-plain": lambda p: SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: Adam(p, lr=0.1),
    "sgd-decoupled": lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, decay="decoupled"),
    "sgd-momentum-class": lambda p: SGDMomentum(p, lr=0.1, momentum=0.9),
    "adam-l2": lambda p: Adam(p, lr=0.1, weight_decay=0.1, decay="l2"),
    "adam-decoupled": lambda p: Adam(p, lr=0.1, weight_decay=0.1, decay="decoupled"),
    "adamw": lambda p: AdamW(p, lr=0.1),
    "adamw-fused": lambda p: AdamW(p, lr=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_leaves_the_gradient_as_it_was(name):
    """Mutant: ``writable`` returned the gradients themselves instead of copies, and Nesterov SGD then added μ·v
    into p.grad (1.9 instead of 1.0). torch.optim never writes into a gradient."""
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = OPTIMIZERS[name]([p])
    for step in range(3):
        p.grad = torch.full((3, 2), 1.0 + step)
        before = p.grad.clone()
        opt.step()
        assert torch.equal(p.grad, before), step


def test_trace_without_first_step_copies_damps_the_first_update():
    """Mutant: the first-step copy taken whatever ``first_step_copies`` says (v₁ = u₁ instead of (1 − d)·u₁, as
    the docstring states; torch.optim.SGD's rule is the option, not the default)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = _chain([Trace(dampening_key="dampening"), ScaleByLearningRate()])([p], dict(lr=1.0, momentum=0.9,
                                                                                       dampening=0.5))
    p.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((2,), 0.5))


def _factors(T: int = 3, H: int = 3, scale: float | None = -5.0, seed: int = 0) -> JacobianFactors:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(H, H, generator=g, dtype=torch.float64)
    d = torch.rand(1, T, H, generator=g, dtype=torch.float64) + 0.5
    log_scale = None if scale is None else torch.full((1, T), scale, dtype=torch.float64)
    return JacobianFactors(A, d, True, log_scale)


def test_stacked_factors_keep_their_log_scale():
    """Mutant: ``stack_factors`` dropped every part's ``d_log_scale`` (norms 0, 0, 0 instead of −5, −10, −15 plus
    the unscaled product's)."""
    scaled, plain = _factors(), _factors(scale=None)
    alone = log_norms_of_products(scaled)
    torch.testing.assert_close(alone, log_norms_of_products(plain) - 5.0 * torch.arange(1, 4, dtype=torch.float64))
    both = log_norms_of_products(stack_factors([scaled, plain]))
    torch.testing.assert_close(both, torch.cat([alone, log_norms_of_products(plain)]))


def test_plus_infinity_in_the_log_scale_is_refused():
    """Mutant: only NaN was checked, so a +inf log-scale gave a norm of +inf instead of a ValueError."""
    f = _factors()
    f.d_log_scale[0, 1] = math.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        log_norms_of_products(f)


@pytest.mark.parametrize("other", [dict(T=4), dict(H=4)])
def test_stacking_factors_of_another_length_or_width_is_a_value_error(other):
    """Mutant: the shape check was dropped, and torch.cat raised its own RuntimeError."""
    with pytest.raises(ValueError, match="same form, T and H"):
        stack_factors([_factors(), _factors(**other)])


def test_the_iterative_method_warm_starts_from_the_previous_step():
    """Mutant: the previous step's Ritz vectors were reused in the wrong order: the norms stayed right (to 3e-11)
    but the search extensions went from 163 to 300 on this product. Measured here: about 0.4 per sequence per
    step; the bound leaves room for rounding across platforms."""
    g = torch.Generator().manual_seed(0)
    H, T = 64, 200
    A = torch.randn(H, H, generator=g, dtype=torch.float64) * 1.5 / H**0.5
    d = torch.rand(2, T, H, generator=g, dtype=torch.float64) * 0.5 + 0.5
    f = JacobianFactors(A, d, True)
    stats: dict = {}
    out = log_norms_of_products(f, method="iterative", stats=stats)
    torch.testing.assert_close(out, log_norms_of_products(f, method="svd"), atol=1e-9, rtol=1e-9)
    assert stats["extensions"] <= 0.6 * 2 * T, stats


# ---- second pass: optim/momentum.py, optim/base.py, attention/linear.py ----

@pytest.mark.parametrize("momentum", [1.0, 1.5])
def test_running_average_from_momentum_refuses_momentum_of_one_or_more(momentum):
    """Mutant: momentum checked as non-negative only (1.0 divided by zero; 1.5 gave a negative learning rate)."""
    from theorylab.optim import running_average_from_momentum

    with pytest.raises(ValueError, match="momentum"):
        running_average_from_momentum(momentum, 0.1)


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf])
def test_momentum_from_running_average_refuses_a_bad_learning_rate(lr):
    """Mutant: lr taken as float(lr), so a negative or NaN lr came back as a 'valid' momentum setting."""
    from theorylab.optim import momentum_from_running_average

    with pytest.raises(ValueError, match="Invalid learning rate"):
        momentum_from_running_average(0.9, lr)


@pytest.mark.parametrize("momentum", [1.0, 1.5])
def test_sgd_momentum_accepts_momentum_of_one_and_above_as_documented(momentum):
    """Mutant: SGDMomentum checked μ in [0, 1), though μ ≥ 0 is its contract (μ = 1 is a valid, undamped trace)."""
    import numpy as np

    p = torch.nn.Parameter(torch.zeros(1))
    opt = SGDMomentum([p], lr=0.1, momentum=np.float32(momentum))
    assert type(opt.param_groups[0]["momentum"]) is float  # mutant: the numpy scalar was stored as given
    for _ in range(2):
        p.grad = torch.ones(1)
        opt.step()
    assert "momentum_buffer" in opt.state[p]  # mutant: the buffer saved under another name
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([0.1 * momentum + 0.1]))


def test_sgd_momentum_scales_by_the_lr_before_the_trace():
    """SGDMomentum is Δθ_t = μΔθ_{t-1} − η_t g_t: the lr of each step enters the trace at that step. Mutant: lr
    applied after the trace (param −0.69, buffer 1.9 instead of −1.05 and 0.55 under lr 0.5 then 0.1)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SGDMomentum([p], lr=0.5, momentum=0.9)
    for lr in (0.5, 0.1):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([0.9 * 0.5 + 0.1], dtype=torch.float64))
    torch.testing.assert_close(p.detach(), torch.tensor([-(0.5 + 0.55)], dtype=torch.float64))


def test_a_group_that_raises_on_a_nonfinite_gradient_raises_even_after_a_group_that_skips():
    """Every group is checked before any is stepped: a 'skip' group must not end the check early. Mutant: break
    instead of continue (no error; the step was counted as skipped)."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = SGDMomentum([{"params": [a], "nonfinite": "skip"}, {"params": [b], "nonfinite": "raise"}], lr=0.1,
                      momentum=0.9)
    a.grad, b.grad = torch.tensor([math.nan]), torch.tensor([math.inf])
    with pytest.raises(NonFiniteGradientError, match="parameter group 1"):
        opt.step()


def test_the_nonfinite_error_names_the_parameter_by_its_index_in_the_group():
    """Mutant: the index counted among the parameters that have a gradient (named [0] instead of [2])."""
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = SGDMomentum(ps, lr=0.1, momentum=0.9)
    ps[2].grad = torch.tensor([math.nan])
    with pytest.raises(NonFiniteGradientError, match=r"index\(es\) \[2\]"):
        opt.step()


@pytest.mark.parametrize("which", ["q", "k"])
def test_favor_switches_to_float64_for_huge_negative_inputs_too(which):
    """Mutant: the float64 switch looked at the largest entry, not the largest |entry|, so queries (or keys) all
    near −3e38 stayed in float32 and gave NaN. The result must equal the one for the mirrored inputs."""
    from theorylab.attention import PositiveRandomFeatures, linear_attention

    torch.manual_seed(0)
    fm = PositiveRandomFeatures(8, 32, seed=0)
    big = (torch.rand(1, 1, 16, 8) + 1) * 1.5e38
    small, v = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 4)
    negative = linear_attention(-big, small, v, fm) if which == "q" else linear_attention(small, -big, v, fm)
    assert bool(torch.isfinite(negative).all())
    reference = linear_attention((-big).double(), small.double(), v.double(), fm.double()) if which == "q" else \
        linear_attention(small.double(), (-big).double(), v.double(), fm.double())
    torch.testing.assert_close(negative.double(), reference, atol=1e-5, rtol=1e-5)
    fm.float()


def test_a_group_with_its_own_lr_starts_with_a_schedule_multiplier_of_one():
    """Decoupled decay per step is λ·lr/lr₀ with lr₀ the group's own lr at construction. Mutant: lr₀ taken from
    the constructor's default lr, so a group built with lr = 0.01 beside lr = 0.1 decayed at a tenth of λ."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Adam([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, weight_decay=0.1, decay="decoupled")
    a.grad, b.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.9))
    torch.testing.assert_close(a.detach(), torch.full((2,), 0.9))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_query_spoils_its_own_row_only(bad):
    """NaN or inf inputs propagate as in SDPA: that query's output is NaN, the others are unchanged. Mutant: the
    float64 switch treated them as 'too large' and raised a ValueError naming max |x| = nan."""
    from theorylab.attention import PositiveRandomFeatures, linear_attention

    fm = PositiveRandomFeatures(8, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, n, generator=g) for n in (8, 8, 4))
    spoilt = q.clone()
    spoilt[0, 0, 3, 0] = bad
    out, clean = linear_attention(spoilt, k, v, fm), linear_attention(q, k, v, fm)
    assert bool(torch.isnan(out[0, 0, 3]).all())
    rows = [i for i in range(8) if i != 3]
    torch.testing.assert_close(out[0, 0, rows], clean[0, 0, rows])


@pytest.mark.parametrize("causal", [False, True])
def test_a_float64_feature_map_makes_float32_inputs_compute_in_float64(causal):
    """The working dtype includes the feature map's: a float64 map with float32 inputs gives the float64 result
    rounded once to float32. Mutant: the map's dtype ignored (10-25x the error: 7e-7 to 1.4e-6 instead of 6e-8)."""
    from theorylab.attention import PositiveRandomFeatures, linear_attention

    g = torch.Generator().manual_seed(0)
    fm64 = PositiveRandomFeatures(16, 64, seed=0).double()
    q, k, v = (torch.randn(2, 2, 300, n, generator=g) for n in (16, 16, 8))
    out = linear_attention(q, k, v, fm64, causal=causal)
    ref = linear_attention(q.double(), k.double(), v.double(), fm64, causal=causal)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_without_autograd_rescales_its_state_when_the_key_maximum_rises(causal):
    """Without autograd the state is updated in place. Mutant: the in-place path dropped the rescaling by the
    rising running maximum (non-causal output 0.35 off); the tests had exercised it only under autograd."""
    from theorylab.attention import PositiveRandomFeatures, linear_attention
    from theorylab.attention.linear import linear_attention_log_reference

    g = torch.Generator().manual_seed(0)
    fm = PositiveRandomFeatures(8, 32, seed=0).double()
    q, k, v = (torch.randn(1, 2, 64, n, generator=g, dtype=torch.float64) for n in (8, 8, 4))
    k = k * torch.linspace(0.5, 3.0, 64, dtype=torch.float64)[:, None]  # key norms rise along the sequence
    with torch.no_grad():
        out = linear_attention(q, k, v, fm, causal=causal, chunk_size=8)
    torch.testing.assert_close(out, linear_attention_log_reference(q, k, v, fm, causal=causal), atol=1e-12,
                               rtol=1e-10)
