"""Regressions found by the twentieth session's bug hunt of the claims: claim 4.4 at the largest seeds that
``--seed`` accepts, and the labels of diverged cells in its figures."""

from __future__ import annotations

import numpy as np
import pytest

from theorylab.claims import q4_weight_decay as q4
from theorylab.cli._args import MAX_SEED


def test_replicate_split_seeds_stay_in_the_range_scikit_learn_takes():
    """1000·(seed + 1) + r passed 2³² − 1 from --seed 4,294,967 on: claim 4.4 ended as an error there."""
    for seed in (0, 4_294_965, 4_294_966, 4_294_967, MAX_SEED):
        for replicate in (0, 999):
            assert 0 <= q4.replicate_split(seed, replicate) <= MAX_SEED
    assert q4.replicate_split(4_294_965, 7) == 1000 * 4_294_966 + 7  # below the limit: the recorded numbers


def test_seeds_beyond_the_limit_draw_their_own_splits():
    """A wrap modulo 2³² gave seeds 2²⁹ apart (0, 2²⁹, 3·2²⁹) the same five splits."""
    splits = {seed: [q4.replicate_split(seed, r) for r in range(5)] for seed in (0, 2**29, 3 * 2**29, MAX_SEED)}
    assert len({tuple(v) for v in splits.values()}) == 4
    assert len({s for v in splits.values() for s in v}) == 20


def test_replicate_data_loads_at_the_largest_seed():
    cfg = q4.GridConfig(seeds=2, n_train=40)
    x, y, x_test, y_test = q4._replicate_data(cfg, data_seed=MAX_SEED)
    assert x.shape == (2, 40, 64) and not np.array_equal(x[0].numpy(), x[1].numpy())


@pytest.mark.parametrize("where", ["every replicate", "one replicate"])
def test_a_diverged_cell_of_the_rotation_figure_is_grey_with_a_dark_label(where):
    """A diverged cell (NaN) was left transparent with a white label: white on the white figure, unreadable."""
    import matplotlib.colors as mcolors

    cfg = q4.GridConfig(n_lr=3, n_wd=3, seeds=2)
    rng = np.random.default_rng(0)
    rotation = {s.name: rng.uniform(1e-3, 1e-1, (3, 3, 2)) for s in q4.SCHEMES}
    errors = {s.name: rng.uniform(0.05, 0.1, (3, 3, 2)) for s in q4.SCHEMES}
    if where == "every replicate":
        rotation["sgd-l2"][2, 2] = np.nan
    else:
        rotation["sgd-l2"][2, 2, 1] = np.nan  # the cell's mean is NaN too
    stats = {name: (e.mean(-1),) for name, e in errors.items()}
    fig = q4._rotation_figure(q4.Grids(errors, rotation), stats, cfg)
    ax = fig.axes[[s.name for s in q4.SCHEMES].index("sgd-l2")]
    (label,) = [t for t in ax.texts if t.get_text() == "diverged"]
    assert mcolors.to_rgb(label.get_color()) == (0.0, 0.0, 0.0)
    bad = ax.images[0].get_cmap().get_bad()
    assert bad[3] == 1.0 and mcolors.to_rgb(bad) != (1.0, 1.0, 1.0)  # opaque, and not the figure's white
    numbers = [t for t in ax.texts if t.get_text() != "diverged"]
    assert len(numbers) == 8 and {mcolors.to_rgb(t.get_color()) for t in numbers} <= {(0, 0, 0), (1, 1, 1)}
