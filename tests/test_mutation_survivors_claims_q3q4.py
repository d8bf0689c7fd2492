"""Tests written for mutants of the Q3 attention claims, the Q4 weight-decay claims (their pure helpers and the 4.4
verdict) and the char-LM extra section that the rest of the suite let through: each pins down one behaviour that a
plausible one-line change broke silently."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from theorylab import attention
from theorylab.attention import PositiveRandomFeatures, TrigRandomFeatures, features
from theorylab.attention.exact import batched_heads_attention, sequential_heads_attention
from theorylab.claims import extras_charlm
from theorylab.claims import q3_attention as q3
from theorylab.claims import q4_weight_decay as q4
from theorylab.experiments.charlm import ATTENTION_KINDS


# ------------------------------------------------------------------------------------------- q3_attention
@pytest.fixture(scope="module")
def claim_3_1():
    return q3.cost_of_standard_attention(0, True)


def _mha_cost_with(fn):
    """q3._mha_cost measuring ``fn`` whatever it is asked to measure (its default is bound at definition)."""
    real = q3._mha_cost
    return lambda n, d, h, gen, fn_=None: real(n, d, h, gen, fn)


def test_3_1_reports_one_n_by_n_float32_matrix_at_the_largest_n(claim_3_1):
    """The reported reference is 4·n² bytes at the largest n of the quick grid (1024): one float32 n×n."""
    assert claim_3_1.numbers["n_by_n_float32_bytes_at_max_n"] == 4 * 1024**2
    assert claim_3_1.confirmed


def test_3_1_refutes_attention_off_by_a_millionth(monkeypatch):
    """The measured attention must equal SDPA per head to 1e-12 in float64: an output off by 1e-6 is refuted."""
    real = q3.sequential_heads_attention
    monkeypatch.setattr(q3, "sequential_heads_attention", lambda *args: real(*args) + 1e-6)
    ev = q3.cost_of_standard_attention(0, True)
    assert ev.numbers["max_abs_diff_vs_sdpa"] == pytest.approx(1e-6, rel=1e-3)
    assert not ev.confirmed


def test_3_1_refutes_sequential_heads_whose_memory_grows_with_h(monkeypatch):
    """Heads 'computed one after another' that hold every head at once (memory ∝ h) are refuted."""
    monkeypatch.setattr(q3, "_mha_cost", _mha_cost_with(batched_heads_attention))
    ev = q3.cost_of_standard_attention(0, True)
    assert ev.numbers["exponent_memory_h_sequential"] > 0.8
    assert not ev.confirmed


def test_3_1_refutes_batched_heads_whose_memory_does_not_grow_with_h(monkeypatch):
    """The batched-heads contrast must show memory ∝ h: a 'batched' run that is sequential is refuted."""
    monkeypatch.setattr(q3, "_mha_cost", _mha_cost_with(sequential_heads_attention))
    ev = q3.cost_of_standard_attention(0, True)
    assert ev.numbers["exponent_memory_h_batched"] < 0.2
    assert not ev.confirmed


def test_3_2_reports_the_mass_bound_d_over_n():
    """The separable mass bound is d/n = 8/64 for the shift task."""
    ev = q3.separable_attention_claim(0, True)
    assert ev.numbers["separable_mass_bound_d_over_n"] == 8 / 64
    assert ev.confirmed and ev.numbers["shift_mass_separable"] <= 8 / 64 + 1e-9


def test_3_2_refutes_a_full_rank_operator_posing_as_separable_attention(monkeypatch):
    """(1−ε)·softmax_row(Q)softmax_col(K)ᵀ + ε·I (rows still sum to 1, same cost, fast path consistent): rank n > d."""
    eps = 1e-6
    real_matrix, real_fast = q3.separable_attention_matrix, attention.separable_attention
    monkeypatch.setattr(q3, "separable_attention_matrix", lambda q, k: (1 - eps) * real_matrix(q, k) + eps * torch.eye(
        q.shape[-2], dtype=q.dtype))
    monkeypatch.setattr(attention, "separable_attention", lambda q, k, v: (1 - eps) * real_fast(q, k, v) + eps * v)
    ev = q3.separable_attention_claim(0, True)
    assert ev.numbers["rank"] > ev.numbers["d"] and ev.numbers["max_abs_diff_fast_vs_matrix"] < 1e-12
    assert not ev.confirmed


def test_3_2_refutes_separable_attention_that_gets_the_shift_argmax_right(monkeypatch):
    """Mass under d/n is not enough: a separable matrix whose argmax hits every shift target is refuted."""
    real = q3._learn_pattern

    def learn(kind, target, d, steps, gen):
        if kind == "exact":
            return real(kind, target, d, steps, gen)
        n = target.numel()
        a = torch.full((n, n), 0.9 / (n - 1), dtype=torch.float64)
        a[torch.arange(n), target] = 0.1  # mass 0.1 <= d/n = 0.125, argmax on every target
        return a

    monkeypatch.setattr(q3, "_learn_pattern", learn)
    ev = q3.separable_attention_claim(0, True)
    assert ev.numbers["shift_accuracy_separable"] == 1.0
    assert not ev.confirmed


def test_3_3_refutes_a_factorisation_that_is_only_near_exact(monkeypatch):
    """Taylor features of degree 4 (relative error ~1e-4) are not exp(qᵀk) to 1e-6: refuted."""
    real = q3.TaylorFeatures
    monkeypatch.setattr(q3, "TaylorFeatures", lambda d, degree: real(d, 4))
    ev = q3.kernelised_attention_claim(0, True)
    assert 1e-6 < ev.numbers["max_abs_diff_vs_softmax"] < 1e-2
    assert ev.numbers["max_abs_diff_vs_quadratic_form"] < 1e-12
    assert not ev.confirmed


def test_3_3_refutes_a_favor_code_path_off_by_a_millionth(monkeypatch):
    """The FAVOR+ (column-stabilised) path must equal the quadratic form to 1e-12, not to 1e-6."""
    real = q3.linear_attention

    def off(q, k, v, fm, **kw):
        out = real(q, k, v, fm, **kw)
        return out + 1e-6 if isinstance(fm, PositiveRandomFeatures) else out

    monkeypatch.setattr(q3, "linear_attention", off)
    ev = q3.kernelised_attention_claim(0, True)
    assert 1e-7 < ev.numbers["max_abs_diff_favor_vs_quadratic_form"] < 1e-5
    assert not ev.confirmed


def test_3_3_refutes_a_peak_above_one_n_by_n_matrix_even_when_linear(monkeypatch):
    """Memory linear in n but above one n×n float32 matrix at the largest n is refuted."""
    real = q3.peak_memory
    monkeypatch.setattr(q3, "peak_memory", lambda fn, *a: 64 * real(fn, *a))
    ev = q3.kernelised_attention_claim(0, True)
    assert 0.9 < ev.numbers["exponent_memory_n"] < 1.1
    assert ev.numbers["peak_bytes_at_max_n"] > ev.numbers["n_by_n_float32_bytes_at_max_n"]
    assert not ev.confirmed


def test_3_4_refutes_a_kernel_estimator_biased_by_two_percent(monkeypatch):
    """A Monte-Carlo mean 2% above exp(xᵀy) (several standard errors, the slope still ≈ −½) is refuted."""
    real = q3._kernel_estimates
    monkeypatch.setattr(q3, "_kernel_estimates", lambda *a, **kw: 1.02 * real(*a, **kw))
    ev = q3.positive_random_features_claim(0, True)
    n = ev.numbers
    assert 4 < abs(n["mc_mean"] - n["exp_xy"]) / n["mc_stderr"] < 40 and -0.6 < n["exponent_mc_error"] < -0.4
    assert not ev.confirmed


@pytest.mark.parametrize("cos", [-0.9, 0.0, 0.3, 0.9])
def test_pair_has_the_asked_norms_and_cosine(cos):
    x, y = q3._pair(4, 0.8, 1.5, cos, torch.Generator().manual_seed(1))
    assert float(x.norm()) == pytest.approx(0.8) and float(y.norm()) == pytest.approx(1.5)
    assert float(x @ y) / (0.8 * 1.5) == pytest.approx(cos)


def test_q3_claims_run_on_one_intra_op_thread():
    """_one_thread runs the claim on 1 thread and restores the count after."""
    before = torch.get_num_threads()
    assert q3._one_thread(lambda seed, quick: torch.get_num_threads())(0, True) == 1
    assert torch.get_num_threads() == before


def test_3_5_refutes_orthogonal_features_no_better_than_iid(monkeypatch):
    """'Orthogonal' estimates that are the i.i.d. ones (MSE ratio exactly 1) are refuted: orthogonal must be lower."""
    real = q3._kernel_estimates

    def no_orthogonal(cls, x, y, m, draws, *, orthogonal, seed, sign_correction=True):
        return real(cls, x, y, m, draws, orthogonal=orthogonal and not sign_correction, seed=seed,
                    sign_correction=sign_correction)

    monkeypatch.setattr(q3, "_kernel_estimates", no_orthogonal)
    ev = q3.choice_of_m_claim(0, True)
    assert ev.numbers["mse_orthogonal_over_iid"] == pytest.approx(1.0)
    assert not ev.confirmed


def test_3_5_refutes_a_comparison_whose_uncorrected_draws_are_corrected(monkeypatch):
    """The pitfall must show: if the 'no sign correction' draws are sign-corrected, they are unbiased: refuted."""
    real = features.gaussian_orthogonal_random_matrix
    monkeypatch.setattr(features, "gaussian_orthogonal_random_matrix",
                        lambda *a, sign_correction=True, **kw: real(*a, sign_correction=True, **kw))
    ev = q3.choice_of_m_claim(0, True)
    assert abs(ev.numbers["relative_bias_no_sign_correction"]) < 4 * ev.numbers["bias_stderr_no_sign_correction"]
    assert not ev.confirmed


def test_3_5_refutes_trigonometric_estimates_no_worse_than_positive_where_the_kernel_is_small(monkeypatch):
    """Trigonometric error must exceed 10× the positive one at the smallest kernel, not only 5× its own at the
    largest: 'trigonometric' estimates that are the positive ones there (and, elsewhere, trigonometric ones with 16×
    the vectors, so that their own error still falls with the kernel) are refuted."""
    real = q3._kernel_estimates
    calls = []

    def estimates(cls, x, y, m, draws, *, seed, **kw):
        if not (cls is TrigRandomFeatures and seed == q3._draw_seed(0, 3)):  # the small-kernel comparison's draws
            return real(cls, x, y, m, draws, seed=seed, **kw)
        calls.append(m)
        if len(calls) == 1:  # cos −0.9, the smallest kernel
            return real(PositiveRandomFeatures, x, y, m, draws, seed=seed, **kw)
        return real(cls, x, y, 16 * m, draws, seed=seed, **kw)

    monkeypatch.setattr(q3, "_kernel_estimates", estimates)
    ev = q3.choice_of_m_claim(0, True)
    assert ev.numbers["trig_relative_rmse_smallest_kernel"] == ev.numbers["positive_relative_rmse_smallest_kernel"]
    assert not ev.confirmed


# ------------------------------------------------------------------------------------------- q4_weight_decay
def test_basin_orientation_takes_at_least_three_cells():
    """A 3×3 grid's 20% is 1.8 cells: still the best 3 are taken."""
    mean = np.arange(9, dtype=float).reshape(3, 3)
    assert len(q4.basin_orientation(mean)[1]) == 3


def test_basin_orientation_rounds_the_fraction_of_cells():
    """30% of a 4×4 grid is 4.8 cells: 5 are taken, not 4."""
    mean = np.arange(16, dtype=float).reshape(4, 4)
    assert len(q4.basin_orientation(mean, fraction=0.3)[1]) == 5


def _two_replicates():
    """(5, 5, 2): replicate 0 has its best cells on one weight decay (r = 0), replicate 1 on the anti-diagonal."""
    lr, wd = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    aligned = np.abs(wd - 2).astype(float) + 0.001 * lr
    diagonal = np.abs(lr + wd - 4).astype(float) + 0.001 * lr
    return np.stack([aligned, 10 * diagonal], axis=-1)


def test_orientation_interval_resamples_every_replicate():
    """The bootstrap draws from all S replicates, the last included: here it sees the diagonal of replicate 1."""
    lo, hi = q4.orientation_interval(_two_replicates(), seed=0, draws=200)
    assert lo < -0.9 and hi == 0.0  # a quarter of the draws pick replicate 0 only


def test_bootstrap_intervals_are_central_quantiles():
    """At level 0 both intervals shrink to the median of their draws (lo == hi); at 0.5 they are ordered."""
    rng = np.random.default_rng(3)
    lr, wd = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    noisy = np.abs(lr + wd - 4).astype(float)[..., None] + 1.5 * rng.standard_normal((5, 5, 6))  # r varies by draw
    flat = rng.standard_normal((5, 5, 6))
    for interval in (q4.orientation_interval, lambda e, **kw: q4.orientation_gap_interval(e, flat, **kw)):
        lo, hi = interval(noisy, seed=0, draws=200, level=0.0)
        assert lo == hi
        lo, hi = interval(noisy, seed=0, draws=200, level=0.5)
        assert lo < hi


def test_surface_signal_to_noise_value():
    """std over cells of the mean / median standard error (ddof=1) of a cell, on a hand-computed (1, 3, 2) grid."""
    errors = np.array([[[0.0, 2.0], [1.0, 1.0], [4.0, 6.0]]])  # means 1, 1, 5; se 1, 0, 1 (ddof=1, /√2)
    assert q4.surface_signal_to_noise(errors) == pytest.approx(np.std([1.0, 1.0, 5.0]) / 1.0)


def test_decay_per_step_values():
    """SGD+L2 decays lr·wd/(1−μ) per step with μ = 0.9 by default; Adam+L2 lr·wd/√r̂; torch's lr·λ; decoupled λ."""
    assert q4.decay_per_step("l2", "sgd", 0.1, 0.01) == pytest.approx(0.01)
    assert q4.decay_per_step("l2", "sgd", 0.1, 0.01, momentum=0.5) == pytest.approx(0.002)
    assert q4.decay_per_step("l2", "adam", 0.1, 0.01) == pytest.approx(0.001 / q4.ADAM_L2_GRAD_RMS)
    assert q4.decay_per_step("decoupled_lr", "adam", 0.1, 0.01) == pytest.approx(0.001)
    assert q4.decay_per_step("decoupled", "sgd", 0.1, 0.01) == 0.01


def test_total_decay_follows_the_steps_asked_for():
    """D over a 10-step cosine schedule is Σ m_t = 5.5 times the decay per step."""
    scheme = q4.SCHEMES[1]  # adam-decoupled: decay per step = wd
    assert q4.total_decay(scheme, 1e-2, 0.1, steps=10) == pytest.approx(0.55)


def test_replicate_split_seeds_are_those_of_the_recorded_observations():
    """The recorded seed observations were measured with split seeds 1000·(data_seed + 1) + replicate."""
    assert q4.replicate_split(0, 0) == 1000 and q4.replicate_split(3, 4) == 4004


def test_rotation_exponents_skip_cells_that_did_not_rotate():
    """A cell with rotation 0 (log −∞) is left out like a diverged one; with 2 usable cells there is no fit."""
    lrs, wds = np.logspace(-3, -1, 4), np.logspace(-2, 0, 5)
    rotation = np.sqrt(np.outer(lrs, wds))
    rotation[0, 0] = 0.0
    assert q4.rotation_exponents(rotation, lrs, wds) == pytest.approx((0.5, 0.5), abs=1e-9)
    two = np.full((4, 5), np.nan)
    two[0, 0], two[1, 1] = 0.1, 0.2
    assert np.isnan(q4.rotation_exponents(two, lrs, wds)[0])


def _grids(same: tuple[str, ...] = ()) -> q4.Grids:
    """(4, 4, 3) grids: L2 panels diagonal, decoupled panels with the best cells on one weight decay (fixed
    replicate noise); ``same``: optimizers whose decoupled panel is a copy of the L2 panel."""
    rng = np.random.default_rng(0)
    lr, wd = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    diagonal = 0.05 + 0.01 * np.abs(lr + wd - 3) + 0.0001 * lr
    aligned = 0.049 + 0.01 * np.abs(wd - 1) + 0.0001 * lr  # its best 0.1 points below: beyond the noise
    errors, rotation = {}, {}
    for scheme in q4.SCHEMES:
        copy = scheme.decay == "decoupled" and scheme.optimizer in same
        base = diagonal if scheme.decay != "decoupled" or copy else aligned
        errors[scheme.name] = base[..., None] + 0.0005 * rng.standard_normal((4, 4, 3))
        if copy:
            errors[scheme.name] = errors[f"{scheme.optimizer}-l2"].copy()
        rotation[scheme.name] = np.ones((4, 4, 3))
    return q4.Grids(errors, rotation)


def _verdict(monkeypatch, grids: q4.Grids, gap_intervals: dict[str, tuple[float, float]] | None = None):
    """why_decoupled on ``grids`` with short bootstraps; ``gap_intervals`` overrides the paired gap interval of an
    optimizer ('adam', 'sgd')."""
    real_interval, real_gap = q4.orientation_interval, q4.orientation_gap_interval
    monkeypatch.setattr(q4, "run_grids", lambda cfg, data_seed: grids)
    monkeypatch.setattr(q4, "orientation_interval", lambda e, seed: real_interval(e, seed, draws=100))

    def gap(coupled, decoupled, seed):
        for opt, interval in (gap_intervals or {}).items():
            if coupled is grids.errors[f"{opt}-l2"]:
                return interval
        return real_gap(coupled, decoupled, seed, draws=100)

    monkeypatch.setattr(q4, "orientation_gap_interval", gap)
    monkeypatch.setattr(q4, "_rotation_figure", lambda *a: None)
    return q4.why_decoupled(0, True)


def _best_and_se(e: np.ndarray) -> tuple[float, float]:
    mean, se = e.mean(-1), e.std(-1, ddof=1) / np.sqrt(e.shape[-1])
    b = np.unravel_index(np.argmin(mean), mean.shape)
    return float(mean[b]), float(se[b])


def _best_cell(e: np.ndarray) -> tuple[int, ...]:
    mean = e.mean(-1)
    return tuple(int(i) for i in np.unravel_index(np.argmin(mean), mean.shape))


def test_verdict_reports_the_standard_errors_and_the_signed_gaps(monkeypatch):
    """Best-cell standard errors use ddof=1, the gap's standard error is that of the paired difference over the
    replicates; gaps: L2 − decoupled."""
    grids = _grids()
    ev = _verdict(monkeypatch, grids)
    n = ev.numbers
    _, se_l2 = _best_and_se(grids.errors["adam-l2"])
    assert n["best_test_error_se_adam_l2"] == pytest.approx(se_l2)
    diff = (grids.errors["adam-decoupled"][_best_cell(grids.errors["adam-decoupled"])]
            - grids.errors["adam-l2"][_best_cell(grids.errors["adam-l2"])])
    assert n["adam_best_error_gap_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    for opt in ("adam", "sgd"):
        gap = abs(n[f"orientation_{opt}_l2"]) - abs(n[f"orientation_{opt}_decoupled"])
        assert n[f"orientation_gap_{opt}_l2_minus_decoupled"] == pytest.approx(gap) and gap > 0.5
    assert ev.confirmed


def test_the_error_criterion_pairs_the_replicates_that_every_cell_shares(monkeypatch):
    """Every cell trains on the same replicates, so their errors move together; the gap's standard error added
    the two cells' in quadrature, as for independent estimates, and let a decoupled scheme that is worse on every
    replicate pass the criterion "≤ L2's, or within one standard error of the difference"."""
    grids = _grids()
    shared = np.array([0.0, 0.02, 0.04])  # per replicate, the same in every cell: a harder or easier split
    for name in grids.errors:
        grids.errors[name] = grids.errors[name] + shared
    grids.errors["adam-decoupled"] = grids.errors["adam-decoupled"] + 0.006  # worse on every replicate
    ev = _verdict(monkeypatch, grids)
    n = ev.numbers
    (_, se_l2), (_, se_dec) = _best_and_se(grids.errors["adam-l2"]), _best_and_se(grids.errors["adam-decoupled"])
    gap = n["adam_best_error_gap_decoupled_minus_l2"]
    assert n["adam_best_error_gap_se"] < gap < np.hypot(se_l2, se_dec)  # the two rules disagree here
    assert n["point_criterion_passes"] == 0.0 and not ev.confirmed
    (failed,) = [text for text, ok in ev.checks.items() if not ok]
    assert "one standard error of the paired difference" in failed


def test_verdict_needs_the_sgd_gap_beyond_noise_too(monkeypatch):
    """An SGD gap whose bootstrap interval reaches 0 refutes, even with the Adam gap resolved."""
    ev = _verdict(monkeypatch, _grids(), {"sgd": (-0.1, 0.5)})
    assert ev.numbers["point_criterion_passes"] == 1.0
    assert not ev.confirmed and "SGD orientation gap not beyond" in ev.notes


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_verdict_needs_decoupled_strictly_more_axis_aligned(monkeypatch, opt):
    """Equal |r| (decoupled panel = L2 panel) fails the point criterion, whatever the gap interval says."""
    grids = _grids(same=(opt,))
    ev = _verdict(monkeypatch, grids, {opt: (0.2, 0.4)})
    assert ev.numbers[f"orientation_gap_{opt}_l2_minus_decoupled"] == 0.0
    assert ev.numbers["point_criterion_passes"] == 0.0 and not ev.confirmed


# ------------------------------------------------------------------------------------------- extras_charlm
_EVALS = [{"seconds": 1.0, "heldout_bpc": 5.0}, {"seconds": 3.0, "heldout_bpc": 3.0},
          {"seconds": 7.0, "heldout_bpc": 2.0}]


def test_at_time_is_the_first_evaluation_at_its_own_time():
    """A time equal to the first evaluation's reads that evaluation, not the last one."""
    assert extras_charlm._at_time(_EVALS, 1.0) == 5.0


def test_at_time_interpolates_linearly_from_the_earlier_evaluation():
    """Between two evaluations the bits/char is interpolated from the earlier towards the later one."""
    assert extras_charlm._at_time(_EVALS, 1.5) == pytest.approx(4.5)
    assert extras_charlm._at_time(_EVALS, 6.0) == pytest.approx(2.25)


def test_at_time_past_the_last_evaluation_is_the_last_bits_per_char():
    assert extras_charlm._at_time(_EVALS, 50.0) == 2.0


def test_both_settings_train_at_the_sequence_length_of_the_statement():
    """The statement is about 4096 characters, quick or not; evaluations cover whole windows of that length."""
    for quick in (True, False):
        config, steps, eval_every, eval_chars = extras_charlm._settings(quick)
        assert config.seq_len == 4096 and "4096" in extras_charlm.STATEMENT
        assert (eval_chars - 1) % config.seq_len == 0 and eval_chars > config.seq_len
        assert 0 < eval_every <= steps


_FAKE = {  # kind: (characters/s, final bits/char, training seconds, evaluations (seconds, bits/char))
    "softmax": (100.0, 3.0, 10.0, [(0.0, 6.0), (5.0, 4.0), (10.0, 3.0)]),
    "separable": (400.0, 3.6, 4.0, [(0.0, 6.0), (2.0, 5.0), (4.0, 3.6)]),
    "linear": (300.0, 3.2, 6.0, [(0.0, 6.0), (3.0, 4.5), (6.0, 3.2)]),
    "favor": (200.0, 3.1, 8.0, [(0.0, 6.0), (4.0, 4.2), (8.0, 3.1)]),
}


@pytest.fixture
def fake_charlm(monkeypatch):
    """charlm_kinds with an instant trainer that returns _FAKE's metrics; records (config, threads) per call."""
    calls = []

    def train(config, steps, *, eval_every, eval_chars):
        calls.append((config, torch.get_num_threads()))
        tps, bpc, seconds, evals = _FAKE[config.attention]
        return SimpleNamespace(metrics={
            "tokens_per_second": tps, "final_bpc": bpc, "train_seconds": seconds, "unigram_bpc": 4.4,
            "evals": [{"seconds": s, "heldout_bpc": b} for s, b in evals], "data": {"vocab_size": 90}})

    monkeypatch.setattr(extras_charlm, "train_charlm", train)
    return calls


def test_charlm_numbers_and_verdict_from_the_runs(fake_charlm):
    """Speed-ups are kind over softmax, the bpc cost is separable minus softmax, the common time is the shortest
    run, read on every kind's curve; linear-time kinds faster and separable worse: confirmed."""
    ev = extras_charlm.charlm_kinds(3, False)
    n = ev.numbers
    assert n["favor_speedup"] == pytest.approx(2.0) and n["linear_speedup"] == pytest.approx(3.0)
    assert n["separable_bpc_cost"] == pytest.approx(0.6)
    assert n["common_seconds"] == 4.0
    assert n["softmax_bpc_at_common_seconds"] == pytest.approx(4.4)
    assert n["separable_bpc_at_common_seconds"] == pytest.approx(3.6)
    assert n["unigram_bpc"] == 4.4 and n["seq_len"] == 4096
    assert ev.confirmed and ev.notes == ""


def test_charlm_trains_every_kind_with_the_seed_on_one_thread(fake_charlm):
    """Each kind is trained once, with the claim's seed, on THREADS = 1 intra-op thread (the method's setting)."""
    before = torch.get_num_threads()
    ev = extras_charlm.charlm_kinds(7, True)
    assert [c.attention for c, _ in fake_charlm] == list(ATTENTION_KINDS)
    assert all(c.seed == 7 for c, _ in fake_charlm)
    assert all(threads == 1 for _, threads in fake_charlm) and ev.numbers["intra_op_threads"] == 1
    assert torch.get_num_threads() == before


def test_charlm_is_refuted_when_only_one_linear_time_kind_is_faster(fake_charlm, monkeypatch):
    """Both favor and linear must beat softmax's throughput."""
    monkeypatch.setitem(_FAKE, "favor", (50.0, *_FAKE["favor"][1:]))
    ev = extras_charlm.charlm_kinds(0, False)
    # the note names the kind that is not faster (it had said "linear-time kinds" with linear 3x faster)
    assert not ev.confirmed and ev.notes == "not faster than softmax here: favor 0.50x"
    assert "favor 0.500×, linear 3.000×" in ev.summary


def test_charlm_quick_judges_throughput_only_and_full_judges_the_bits_per_char(fake_charlm, monkeypatch):
    """--quick does not judge separable's bits/char; a full run with separable no worse than softmax is refuted."""
    monkeypatch.setitem(_FAKE, "separable", (400.0, 2.9, *_FAKE["separable"][2:]))
    quick = extras_charlm.charlm_kinds(0, True)
    assert quick.confirmed and "not judged" in quick.notes and "(not judged in --quick)" in quick.summary
    full = extras_charlm.charlm_kinds(0, False)
    assert not full.confirmed and "separable not worse" in full.notes
    assert f"separable ends {full.numbers['separable_bpc_cost']:+.3f} bits/char" in full.summary
    assert full.summary.endswith("(must be > 0)")


def test_charlm_lists_every_criterion_of_its_verdict_as_a_check(fake_charlm, monkeypatch):
    """Its checks were empty, so the report showed no criteria list (docs/cli.md: checks maps every criterion of the
    verdict to whether it held); --quick leaves out the bits/char criterion it does not judge."""
    monkeypatch.setitem(_FAKE, "favor", (50.0, *_FAKE["favor"][1:]))
    full = extras_charlm.charlm_kinds(0, False)
    assert list(full.checks.values()) == [False, True, True]
    assert "favor throughput 0.500× softmax's (needs > 1×)" in full.checks
    assert "separable ends +0.600 bits/char from softmax (needs > 0)" in full.checks
    quick = extras_charlm.charlm_kinds(0, True)
    assert len(quick.checks) == 2 and not any("separable" in c for c in quick.checks)
    assert full.confirmed == all(full.checks.values())
