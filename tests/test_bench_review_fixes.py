"""Regressions found by the sixth session's review of the benchmarks: timings are medians of interleaved rounds,
the JSON is strict, errors cannot read 0 for a broken result, and every suite judges its targets in code."""

from __future__ import annotations

import json
import math

import pytest
import torch

from theorylab.bench import attention as bench_attention
from theorylab.bench import optim as bench_optim
from theorylab.bench import rnn as bench_rnn
from theorylab.cli import main
from theorylab.cost import interleaved_times


def test_interleaved_rounds_rotate_the_order_and_respect_the_budget():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(fns, rounds=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotating rounds
    more = interleaved_times(fns, rounds=2, warmup=0, max_rounds=5, budget_s=1e9)
    assert all(len(v) == 5 for v in more.values())  # budget left: up to max_rounds
    assert interleaved_times({}, rounds=3) == {}
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        interleaved_times(fns, rounds=0)


def test_attention_times_every_contender_in_at_least_three_interleaved_calls(monkeypatch):
    """The bench reported the fastest call, each contender's calls one after another; a slow call (SDPA at
    n=16384, performer causal) was a single sample, or the first call, slowed by the memory tracker."""
    order = []

    def fake(name):
        def call():
            order.append(name)
        return call

    measured = bench_attention._measure({"x": fake("x"), "y": fake("y")}, budget_s=0.0)
    assert {name: calls for name, (_, calls, _) in measured.items()} == {"x": 3, "y": 3}
    assert order == ["x", "y"] + ["x", "y", "y", "x", "x", "y"]  # tracked first calls, then rotating rounds


def test_quick_attention_json_does_not_judge_targets():
    rows = [{"impl": i, "causal": c, "n": 2048, "pass": "forward", "seconds": s, "calls": 3, "peak_mib": 1.0,
             "gflop": None, "efficiency": None}
            for i, s in (("theorylab FAVOR+", 0.1), ("torch SDPA (exact)", 1.0)) for c in (False, True)]
    rows += [{**rows[1], "pass": "forward+backward"}, {**rows[3], "pass": "forward+backward"}]
    targets = bench_attention.targets({"quick": True, "rows": rows})
    assert targets and all(t["must_met"] is None and t["goal_met"] is None for t in targets)


def test_rnn_error_is_inf_where_finiteness_differs_and_nan_when_nothing_compares():
    t = torch.tensor
    assert bench_rnn._rel_err(t([float("nan"), float("nan")]), t([1.0, 2.0])) == math.inf
    assert bench_rnn._rel_err(t([-math.inf, 0.0]), t([5.0, 0.0])) == math.inf
    assert bench_rnn._rel_err(t([-math.inf, 1.0]), t([-math.inf, 1.0])) == 0.0  # exactly zero in both: agree
    assert math.isnan(bench_rnn._rel_err(t([-math.inf]), t([-math.inf])))


def test_rnn_and_optim_judge_their_targets_in_code():
    rows = [{"H": 256, "T": 10000, "seconds": 12.0}]
    (target,) = bench_rnn.targets({"log_jacobian_norms": rows})
    assert target["must_met"] is True and target["measured"] == 12.0
    assert bench_rnn.targets({"log_jacobian_norms": []})[0]["must_met"] is None
    names = [name for name, *_ in bench_optim.TARGETS]
    res = {"threads": 1, "rows": [{"optimizer": n, "vs_torch_foreach": 0.6, "vs_torch_fused": 1.4} for n in names]}
    judged = bench_optim.targets({"quick": False, "results": [res]})
    assert [t["met"] for t in judged] == [True] + [False] * (len(names) - 1)
    assert all(t["met"] is None for t in bench_optim.targets({"quick": True, "results": [res]}))


def test_bench_json_is_strict_and_records_the_date_and_machine(tmp_path, monkeypatch, capsys):
    """NaN FLOP counts were written as bare NaN tokens, which strict JSON parsers refuse."""
    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "x": float("nan"), "y": [math.inf]})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "table")
    out = tmp_path / "o.json"
    assert main(["bench", "optim", "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data["x"] == "nan" and data["y"] == ["inf"]
    assert data["environment"]["date"] and data["environment"]["cpu"]


def test_rounds_that_are_not_a_positive_integer_are_refused():
    """rounds=nan returned empty lists, whose median then failed far from the cause."""
    for rounds in (float("nan"), 2.5, True):
        with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
            interleaved_times({"a": lambda: None}, rounds=rounds)
