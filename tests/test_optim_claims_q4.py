"""The Q4 claim machinery: basin orientation, batched grid training, and the fast claims' verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optim_helpers import single_thread  # noqa: F401 (an autouse fixture)

from theorylab.claims import q4_weight_decay as q4


def test_basin_orientation_axis_aligned_diagonal_and_degenerate():
    lr, wd = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    diagonal = np.abs(lr + wd - 4).astype(float) + 0.01 * lr  # best cells on the anti-diagonal
    r, cells = q4.basin_orientation(diagonal)
    assert r < -0.9 and len(cells) == 5
    one_wd = np.abs(wd - 2).astype(float) + 0.001 * lr  # best cells share wd = 2
    assert q4.basin_orientation(one_wd)[0] == 0.0
    rising = np.abs(lr - wd).astype(float) + 0.01 * lr
    assert q4.basin_orientation(rising)[0] > 0.9


def test_stacked_grid_training_equals_separate_runs():
    """train_row trains K·S models at once; one model per call must give the same test errors."""
    cfg = q4.GridConfig(n_lr=1, n_wd=2, seeds=2, steps=5, hidden=8, n_train=60)
    scheme = q4.SCHEMES[0]
    both, both_rotation = q4.train_row(scheme, 1e-2, (1e-3, 1e-1), cfg, data_seed=0)  # (K=2, S=2)
    assert both.shape == both_rotation.shape == (2, 2)
    single, single_rotation = q4.train_row(scheme, 1e-2, (1e-1,), cfg, data_seed=0)
    np.testing.assert_allclose(both[1], single[0], atol=1e-6)
    np.testing.assert_allclose(both_rotation[1], single_rotation[0], rtol=1e-4)


@pytest.mark.parametrize("scheme", [q4.SCHEMES[1], q4.SCHEMES[2]], ids=lambda s: s.name)
def test_cells_trained_together_equal_each_cell_trained_alone_bit_for_bit(scheme):
    """train_cells trains L·K·S models as one batch (the learning rates too, which halved the grid's time): every
    cell must give exactly what it gives alone, so batching more or less cannot move the claim's numbers."""
    cfg = q4.GridConfig(n_lr=2, n_wd=2, seeds=2, steps=6, hidden=8, n_train=60)
    lrs, wds = (1e-2, 3e-2), (1e-3, 1e-1)
    errors, rotation = q4.train_cells(scheme, lrs, wds, cfg, data_seed=0)
    assert errors.shape == rotation.shape == (2, 2, 2)
    for i, lr in enumerate(lrs):
        for j, wd in enumerate(wds):
            alone_errors, alone_rotation = q4.train_row(scheme, lr, (wd,), cfg, data_seed=0)
            np.testing.assert_array_equal(errors[i, j], alone_errors[0])
            np.testing.assert_array_equal(rotation[i, j], alone_rotation[0])


def test_run_grids_splits_the_learning_rates_among_many_workers_and_puts_them_back_in_order():
    """Ten workers: each scheme's three learning rates run as two tasks; the grids must be each
    scheme's cells trained in one call, in the grid's order."""
    cfg = q4.GridConfig(n_lr=3, n_wd=1, seeds=2, steps=3, hidden=4, n_train=40)
    assert [len(task[1]) for task in q4.grid_tasks(cfg, 0, workers=10)] == [2, 1] * len(q4.SCHEMES)
    assert [len(task[1]) for task in q4.grid_tasks(cfg, 0, workers=9)] == [3] * len(q4.SCHEMES)
    assert [len(task[1]) for task in q4.grid_tasks(cfg, 0, workers=100)] == [1, 1, 1] * len(q4.SCHEMES)
    one, ten = q4.run_grids(cfg, data_seed=0, workers=1), q4.run_grids(cfg, data_seed=0, workers=10)
    for scheme in q4.SCHEMES:
        lrs = tuple(float(lr) for lr in q4.grid_axis(scheme.log10_lr, cfg.n_lr))
        wds = tuple(float(wd) for wd in q4.grid_axis(scheme.log10_wd, cfg.n_wd))
        errors, rotation = q4.train_cells(scheme, lrs, wds, cfg, data_seed=0)
        for grids in (one, ten):
            np.testing.assert_array_equal(grids.errors[scheme.name], errors)
            np.testing.assert_array_equal(grids.rotation[scheme.name], rotation)


def test_run_grids_shapes_in_process():
    cfg = q4.GridConfig(n_lr=2, n_wd=2, seeds=2, steps=2, hidden=4, n_train=40)
    grids = q4.run_grids(cfg, data_seed=0, workers=1)
    assert set(grids.errors) == set(grids.rotation) == {s.name for s in q4.SCHEMES}
    for name, e in grids.errors.items():
        assert e.shape == grids.rotation[name].shape == (2, 2, 2) and np.all((0 <= e) & (e <= 1))
        assert np.all((grids.rotation[name] > 0) & (grids.rotation[name] < np.pi))


def test_run_grids_in_processes_forks_without_an_accelerator_and_spawns_with_one(monkeypatch):
    """Both start methods give the single process's errors. Spawn is used where torch sees a GPU: there a child
    forked after a backward pass fails its own (autograd's device threads), which broke claim 4.4 in `verify` on a
    GPU machine (test_cuda.py checks that case on a GPU)."""
    import sys

    cfg = q4.GridConfig(n_lr=2, n_wd=2, seeds=2, steps=3, hidden=4, n_train=40)
    one = q4.run_grids(cfg, data_seed=0, workers=1)
    if sys.platform.startswith("linux") and not q4._has_accelerator():
        assert q4._pool_context().get_start_method() == "fork"
    monkeypatch.setattr(q4, "available_cores", lambda: 3)  # the default: one worker per usable CPU
    forked = q4.run_grids(cfg, data_seed=0)
    for name in one.errors:
        np.testing.assert_array_equal(forked.errors[name], one.errors[name])
    monkeypatch.setattr(q4, "_has_accelerator", lambda: True)
    assert q4._pool_context().get_start_method() == "spawn"
    spawned = q4.run_grids(cfg, data_seed=0, workers=2)
    for name in one.errors:
        np.testing.assert_array_equal(spawned.errors[name], one.errors[name])
        np.testing.assert_allclose(spawned.rotation[name], one.rotation[name], rtol=1e-12)


def test_run_grids_takes_any_integer_worker_count():
    cfg = q4.GridConfig(n_lr=1, n_wd=1, seeds=2, steps=1, hidden=4, n_train=40)
    assert set(q4.run_grids(cfg, 0, workers=np.int64(1)).errors) == {s.name for s in q4.SCHEMES}


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_run_grids_refuses_a_bad_worker_count(workers):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        q4.run_grids(q4.GridConfig(n_lr=1, n_wd=1, seeds=2, steps=1, hidden=4, n_train=40), 0, workers=workers)


def test_decay_sets_the_rotation_by_lambda_alone_when_decoupled_and_by_lr_times_wd_with_l2():
    """The mechanism of 4.4 (short runs): over 100× in lr, Adam's hidden layers rotate at nearly the same rate
    under decoupled decay, and at very different rates with L2 (measured: 1.4× vs 120×)."""
    cfg = q4.GridConfig(n_lr=1, n_wd=1, seeds=2, steps=300, n_train=200)
    ratio = {}
    for name, wd in (("adam-decoupled", 0.1), ("adam-l2", 1.0)):
        scheme = next(s for s in q4.SCHEMES if s.name == name)
        slow, fast = (q4.train_row(scheme, lr, (wd,), cfg, data_seed=0)[1].mean() for lr in (1e-3, 1e-1))
        ratio[name] = fast / slow
    assert 0.5 < ratio["adam-decoupled"] < 2.0 and ratio["adam-l2"] > 10, ratio


def test_rotation_exponents_recover_a_power_law_and_skip_diverged_cells():
    lrs, wds = np.logspace(-3, -1, 4), np.logspace(-2, 0, 5)
    lr, wd = np.meshgrid(lrs, wds, indexing="ij")
    rotation = 0.3 * lr**0.5 * wd**0.25
    assert q4.rotation_exponents(rotation, lrs, wds) == pytest.approx((0.5, 0.25), abs=1e-9)
    rotation[-1, -1] = np.nan  # a diverged cell is left out, not fitted
    assert q4.rotation_exponents(rotation, lrs, wds) == pytest.approx((0.5, 0.25), abs=1e-9)
    assert np.isnan(q4.rotation_exponents(np.full((4, 5), np.nan), lrs, wds)[0])


def test_decay_axis_error_effect_is_the_median_range_over_weight_decays():
    mean = np.array([[0.1, 0.2, 0.1], [0.3, 0.3, 0.3], [0.0, 0.5, 0.1]])  # ranges 0.1, 0.0, 0.5 per lr
    assert q4.decay_axis_error_effect(mean) == pytest.approx(0.1)


@pytest.mark.parametrize("fn", [q4.sgd_l2_equals_weight_decay, q4.adam_l2_changes_one_line, q4.adam_l2_is_uneven,
                                q4.decoupled_decay_is_even])
def test_fast_claims_confirm_in_quick_mode(fn):
    torch.manual_seed(0)
    evidence = fn(0, True)
    assert evidence.confirmed, evidence.numbers
    assert evidence.figures


def test_cosine_multiplier_sum_closed_form_and_bad_input():
    for steps in (1, 40, 300):
        assert q4.cosine_multiplier_sum(steps) == pytest.approx(steps / 2 + 0.5)
    with pytest.raises(ValueError, match="steps"):
        q4.cosine_multiplier_sum(0)


def test_decay_grids_follow_the_total_decay_design():
    """Decoupled grids span D in TOTAL_DECAY; every lr-coupled grid contains that band at every lr of its grid."""
    lo, hi = q4.TOTAL_DECAY
    for scheme in q4.SCHEMES:
        lrs, wds = q4.grid_axis(scheme.log10_lr, 5), q4.grid_axis(scheme.log10_wd, 5)
        d = np.array([[q4.total_decay(scheme, lr, wd) for wd in wds] for lr in lrs])  # (L, K)
        if scheme.decay == "decoupled":
            np.testing.assert_allclose([d.min(), d.max()], [lo, hi], rtol=0.01)
            np.testing.assert_allclose(d, d[:1].repeat(5, 0))  # independent of lr
        else:
            assert np.all(d.min(1) <= lo * 1.01) and np.all(d.max(1) >= hi * 0.99), scheme.name
    with pytest.raises(ValueError, match="bogus"):
        q4.decay_per_step("bogus", "adam", 1e-3, 1e-2)


def test_only_hidden_layers_are_decayed(monkeypatch):
    """The decay acts on the two scale-invariant hidden weight matrices; the classifier and its bias are free."""
    seen = []

    class Recording(q4.Adam):
        def __init__(self, groups, **kw):
            seen.extend(groups)
            super().__init__(groups, **kw)

    monkeypatch.setattr(q4, "Adam", Recording)
    cfg = q4.GridConfig(n_lr=1, n_wd=2, seeds=2, steps=1, hidden=8, n_train=40)
    q4.train_row(q4.SCHEMES[1], 1e-2, (0.1, 0.2), cfg, data_seed=0)
    decayed = [tuple(p.shape) for g in seen if g["weight_decay"] > 0 for p in g["params"]]
    free = [tuple(p.shape) for g in seen if g["weight_decay"] == 0 for p in g["params"]]
    assert q4.CLASSIFIER_NOT_DECAYED
    assert sorted(decayed) == sorted([(2, 64, 8), (2, 8, 8)] * 2)  # (S, in, out) per weight decay
    assert sorted(free) == sorted([(2, 8, 10), (2, 1, 10)] * 2)


def test_orientation_interval_brackets_a_clear_basin_and_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    lr, wd = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    diagonal = np.abs(lr + wd - 4).astype(float)[..., None] + 0.01 * rng.standard_normal((5, 5, 6))
    lo, hi = q4.orientation_interval(diagonal, seed=0, draws=200)
    assert -1.0 <= lo <= hi < -0.8
    with pytest.raises(ValueError, match="shape"):
        q4.orientation_interval(diagonal[..., :1], seed=0)
    with pytest.raises(ValueError, match="shape"):
        q4.orientation_interval(diagonal.mean(-1), seed=0)


def test_signal_to_noise_separates_a_flat_surface_from_a_basin():
    rng = np.random.default_rng(1)
    flat = 0.05 + 0.01 * rng.standard_normal((5, 5, 400))  # cell means differ by noise only
    assert q4.surface_signal_to_noise(flat) < 2.0
    lr = np.arange(5)[:, None, None]
    basin = flat + 0.02 * lr  # a slope 2 SE-of-one-replicate per cell, far above the SE of the mean
    assert q4.surface_signal_to_noise(basin) > 20.0


def test_replicates_draw_their_own_training_sets():
    cfg = q4.GridConfig(seeds=3, n_train=50)
    x, y, x_test, y_test = q4._replicate_data(cfg, data_seed=0)
    assert x.shape == (3, 50, 64) and x_test.shape[0] == 3 and x_test.shape[1] == 1797 - 50
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])
    fixed = q4._replicate_data(q4.GridConfig(seeds=2, n_train=50, resample_data=False), data_seed=0)[0]
    assert torch.equal(fixed[0], fixed[1])


def test_orientation_gap_interval_is_paired_and_signed():
    rng = np.random.default_rng(2)
    lr, wd = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    noise = 0.01 * rng.standard_normal((5, 5, 6))
    diagonal = np.abs(lr + wd - 4).astype(float)[..., None] + noise  # |r| ≈ 1
    aligned = np.abs(wd - 2).astype(float)[..., None] + 0.001 * lr[..., None] + noise  # one wd: r = 0
    lo, hi = q4.orientation_gap_interval(diagonal, aligned, seed=0, draws=200)
    assert 0.8 < lo <= hi <= 1.0
    lo, hi = q4.orientation_gap_interval(aligned, diagonal, seed=0, draws=200)
    assert -1.0 <= lo <= hi < -0.8
    with pytest.raises(ValueError, match="same S"):
        q4.orientation_gap_interval(diagonal, aligned[..., :3], seed=0)


def test_a_gap_interval_that_reaches_zero_by_rounding_is_not_resolved():
    """torch 2.4 gave the SGD gap interval a lower end of 2.2e-16: a tie (|r| equal in exact arithmetic), which
    `lo > 0` had counted as beyond replicate noise."""
    assert q4.gap_side(2.220446049250313e-16, 0.87) == 0
    assert q4.gap_side(-0.87, -2.220446049250313e-16) == 0
    assert q4.gap_side(0.0, 0.0) == 0
    assert q4.gap_side(0.1, 0.7) == 1 and q4.gap_side(-0.7, -0.1) == -1


def _synthetic_grids(structured: bool, seed: int = 0) -> q4.Grids:
    """(4, 4, 3) grids (the --quick shape): L2 panels with a diagonal basin, decoupled panels with the best cells
    on one weight decay; or, unstructured, pure replicate noise everywhere. Rotation: √(lr·wd) or √λ."""
    rng = np.random.default_rng(seed)
    lr, wd = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    diagonal = 0.05 + 0.01 * np.abs(lr + wd - 3) + 0.0001 * lr
    aligned = 0.049 + 0.01 * np.abs(wd - 1) + 0.0001 * lr  # its best 0.1 points below: beyond the noise
    grids, rotation = {}, {}
    for scheme in q4.SCHEMES:
        base = diagonal if scheme.decay != "decoupled" else aligned
        if not structured:
            base = np.full((4, 4), 0.05)
        grids[scheme.name] = base[..., None] + (0.0005 if structured else 0.01) * rng.standard_normal((4, 4, 3))
        lrs, wds = np.meshgrid(q4.grid_axis(scheme.log10_lr, 4), q4.grid_axis(scheme.log10_wd, 4), indexing="ij")
        rot = np.sqrt(wds if scheme.decay == "decoupled" else lrs * wds)
        rotation[scheme.name] = np.repeat(rot[..., None], 3, axis=-1)
    return q4.Grids(grids, rotation)


@pytest.mark.parametrize("structured", [True, False])
def test_verdict_needs_the_orientation_gap_beyond_replicate_noise(monkeypatch, structured):
    monkeypatch.setattr(q4, "run_grids", lambda cfg, data_seed: _synthetic_grids(structured))
    evidence = q4.why_decoupled(0, True)
    assert evidence.confirmed is structured, evidence.notes[:400]
    assert evidence.judged is False and evidence.notes.startswith("--quick: a smoke run")  # --quick's grids
    assert q4.why_decoupled(0, True, cfg=q4.QUICK).judged  # a grid given explicitly (the power study) is judged
    if structured:
        assert evidence.numbers["orientation_gap_adam_bootstrap_90_lo"] > 0.5
    else:
        assert "NOT resolved" in evidence.notes
    # the mechanism is reported whatever the verdict: the fitted exponents of the synthetic rotation
    assert evidence.numbers["rotation_lr_exponent_adam_decoupled"] == pytest.approx(0.0, abs=1e-9)
    assert evidence.numbers["rotation_lr_exponent_adam_l2"] == pytest.approx(0.5, abs=1e-9)
    assert set(evidence.figures) == {"heatmaps", "rotation"}
