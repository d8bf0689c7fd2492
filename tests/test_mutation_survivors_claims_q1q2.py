"""Tests written for mutants of the claims 1.x (q1_rnn), 2.x (q2_momentum) and the RNN-tasks extra (extras_rnn) that
the rest of the suite let through: each pins down one behaviour that a plausible one-line change broke silently. Most
plant a bug just past one threshold of a verdict, so that the verdict must turn to refuted; the extra runs on a fake
``train`` so that its bookkeeping is checked in milliseconds."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from theorylab.claims import extras_rnn, q1_rnn, q2_momentum
from theorylab.rnn.tasks import TrainResult


class _QuickFigure(Figure):
    def tight_layout(self, *args, **kwargs):  # the layout pass is a good part of a quick claim's time; no test reads it
        pass


@pytest.fixture(autouse=True)
def quick_figures(monkeypatch):
    for module in (q1_rnn, q2_momentum, extras_rnn):
        monkeypatch.setattr(module, "Figure", _QuickFigure)


# ------------------------------------------------------------------------------------------------------ extras_rnn
@pytest.fixture
def fake_train(monkeypatch):
    """Replace ``train`` by an instant one. ``results`` maps (task, T, clip, orthogonal) to keyword overrides of the
    TrainResult; every call is recorded with its arguments."""
    calls: list[dict] = []
    results: dict[tuple, dict] = {}

    def train(task, steps, *, clip=None, orthogonal=False, **kwargs):
        calls.append({"task": task, "steps": steps, "clip": clip, "orthogonal": orthogonal, **kwargs})
        fields = {"metric": 0.5, "solved": False, "reach_init": -1.0 - 0.01 * steps, "reach_final": -3.0,
                  "max_grad_norm": 2.0, "train_loss": 0.1}
        if orthogonal:
            fields["reach_init"] += 0.5
        if task == "adding" and not orthogonal:
            fields["metric"] = 0.01 * steps  # plain: worse at the longer T
        fields.update(results.get((task, steps, clip, orthogonal), {}))
        return TrainResult(task, steps, clip, orthogonal, **fields)

    monkeypatch.setattr(extras_rnn, "train", train)
    return calls, results


def test_rnn_tasks_trains_each_variant_with_its_own_settings(fake_train):
    """The quick run trains plain and orthogonal W + clip (clip 1.0, orthogonal init) on adding T = 5, 20, copy T = 5
    and 64-pixel digits, 60 Adam steps at lr 1e-2 with H = 32, all with the seed it was given."""
    calls, _ = fake_train
    extras_rnn.rnn_tasks(7, True)
    runs = {(c["task"], c["steps"], c["clip"], c["orthogonal"]) for c in calls}
    assert runs == {(task, steps, clip, orth) for task, steps in (("adding", 5), ("adding", 20), ("copy", 5),
                                                                  ("digits", 64))
                    for clip, orth in ((None, False), (1.0, True))}
    assert len(calls) == len(runs)
    assert {(c["seed"], c["iterations"], c["lr"], c["hidden"]) for c in calls} == {(7, 60, 1e-2, 32)}


def test_rnn_tasks_reports_each_run_under_its_own_name(fake_train):
    """The per-run numbers hold that run's metric, its reach at initialisation (not after training) and its largest
    gradient norm; the summary reads the digits accuracy of each variant from its own run."""
    calls, results = fake_train
    results["digits", 64, None, False] = {"metric": 0.3}
    results["digits", 64, 1.0, True] = {"metric": 0.7}
    results["adding", 20, 1.0, True] = {"reach_init": -0.25, "reach_final": -9.0, "max_grad_norm": 5.5}
    ev = extras_rnn.rnn_tasks(0, True)
    assert ev.numbers["digits_accuracy_plain"] == 0.3
    assert ev.numbers["digits_accuracy_orth_clip"] == 0.7
    assert ev.numbers["adding_T20_orthogonal_W_and_clip_reach_init_log10"] == -0.25
    assert ev.numbers["adding_T20_orthogonal_W_and_clip_max_grad_norm"] == 5.5
    assert ev.numbers["adding_T20_plain_metric"] == pytest.approx(0.2)


def test_rnn_tasks_summary_of_the_adding_problem(fake_train):
    """The plain metrics at the shortest and the longest T are those runs'; the longest T solved counts only solved
    runs (0 when none is)."""
    _, results = fake_train
    results["adding", 5, None, False] = {"metric": 0.05, "solved": True}
    results["adding", 20, None, False] = {"metric": 0.9, "solved": False}
    ev = extras_rnn.rnn_tasks(0, True)
    assert ev.numbers["adding_plain_metric_shortest_T"] == 0.05
    assert ev.numbers["adding_plain_metric_longest_T"] == 0.9
    assert ev.numbers["adding_longest_T_solved_plain"] == 5.0
    assert ev.numbers["adding_longest_T_solved_orth_clip"] == 0.0


def test_rnn_tasks_needs_a_reach_gain_at_every_horizon(fake_train):
    """Confirmed needs the orthogonal init to raise the reach at EVERY T (the minimum gain > 0): a gain at T = 5
    but a loss at T = 20 refutes, and the reported gain is the smaller one."""
    _, results = fake_train
    ev = extras_rnn.rnn_tasks(0, True)
    assert ev.confirmed and ev.numbers["min_reach_gain_orthogonal_log10"] == pytest.approx(0.5)
    results["adding", 20, 1.0, True] = {"reach_init": -2.0}  # plain: -1.2
    ev = extras_rnn.rnn_tasks(0, True)
    assert ev.numbers["min_reach_gain_orthogonal_log10"] == pytest.approx(-0.8)
    assert not ev.confirmed
    assert "by at least -0.8 at every T" in ev.summary  # the summary table shows the smaller gain


def test_rnn_tasks_needs_the_plain_rnn_to_do_worse_at_the_longest_horizon(fake_train):
    """Equal plain metrics at the shortest and the longest T are not 'worse at the longest T': refuted."""
    _, results = fake_train
    results["adding", 5, None, False] = {"metric": 0.3}
    results["adding", 20, None, False] = {"metric": 0.3}
    assert not extras_rnn.rnn_tasks(0, True).confirmed


# ---------------------------------------------------------------------------------------------------------- 1.1
def test_1_1_scales_the_contracting_w_to_sigma_max_times_gamma_0_9(monkeypatch):
    """Claim 1.1's contracting W has σ_max(W)·γ = 0.9 for every activation (not σ_max = 0.9γ), and the chaotic one is
    3Q: the regimes its method states."""
    seen = []
    real = q1_rnn._rnn

    def recording(W, U, b, activation, form="h"):
        if form == "h":
            seen.append((activation, float(torch.linalg.matrix_norm(W, ord=2)) * q1_rnn.derivative_bound(activation)))
        return real(W, U, b, activation, form)

    monkeypatch.setattr(q1_rnn, "_rnn", recording)
    assert q1_rnn.equivalent_recurrences(0, True).confirmed
    assert [a for a, _ in seen] == [*q1_rnn.ACTS, "tanh"]
    assert [r for _, r in seen] == pytest.approx([0.9] * 5 + [3.0], rel=1e-12)


def test_1_1_refutes_an_independent_g_form_off_by_1e_11(monkeypatch):
    """Every contracting difference counts, the independent numpy g-form's too, against 1e-12: a numpy g-form off by
    1e-11 (the module's own g-form exact) is refuted."""
    real = q1_rnn._np_g_form
    monkeypatch.setattr(q1_rnn, "_np_g_form", lambda *args: real(*args) + 1e-11)
    ev = q1_rnn.equivalent_recurrences(0, True)
    assert ev.numbers["max_diff_module_tanh"] < 1e-12
    assert 5e-12 < ev.numbers["max_diff_contracting"] < 1e-10
    assert not ev.confirmed


def test_1_1_refutes_a_chaotic_case_that_is_not_chaotic(monkeypatch):
    """The guard that the free-running chaotic forms drift apart (> 1e-3): with W = 0.3Q instead of 3Q nothing drifts,
    so the one-step comparison shows nothing and the claim is refuted."""
    real = q1_rnn._orthogonal
    monkeypatch.setattr(q1_rnn, "_orthogonal", lambda *args, **kwargs: 0.1 * real(*args, **kwargs))
    ev = q1_rnn.equivalent_recurrences(0, True)
    assert ev.numbers["chaotic_free_running_max_diff"] < 1e-3 and ev.numbers["chaotic_lyapunov_1"] < 0
    assert not ev.confirmed


def test_1_1_refutes_a_one_step_difference_in_the_chaotic_regime(monkeypatch):
    """The one-step chaotic comparison is judged (< 1e-12): an h-form off by 1e-9 only where W = 3Q is refuted."""
    real = q1_rnn._rnn

    def off_when_chaotic(W, U, b, activation, form="h"):
        rnn = real(W, U, b, activation, form)
        if activation == "tanh" and float(torch.linalg.matrix_norm(W, ord=2)) > 2.5:
            forward = rnn.forward
            rnn.forward = lambda x, h0=None: tuple(s + 1e-9 for s in forward(x, h0))
        return rnn

    monkeypatch.setattr(q1_rnn, "_rnn", off_when_chaotic)
    ev = q1_rnn.equivalent_recurrences(0, True)
    assert ev.numbers["max_diff_contracting"] < 1e-12
    assert ev.numbers["chaotic_one_step_max_diff"] > 1e-10
    assert not ev.confirmed


# ---------------------------------------------------------------------------------------------------------- 1.2
@pytest.fixture(scope="module")
def vanishing_norms():
    """Claim 1.2 at seed 0, quick, unmutated: its evidence and the exact log-norms it computed, by factor shape
    (the 1000-step batch of 30 random + 15 tight sequences, and the 40-step prefixes checked against autograd)."""
    real, norms = q1_rnn.log_norms_of_products, {}

    def recording(factors, **kwargs):
        norms[tuple(factors.d.shape)] = out = real(factors, **kwargs)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(q1_rnn, "log_norms_of_products", recording)
        mp.setattr(q1_rnn, "Figure", _QuickFigure)
        ev = q1_rnn.vanishing_gradients(0, True)
    assert ev.confirmed and (45, 1000, 16) in norms
    return ev, norms


def _planted_norms(monkeypatch, norms, plant):
    """Claim 1.2 reads the recorded norms, with ``plant(lognorm (45, T))`` applied to the long batch."""

    def planted(factors, **kwargs):
        out = norms[tuple(factors.d.shape)].clone()
        if out.shape[0] == 45:
            plant(out)
        return out

    monkeypatch.setattr(q1_rnn, "log_norms_of_products", planted)
    return q1_rnn.vanishing_gradients(0, True)


def test_1_2_counts_the_random_units(vanishing_norms):
    """'units' reports the random units (5 activations × 3 δ), not the tight cases as well."""
    assert vanishing_norms[0].numbers["units"] == 15


def test_1_2_refutes_a_norm_1e_7_above_the_bound(monkeypatch, vanishing_norms):
    """The bound ‖∂h_T/∂h_0‖ ≤ δ^T holds to 1 + 1e-10: a random unit (tanh, δ = 0.4) that sits 1e-7 (relative) above
    δ^T is refuted, while the tight cases are left exact."""
    t = torch.arange(1, 1001, dtype=torch.float64)

    def above(out):
        out[0] = t * np.log(0.4) + 1e-7

    ev = _planted_norms(monkeypatch, vanishing_norms[1], above)
    assert 5e-8 < ev.numbers["max_log_norm_minus_log_bound"] < 1e-6
    assert ev.numbers["tight_case_max_abs_log_ratio"] < 1e-9
    assert not ev.confirmed


def test_1_2_refutes_tight_cases_1e_8_below_delta_to_the_t(monkeypatch, vanishing_norms):
    """The tight cases must equal δ^T to 1e-9 (log): norms 1e-8 below (still under the bound) are refuted."""

    def below(out):
        out[30:] -= 1e-8

    ev = _planted_norms(monkeypatch, vanishing_norms[1], below)
    assert 5e-9 < ev.numbers["tight_case_max_abs_log_ratio"] < 1e-7
    assert not ev.confirmed


def test_1_2_refutes_factors_1e_6_off_the_autograd_jacobian(monkeypatch, vanishing_norms):
    """The norms of the first random units must match the autograd Jacobian's to 1e-8 relative: 1e-6 is refuted."""
    real = q1_rnn._autograd_log_norms
    monkeypatch.setattr(q1_rnn, "_autograd_log_norms", lambda *args: real(*args) + 1e-6)
    ev = _planted_norms(monkeypatch, vanishing_norms[1], lambda out: None)
    assert 1e-8 < ev.numbers["max_rel_diff_vs_autograd_jacobian"] < 1e-5
    assert not ev.confirmed


# ---------------------------------------------------------------------------------------------------------- 1.3
@pytest.fixture(scope="module")
def exploding():
    """Claim 1.3 at seed 0, quick, unmutated: its evidence, and the norms and exponents it computed, by shape (and
    under "units" the units of its first batch, part (a))."""
    real_norms, real_lyap, real_many, cache = (q1_rnn.log_norms_of_products, q1_rnn.lyapunov_from_factors,
                                               q1_rnn._factors_many, {})

    def many(units):
        cache.setdefault("units", units)
        return real_many(units)

    def norms(factors, **kwargs):
        cache[("norms", *factors.d.shape)] = out = real_norms(factors, **kwargs)
        return out

    def lyap(factors, k, **kwargs):
        cache[("lyap", k, *factors.d.shape)] = out = real_lyap(factors, k, **kwargs)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(q1_rnn, "Figure", _QuickFigure)
        mp.setattr(q1_rnn, "log_norms_of_products", norms)
        mp.setattr(q1_rnn, "lyapunov_from_factors", lyap)
        mp.setattr(q1_rnn, "_factors_many", many)
        ev = q1_rnn.exploding_gradients(0, True)
    assert ev.confirmed, ev.notes
    return ev, cache


def _planted_1_3(monkeypatch, cache, norms_a=None, norms_b=None, lyapunov=None):
    """Claim 1.3 on the recorded norms and exponents, with ``norms_a(lognorm (48, 300))`` applied to part (a)'s norms,
    ``norms_b(lognorm (10, 1000))`` and ``lyapunov(λ (10, 2))`` to the norms and exponents of the five tanh cases
    (rows 2i, 2i + 1: triangular, saturating, random, 2I, 3Q)."""

    def planted_norms(factors, **kwargs):
        out = cache[("norms", *factors.d.shape)].clone()
        plant = {(48, 300): norms_a, (10, 1000): norms_b}[tuple(out.shape)]
        if plant is not None:
            plant(out)
        return out

    def planted_lyap(factors, k, **kwargs):
        out = cache[("lyap", k, *factors.d.shape)].clone()
        if lyapunov is not None:
            lyapunov(out)
        return out

    monkeypatch.setattr(q1_rnn, "log_norms_of_products", planted_norms)
    monkeypatch.setattr(q1_rnn, "lyapunov_from_factors", planted_lyap)
    return q1_rnn.exploding_gradients(0, True)


def test_1_3_reports_the_slope_and_the_relu_overflow_step(exploding):
    """The 3Q slope is log‖∂h_T/∂h_0‖ / T; relu with W = 2I from h_0 = 1 has h_t = 2^t, inf first at t = 1024."""
    n = exploding[0].numbers
    assert n["slope_log_norm_3Q"] == n["log_norm_T_3Q"] / n["T"]
    assert n["relu_2I_state_overflow_step"] == 1024


def test_1_3_part_a_samples_sigma_max_times_gamma_in_0_3_to_1(exploding):
    """Part (a) tests the premise σ_max(W)·γ ≤ 1 only: its 48 units have σ_max·γ in [0.3, 1], a quarter exactly 1,
    over all five activations (a W beyond 1 can still pass 'never grows', so the range itself is pinned)."""
    units = exploding[1]["units"]
    rates = [float(torch.linalg.matrix_norm(W, ord=2)) * q1_rnn.derivative_bound(act) for W, _, _, act, _, _ in units]
    assert len(units) == 48 and {u[3] for u in units} == set(q1_rnn.ACTS)
    assert all(0.3 - 1e-12 <= r <= 1.0 + 1e-12 for r in rates)
    assert sum(abs(r - 1.0) < 1e-12 for r in rates) == 12


def test_1_3_refutes_a_one_step_growth_of_1e_8(monkeypatch, exploding):
    """(a) 'never grows' allows 1e-10 per step: norms that grow by 1e-8 every other step (but stay ≤ 1) refute."""

    def zigzag(out):
        out[:, ::2] -= 1e-8

    ev = _planted_1_3(monkeypatch, exploding[1], norms_a=zigzag)
    assert 5e-9 < ev.numbers["a_max_one_step_growth"] < 1e-7 and ev.numbers["a_max_log_norm"] <= 1e-10
    assert not ev.confirmed


def test_1_3_refutes_norms_that_creep_above_one(monkeypatch, exploding):
    """(a) the norm itself must stay ≤ 1 (+1e-10): growth of 5e-11 per step (under the per-step limit) that ends
    1.5e-8 above log 1 = 0 refutes."""

    def creep(out):
        out += 5e-11 * torch.arange(1, 301, dtype=out.dtype)

    ev = _planted_1_3(monkeypatch, exploding[1], norms_a=creep)
    assert ev.numbers["a_max_one_step_growth"] <= 1e-10 and ev.numbers["a_max_log_norm"] > 1e-8
    assert not ev.confirmed


def test_1_3_refutes_a_triangular_product_that_vanishes_before_h_steps(monkeypatch, exploding):
    """The strictly upper-triangular W's product must become exactly 0 at t = H = 16, not before: norms that reach
    −inf at t = 5 (a wrong Jacobian) are refuted."""

    def early(out):
        out[0:2, 4:] = -torch.inf

    ev = _planted_1_3(monkeypatch, exploding[1], norms_b=early)
    assert ev.numbers["b_triangular_first_zero_step"] == 5.0 and not ev.confirmed


def test_1_3_refutes_a_vanishing_case_whose_norm_does_not_vanish(monkeypatch, exploding):
    """A vanishing counterexample needs both λ₁ < 0 and log‖∂h_T/∂h_0‖ < −50: the random W with its norm held at
    e^−10 (λ₁ still < 0) is refuted."""

    def held(out):
        out[4:6] = out[4:6].clamp(min=-10.0)

    ev = _planted_1_3(monkeypatch, exploding[1], norms_b=held)
    assert ev.numbers["lyapunov_1_random_1p8"] < 0 and ev.numbers["check_b_vanish"] == 0.0
    assert not ev.confirmed


def test_1_3_refutes_an_exploding_case_whose_norm_stays_below_e_to_the_100(monkeypatch, exploding):
    """Explosion needs both λ₁ > 0.1 and log‖∂h_T/∂h_0‖ > 100: W = 3Q with λ₁ = 0.105 and a final log-norm of 95
    (slope 0.095, within 0.02 of λ₁) is refuted."""

    def lam(out):
        out[8:10, 0] = 0.105

    def norms(out):
        out[8:10] *= 95.0 / out[8:10, -1].max()

    ev = _planted_1_3(monkeypatch, exploding[1], norms_b=norms, lyapunov=lam)
    assert ev.numbers["log_norm_T_3Q"] == pytest.approx(95.0) and ev.numbers["check_c_slope_matches_lyapunov"] == 1.0
    assert ev.numbers["check_c_explodes"] == 0.0 and not ev.confirmed


def test_1_3_refutes_w_2i_off_its_fixed_point_exponent_by_0_05(monkeypatch, exploding):
    """W = 2I's λ₁ must be within 0.02 of log(2 sech² h*): 0.06 off (still < 0) is refuted."""

    def off(lam):
        lam[6:8] += 0.05

    ev = _planted_1_3(monkeypatch, exploding[1], lyapunov=off)
    assert 0.04 < abs(ev.numbers["lyapunov_1_2I"] - ev.numbers["lyapunov_1_2I_fixed_point"]) < 0.1
    assert ev.numbers["check_b_2I_matches_fixed_point"] == 0.0 and not ev.confirmed


def test_1_3_refutes_a_3q_slope_0_05_off_its_exponent(monkeypatch, exploding):
    """W = 3Q's log-norm slope must match λ₁ within 0.02: λ₁ 0.05 higher (still > 0.1) is refuted."""

    def off(lam):
        lam[8:10] += 0.05

    ev = _planted_1_3(monkeypatch, exploding[1], lyapunov=off)
    assert 0.03 < ev.numbers["lyapunov_1_3Q"] - ev.numbers["slope_log_norm_3Q"] < 0.1
    assert ev.numbers["check_c_slope_matches_lyapunov"] == 0.0 and not ev.confirmed


# ---------------------------------------------------------------------------------------------------------- 2.1
def _tiny_split():
    """A stand-in for digits_split (only x_train and y_train are read): 100 samples, 5 features, 3 classes."""
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return SimpleNamespace(x_train=x, y_train=torch.arange(100) % 3)


def test_2_1_each_step_uses_the_gradient_of_its_own_minibatch_only():
    """_logreg_trajectory zeroes the gradient before each step: with θ held still and the same minibatch every step,
    each step sees the same gradient (not a sum over the steps so far), and the losses are those at θ = 0 (ln 3)."""
    grads = []

    class Recording:  # an optimizer that records the gradients it is given and never moves θ
        def __init__(self, params):
            self.params = list(params)

        def zero_grad(self):
            for p in self.params:
                p.grad = None

        def step(self):
            grads.append([p.grad.clone() for p in self.params])

    batch = torch.arange(64)
    thetas, losses = q2_momentum._logreg_trajectory(Recording, _tiny_split(), [batch] * 3)
    assert thetas.shape == (3, 3 * 6) and not thetas.any()
    assert losses == pytest.approx([np.log(3)] * 3, rel=1e-12)
    for later in grads[1:]:
        for g, g0 in zip(later, grads[0], strict=True):
            assert torch.equal(g, g0)


def test_2_1_draws_the_minibatch_stream_from_the_seed(monkeypatch):
    """The shared minibatch stream comes from the claim's seed: seeds 0 and 1 draw different streams (the claim's
    trajectories are not run here; a stand-in records the batches)."""
    streams = []

    def record(factory, split, batches):
        streams.append(torch.stack(batches))
        return np.ones((len(batches), 3)), np.ones(len(batches))

    monkeypatch.setattr(q2_momentum, "_logreg_trajectory", record)
    monkeypatch.setattr(q2_momentum, "digits_split", lambda seed: _tiny_split())
    q2_momentum.momentum_equals_running_average(0, True)
    q2_momentum.momentum_equals_running_average(1, True)
    assert len(streams) == 6
    assert torch.equal(streams[0], streams[2]) and not torch.equal(streams[0], streams[3])


def test_2_1_measures_the_difference_relative_to_theta_at_each_step(monkeypatch):
    """The trajectories must agree to 1e-10 relative to |θ_t| at each step, not to the largest |θ| of the run: a
    difference of 1e-12 at the first step, where |θ_1| = 1e-3, is 1e-9 relative and refuted (stand-in trajectories:
    running average, mapped momentum, wrong map)."""
    t = np.arange(1, 151)[:, None] * 1e-3 * np.ones((1, 4))  # |θ_t| = t·1e-3
    mapped = t.copy()
    mapped[0, 0] += 1e-12
    runs = iter([t, mapped, t + 1.0])
    monkeypatch.setattr(q2_momentum, "_logreg_trajectory", lambda factory, split, batches: (next(runs), np.ones(150)))
    monkeypatch.setattr(q2_momentum, "digits_split", lambda seed: _tiny_split())
    ev = q2_momentum.momentum_equals_running_average(0, True)
    assert ev.numbers["max_rel_diff_correct_map"] == pytest.approx(1e-9)
    assert not ev.confirmed


# ---------------------------------------------------------------------------------------------------------- 2.3
def _running_average_off_by(monkeypatch, factor: float, debias: bool) -> q2_momentum.Evidence:
    """Claim 2.3 with the steps of the run with the given debias flag ``factor`` times too long."""
    real = q2_momentum.RunningAverageSGD

    def factory(params, lr, beta, debias=False):
        return real(params, lr=lr * (factor if debias == flag else 1.0), beta=beta, debias=debias)

    flag = debias
    monkeypatch.setattr(q2_momentum, "RunningAverageSGD", factory)
    return q2_momentum.running_average_bias(0, True)


@pytest.mark.parametrize("debias", [False, True])
def test_2_3_refutes_estimates_2_percent_too_large(monkeypatch, debias):
    """Each z-curve (v_t against (1−β^t)μ, v̂_t against μ) is judged against 3.9 on its own: v_t (or v̂_t alone) 2 %
    too large is 5.4 standard errors off somewhere and refuted."""
    ev = _running_average_off_by(monkeypatch, 1.02, debias)
    off, other = "max_abs_z_debiased_vs_mu" if debias else "max_abs_z_v_vs_theory", (
        "max_abs_z_v_vs_theory" if debias else "max_abs_z_debiased_vs_mu")
    assert 4.5 < ev.numbers[off] < 6.0 and ev.numbers[other] < 3.9
    assert not ev.confirmed


def test_2_3_needs_the_first_step_below_mu_not_just_far_from_it(monkeypatch):
    """The method says v_1's mean sits > 10 s.e. *below* μ (a bias toward 0); the check was |z| > 10, which a v_1
    far above μ also passed (a docstring audit). Steps 20× too long put v_1 at 2μ: that check now fails."""
    ev = _running_average_off_by(monkeypatch, 20.0, False)
    assert ev.numbers["z_v1_vs_mu"] > 10
    (v1_check,) = [ok for text, ok in ev.checks.items() if text.startswith("v_1 is")]
    assert v1_check is False and not ev.confirmed


def test_2_3_reports_the_mean_of_v_1_itself_and_draws_its_streams_from_the_seed():
    """mean_v1 is the Monte-Carlo mean of v_1 (not of v̂_1 = v_1/(1−β)): close to (1−β)μ = 0.15; and the streams come
    from the claim's seed (seeds 0 and 1 give different means)."""
    ev = q2_momentum.running_average_bias(0, True)
    assert ev.numbers["mean_v1"] == pytest.approx(ev.numbers["mean_v1_theory"], abs=0.02)
    assert ev.numbers["mean_v1_theory"] == pytest.approx(0.15)
    assert q2_momentum.running_average_bias(1, True).numbers["mean_v1"] != ev.numbers["mean_v1"]


def test_orthogonal_is_the_haar_q_of_a_gaussian_matrix():
    """_orthogonal returns the Q of a Gaussian matrix's QR with R's diagonal made positive (Mezzadri's recipe for
    Haar-distributed Q), not LAPACK's Q whose column signs are arbitrary: Qᵀ·G is upper-triangular with a
    positive diagonal, for one matrix and for a batch."""
    for batch in (None, 3):
        q = q1_rnn._orthogonal(6, torch.Generator().manual_seed(1), batch)
        g = torch.randn(*q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        r = q.mT @ g
        assert torch.allclose(q.mT @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(r, torch.triu(r), atol=1e-12)
        assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()



class _DesignedSteps:
    """A stand-in for RunningAverageSGD in claim 2.3 whose steps have a chosen Monte-Carlo mean: at step t the steps
    over the streams are target + z·se ± spread (alternating signs), so that z is exactly ``z_raw`` for v_t against
    (1−β^t)μ and 0 for v̂_t against μ (β = 0.9, μ = 1.5 as in the claim)."""

    def __init__(self, params, lr, beta, debias=False, z_raw=2.2, spread=0.5):
        self.p, self.debias, self.t, self.z_raw, self.spread = list(params)[0], debias, 0, z_raw, spread

    def step(self):
        self.t += 1
        n = self.p.numel()
        sign = torch.ones(n, dtype=torch.float64)
        sign[1::2] = -1.0
        se = self.spread * (n / (n - 1)) ** 0.5 / n**0.5  # the standard error of ±spread (std with ddof = 1)
        target, z = (1.5, 0.0) if self.debias else ((1 - 0.9**self.t) * 1.5, self.z_raw)
        with torch.no_grad():
            self.p -= target + z * se + self.spread * sign


def test_2_3_reports_the_coverage_of_the_95_percent_intervals(monkeypatch):
    """ci95_coverage is the share of |z| < 1.96 over both z-curves: every v_t 2.2 s.e. off (and every v̂_t exact)
    covers half."""
    monkeypatch.setattr(q2_momentum, "RunningAverageSGD", _DesignedSteps)
    ev = q2_momentum.running_average_bias(0, True)
    assert ev.numbers["max_abs_z_v_vs_theory"] == pytest.approx(2.2)
    assert ev.numbers["max_abs_z_debiased_vs_mu"] == pytest.approx(0.0, abs=1e-9)
    assert ev.numbers["ci95_coverage"] == 0.5


def test_2_3_refutes_a_bias_too_noisy_to_be_resolved(monkeypatch):
    """The claim needs v_1's mean > 10 s.e. below μ (the bias is real, not lost in noise): steps that match theory
    exactly but spread so widely that v_1 sits only 5 s.e. below μ are refuted."""
    n = 4000
    spread = 1.35 / 5 * (n - 1) ** 0.5  # se = spread·√(n/(n−1))/√n = 1.35/5 = (μ − (1−β)μ)/5
    monkeypatch.setattr(q2_momentum, "RunningAverageSGD", partial(_DesignedSteps, z_raw=0.0, spread=spread))
    ev = q2_momentum.running_average_bias(0, True)
    assert ev.numbers["streams"] == n
    assert ev.numbers["z_v1_vs_mu"] == pytest.approx(-5.0)
    assert ev.numbers["max_abs_z_v_vs_theory"] < 1e-6 and ev.numbers["max_abs_z_debiased_vs_mu"] < 1e-6
    assert not ev.confirmed
