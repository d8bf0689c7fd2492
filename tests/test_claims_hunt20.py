"""Regressions found by the twentieth session's bug hunts of the claims and the report: claim 4.4 at the largest
seeds that ``--seed`` accepts, the labels of diverged cells in its figures, the extra sections (an import failure,
a refuted section's reason, the figure's colours) and the report (extras counted, missing figures said)."""

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


def test_an_extra_section_whose_module_fails_to_import_is_an_error_not_dropped(monkeypatch, tmp_path):
    """``--extras`` dropped such a section: the run said "2/2 confirmed" and exited 0 with one section missing."""
    import importlib

    from theorylab.claims import base, engine

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "theorylab.claims.extras_charlm":
            raise ModuleNotFoundError("No module named 'theorylab.experiments'", name="theorylab.experiments")
        return real(name, *args, **kwargs)

    base.extra_sections()  # the real registrations first
    monkeypatch.setattr(importlib, "import_module", fake)
    monkeypatch.setattr(base, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(base, "_EXTRAS", {k: v for k, v in base._EXTRAS.items() if k != "charlm"})
    sections = {s.id: s for s in base.extra_sections()}
    assert set(sections) == {"rnn-tasks", "charlm"} and sections["charlm"].fn is None
    record = engine.run_section(sections["charlm"], seed=0, quick=True, out_dir=tmp_path)
    assert record["verdict"] == "error" and "theorylab.experiments" in record["error"]
    assert base.import_error_for("rnn-tasks", "extra") is None


def _fake_training(monkeypatch, plain_metric_by_T):
    from theorylab.claims import extras_rnn
    from theorylab.rnn.tasks import TrainResult

    def train(task, steps, *, clip, orthogonal, hidden, iterations, lr, seed):
        metric = plain_metric_by_T.get(steps, 0.5) if task == "adding" and not orthogonal and clip is None else 0.5
        return TrainResult(task, steps, clip, orthogonal, metric, metric < 0.1, -1.0 + orthogonal, -1.0, 1.0, 0.1)

    monkeypatch.setattr(extras_rnn, "train", train)
    return extras_rnn


def test_a_refuted_rnn_tasks_section_says_which_criterion_failed(monkeypatch):
    """Its reason in a line had been the first sentence of a fixed copy-memory note ("stays on the plateau",
    beside a metric of 0.2); the section now returns checks, and a refuted one's notes start with the failed one."""
    extras_rnn = _fake_training(monkeypatch, {5: 0.9, 20: 0.2})  # the plain RNN does better at the longer T
    ev = extras_rnn.rnn_tasks(0, True)
    assert not ev.confirmed and [ok for ok in ev.checks.values()] == [False, True]
    assert ev.notes.startswith("Not as expected: adding task, plain RNN: metric 0.2 at T = 20 worse than 0.9")
    assert "plateau" not in ev.notes  # the copy metric (0.5) is far below the plateau
    ok = _fake_training(monkeypatch, {5: 0.2, 20: 0.9}).rnn_tasks(0, True)
    assert ok.confirmed and ok.notes.startswith("Copy memory")


def test_the_rnn_tasks_init_lines_have_their_variants_colours(monkeypatch):
    """--quick runs "plain" (C0) and "orthogonal W + clip" (C1); the orthogonal init line was drawn in C2, the
    colour of the full run's "orthogonal W", which matched no variant in the legend."""
    import matplotlib.colors as mcolors

    ev = _fake_training(monkeypatch, {5: 0.2, 20: 0.9}).rnn_tasks(0, True)
    ax4 = ev.figures["tasks"].axes[3]
    init = {line.get_label(): mcolors.to_hex(line.get_color()) for line in ax4.lines
            if line.get_label().startswith("at init")}
    trained = {line.get_label(): mcolors.to_hex(line.get_color()) for line in ax4.lines
               if not line.get_label().startswith("at init")}
    assert init["at init: orthogonal W (orthogonal W + clip)"] == trained["orthogonal W + clip"]
    assert init["at init: default init (uniform ±1/√H)"] == trained["plain"]


def _record(id_, kind, verdict, figures=()):
    return {"id": id_, "title": id_, "kind": kind, "verdict": verdict, "evidence": {}, "figures": list(figures),
            "seconds": 1.0}


def test_the_report_headline_counts_the_extras_as_the_terminal_does():
    """The page said "1/1 claims confirmed, 0 refuted" where the terminal said 1/2 and the run exited 1."""
    from theorylab.report import render_report

    page = render_report({"claims": [_record("2.2", "claim", "confirmed")],
                          "extras": [_record("charlm", "extra", "refuted")]})
    assert "<b>1/1</b> claims confirmed, 0 refuted, 0 errors; <b>0/1</b> extra sections confirmed, 1 refuted" in page
    assert "extra sections" not in render_report({"claims": [_record("2.2", "claim", "confirmed")]})


def test_a_figure_missing_beside_the_report_is_said_to_be_missing(tmp_path):
    """The page kept an <img> for a PNG that was not there: a broken image, with nothing said."""
    import json

    from theorylab.report.html import write_report

    (tmp_path / "here.png").write_bytes(b"\x89PNG")
    payload = {"claims": [_record("1.1", "claim", "confirmed", ["here.png", "gone.png"])]}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    page = write_report(tmp_path).read_text()
    assert '<img src="here.png"' in page and '<img src="gone.png"' not in page
    assert '<a href="here.png" title="open at full size"><img src="here.png"' in page  # shrunk figures open
    assert "Figure gone.png is missing" in page


def test_an_extra_section_whose_module_is_missing_is_an_error_too(monkeypatch, tmp_path):
    """A ModuleNotFoundError naming the module itself (its file gone) records no import error: the section had
    dropped out all the same."""
    import importlib

    from theorylab.claims import base, engine

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "theorylab.claims.extras_rnn":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    base.extra_sections()
    monkeypatch.setattr(importlib, "import_module", fake)
    monkeypatch.setattr(base, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(base, "_EXTRAS", {k: v for k, v in base._EXTRAS.items() if k != "rnn-tasks"})
    sections = {s.id: s for s in base.extra_sections()}
    assert sections["rnn-tasks"].fn is None and "did not register it" in sections["rnn-tasks"].title
    assert engine.run_section(sections["rnn-tasks"], seed=0, quick=True, out_dir=tmp_path)["verdict"] == "error"


def test_the_full_runs_orthogonal_init_line_is_labelled_once_and_the_plateau_only_at_it(monkeypatch):
    """The full run's legend read "orthogonal W (orthogonal W)"; the plateau was named at a copy metric of 1.8."""
    extras_rnn = _fake_training(monkeypatch, {5: 0.2, 10: 0.3, 20: 0.4, 40: 0.5, 80: 0.9})
    from theorylab.rnn.tasks import TrainResult

    real_train = extras_rnn.train

    def train(task, steps, **kw):
        r = real_train(task, steps, **kw)
        return TrainResult(**{**r.__dict__, "metric": 1.8}) if task == "copy" else r

    monkeypatch.setattr(extras_rnn, "train", train)
    ev = extras_rnn.rnn_tasks(0, False)
    labels = [line.get_label() for line in ev.figures["tasks"].axes[3].lines]
    assert "at init: orthogonal W" in labels and "plateau" not in ev.notes
