"""Tests that kill mutants which survived the rest of the suite (cost measures, the claims engine and registry,
the HTML report): each pins down one behaviour the other tests left unchecked."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from theorylab.claims import Evidence, Section, base, claim, claim_sections, extra, extra_sections, run_claims
from theorylab.claims.base import torch_threads
from theorylab.claims.engine import json_number, json_safe
from theorylab.cost import PeakMemory, median_time, peak_memory
from theorylab.cost import timing as timing_module
from theorylab.report import render_report
from theorylab.report.html import format_number


class _FakeClock:
    """A ``time`` stand-in whose ``perf_counter`` advances only when a timed function says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _clocked(monkeypatch, durations):
    """A function that takes ``durations[i]`` fake seconds on its i-th call; and the list of its calls."""
    clock = _FakeClock()
    monkeypatch.setattr(timing_module, "time", clock)
    calls = []

    def fn():
        clock.now += durations[len(calls)]
        calls.append(1)

    return fn, calls


# --- cost.memory ---------------------------------------------------------------------------------------------------


def test_peak_memory_ignores_meta_tensors():
    """A meta tensor has no real storage: creating one inside the call adds no bytes."""
    assert peak_memory(lambda: torch.empty(1000, device="meta")) == 0
    assert peak_memory(lambda: (torch.empty(1000, device="meta"), torch.empty(10))) == 40


def test_a_storage_already_counted_is_not_counted_again():
    """A storage made in the block and returned again by lift_fresh (its argument is not an input) counts once."""
    with PeakMemory() as m:
        a = torch.zeros(1000)
        b = torch.ops.aten.lift_fresh(a)
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert m.peak == 4000 and m.current == 4000


def test_frees_after_the_block_do_not_change_its_reading():
    """After the block, current and peak keep their values at its end even when its tensors are freed later."""
    with PeakMemory() as m:
        kept = torch.zeros(1000)
    del kept
    assert m.current == 4000 and m.peak == 4000


def test_peak_memory_counts_the_whole_storage_not_the_tensors_bytes():
    """A strided result whose storage is larger than its elements counts its storage's bytes."""
    assert peak_memory(lambda: torch.empty_strided((2, 2), (4, 1))) == 6 * 4


def test_an_out_argument_allocates_nothing():
    """Writing into an out= tensor that existed before the call adds no bytes."""
    x, o = torch.randn(1000), torch.empty(1000)
    assert peak_memory(lambda: torch.add(x, x, out=o)) == 0


# --- cost.timing ---------------------------------------------------------------------------------------------------


def test_median_time_is_the_median_not_the_fastest(monkeypatch):
    """median_time returns the median of the timed runs (the warm-up excluded), not their minimum."""
    fn, calls = _clocked(monkeypatch, [100.0, 1.0, 5.0, 3.0])
    assert median_time(fn, repeats=3, warmup=1) == 3.0
    assert len(calls) == 4


def test_median_time_with_one_repeat_times_one_run_after_the_warmup(monkeypatch):
    """repeats=1: one timed run after the warm-up. (repeats=0 had been taken as 1; it is now a ValueError, as
    rounds=0 is for interleaved_times: tests/test_bench_hunt20.py.)"""
    fn, calls = _clocked(monkeypatch, [9.0, 2.0])
    assert median_time(fn, repeats=1, warmup=1) == 2.0
    assert len(calls) == 2


def test_median_time_stops_once_the_budget_is_reached_exactly(monkeypatch):
    """The budget stops the runs once the timed seconds reach it (>=), not only once they exceed it."""
    fn, calls = _clocked(monkeypatch, [1.0] * 10)
    assert median_time(fn, repeats=10, warmup=0, budget_s=2.0) == 1.0
    assert len(calls) == 2


def test_median_time_runs_every_warmup_call(monkeypatch):
    """``warmup`` untimed runs come before the timed ones, all of them."""
    fn, calls = _clocked(monkeypatch, [50.0, 50.0, 1.0, 1.0])
    assert median_time(fn, repeats=2, warmup=2) == 1.0
    assert len(calls) == 4


# --- claims.engine -------------------------------------------------------------------------------------------------


def _sections(*fns):
    return [Section(f"t{i}", f"test {i}", "stmt", "claim", fn) for i, fn in enumerate(fns)]


def _line_figure():
    fig = Figure()
    fig.subplots().plot([0, 1], [0, 1])
    return fig


def test_json_number_writes_numpy_bools_as_integers():
    """numpy bools become the ints 0/1, like Python bools, not the floats 0.0/1.0."""
    for b in (np.bool_(True), np.bool_(False), True):
        assert type(json_number(b)) is int and json_number(b) == int(bool(b))
    assert type(json_safe({"ok": np.bool_(True)})["ok"]) is int


def test_json_safe_converts_floats_inside_tuples():
    """Tuples are walked like lists (and become lists): a NaN inside one becomes the string 'nan'."""
    out = json_safe({"pair": (1.5, float("nan")), "nested": [(float("inf"),)]})
    assert out == {"pair": [1.5, "nan"], "nested": [["inf"]]}
    json.dumps(out, allow_nan=False)


def test_three_figure_names_that_map_to_one_file_write_three_files(tmp_path):
    """'a b', 'a/b' and 'a_b' all map to claim-t0-a_b.png: each still gets its own file."""

    def three(seed, quick):
        return Evidence(confirmed=True, numbers={}, method="m",
                        figures={name: _line_figure() for name in ("a b", "a/b", "a_b")})

    files = run_claims(_sections(three), out_dir=tmp_path, progress=False)["claims"][0]["figures"]
    assert len(files) == len(set(files)) == 3 and all((tmp_path / f).exists() for f in files)


def test_key_names_absent_from_the_numbers_are_dropped(tmp_path):
    """A claim's ``key`` that names a number it did not measure is left out of the record's key list."""

    def keyed(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.0, "y": 2.0}, method="m", key=["y", "missing", "x"])

    rec = run_claims(_sections(keyed), out_dir=tmp_path, progress=False)["claims"][0]
    assert rec["key"] == ["y", "x"]


def test_total_seconds_includes_the_extra_sections(tmp_path):
    """The run's total_seconds sums the extras' seconds as well as the claims'."""

    def slow(seed, quick):
        time.sleep(0.05)
        return Evidence(confirmed=True, numbers={}, method="m")

    extra_section = Section("slow", "slow extra", "", "extra", slow)
    payload = run_claims(_sections(slow) + [extra_section], out_dir=tmp_path, progress=False)
    seconds = [r["seconds"] for r in payload["claims"] + payload["extras"]]
    assert len(seconds) == 2 and min(seconds) >= 0.04
    assert payload["total_seconds"] == round(sum(seconds), 3)


def test_a_failed_figure_adds_to_the_claims_own_notes(tmp_path):
    """A figure that cannot be drawn appends its note to the claim's notes instead of replacing them."""

    def noted(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m", notes="the claim's own note",
                        figures={"axes": Figure().subplots()})

    rec = run_claims(_sections(noted), out_dir=tmp_path, progress=False)["claims"][0]
    assert rec["notes"].startswith("the claim's own note\n") and "is not a matplotlib Figure" in rec["notes"]


def test_a_claim_that_changes_the_thread_count_does_not_change_the_next(tmp_path):
    """The intra-op thread count a claim sets is restored before the next claim runs."""
    seen = {}
    before = torch.get_num_threads()

    def meddles(seed, quick):
        torch.set_num_threads(before + 1)
        return Evidence(confirmed=True, numbers={}, method="m")

    def looks(seed, quick):
        seen["threads"] = torch.get_num_threads()
        return Evidence(confirmed=True, numbers={}, method="m")

    try:
        run_claims(_sections(meddles, looks), out_dir=tmp_path, progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == before


def test_numpy_is_seeded_with_the_run_seed_modulo_two_to_the_32(tmp_path):
    """Seeds of 2**31 and above seed numpy with ``seed % 2**32`` (numpy's whole range), as documented."""

    def draws(seed, quick):
        return Evidence(confirmed=True, numbers={"u": float(np.random.rand())}, method="m")

    seed = 2**31 + 5
    rec = run_claims(_sections(draws), out_dir=tmp_path, seed=seed, progress=False)["claims"][0]
    assert rec["evidence"]["u"] == float(np.random.RandomState(seed).rand())


# --- claims.base ---------------------------------------------------------------------------------------------------


def test_registering_an_unknown_claim_id_is_refused():
    """@claim with an ID the catalogue lacks raises KeyError naming the valid IDs."""
    with pytest.raises(KeyError, match=r"unknown claim ID '9\.9'.*valid IDs: 1\.1"):
        claim("9.9")


def test_torch_threads_restores_the_count_even_when_the_block_raises():
    """torch_threads(n) puts back the thread count it found, also after an exception in the block."""
    before = torch.get_num_threads()
    try:
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
        assert torch.get_num_threads() == before
        with pytest.raises(RuntimeError, match="inside"), torch_threads(before + 1):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def _failing_imports(monkeypatch, failures):
    """Make _load_modules see ``failures[name]`` raised by importing theorylab.claims.<name>; fresh error table."""
    import importlib

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        short = name.rsplit(".", 1)[-1]
        if name.startswith("theorylab.claims.") and short in failures:
            raise failures[short]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    monkeypatch.setattr(base, "_IMPORT_ERRORS", {})


def test_a_claim_module_that_does_not_exist_is_not_an_import_error(monkeypatch):
    """A claim module absent from the package (not built yet) records no import error."""
    missing = ModuleNotFoundError("no q4", name="theorylab.claims.q4_weight_decay")
    _failing_imports(monkeypatch, {"q4_weight_decay": missing})
    claim_sections()
    assert base.import_error_for("4.1") is None


def test_a_claim_module_missing_a_dependency_is_an_import_error(monkeypatch):
    """A claim module whose own import of a dependency fails records that error for its claims."""
    _failing_imports(monkeypatch, {"q4_weight_decay": ModuleNotFoundError("no sklearn", name="sklearn")})
    claim_sections()
    assert "no sklearn" in base.import_error_for("4.1")


def test_a_claim_module_raising_on_import_costs_only_its_claims(monkeypatch):
    """Any exception while importing a claim module is recorded, not raised out of claim_sections."""
    _failing_imports(monkeypatch, {"q2_momentum": RuntimeError("broken q2")})
    assert len(claim_sections()) == 16
    assert "broken q2" in base.import_error_for("2.3")
    assert base.import_error_for("3.1") is None


def test_import_error_for_maps_each_question_to_its_module(monkeypatch):
    """Claims 1.x-4.x look up the import error of q1_rnn ... q4_weight_decay by their first digit."""
    monkeypatch.setattr(base, "_IMPORT_ERRORS", {"q1_rnn": "e1", "q4_weight_decay": "e4"})
    assert base.import_error_for("1.2") == "e1" and base.import_error_for("4.1") == "e4"
    assert base.import_error_for("4.3") == "e4" and base.import_error_for("2.1") is None


def test_extra_sections_are_of_kind_extra_in_registration_order(monkeypatch):
    """@extra registers a section of kind 'extra'; extra_sections lists them in registration order."""
    extra_sections()  # import the real extras first: imported later, they would register into the emptied registry
    monkeypatch.setattr(base, "_EXTRAS", {})
    monkeypatch.setattr(base, "EXTRA_MODULES", {})  # else the package's own extras read as unregistered (errors)

    def fn(seed, quick):
        return Evidence(confirmed=True, numbers={}, method="m")

    extra("zz", "Z title", "z statement")(fn)
    extra("aa", "A title")(fn)
    got = extra_sections()
    assert [(s.id, s.kind, s.title, s.statement) for s in got] == [("zz", "extra", "Z title", "z statement"),
                                                                    ("aa", "extra", "A title", "")]


def test_evidence_notes_default_to_an_empty_string(tmp_path):
    """Evidence without notes has notes == '' and its record in results.json holds '' (not null)."""
    assert Evidence(confirmed=True, numbers={}, method="m").notes == ""

    def plain(seed, quick):
        return Evidence(confirmed=True, numbers={}, method="m")

    run_claims(_sections(plain), out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"][0]["notes"] == ""


# --- report.html ---------------------------------------------------------------------------------------------------


def _record(**over):
    rec = {"id": "x", "title": "t", "kind": "claim", "verdict": "confirmed", "statement": "", "method": "",
           "evidence": {}, "key": [], "figures": [], "seconds": 1.0}
    return {**rec, **over}


def test_format_number_switches_to_exponent_form_at_exactly_1e5_and_below_1e_3():
    """|x| >= 1e5 and |x| < 1e-3 are written as 3-decimal exponents; 1e-3 itself and 99999.0 are not."""
    assert format_number(1e5) == "1.000e+05" and format_number(-1e5) == "-1.000e+05"
    assert format_number(99999.0) == "1e+05"  # .4g rounding, still not the exponent branch
    assert format_number(1e-3) == "0.001" and format_number(0.00099) == "9.900e-04"


def test_format_number_keeps_integers_whole_and_zero_plain():
    """Integers are written in full (no exponent) and a float zero is '0'."""
    assert format_number(1234567) == "1234567" and format_number(0) == "0"
    assert format_number(0.0) == "0" and format_number(-0.0) == "0"
    assert format_number("nan") == "nan"


def test_summary_shows_the_first_three_numbers_when_no_key_is_given():
    """Without a key, the summary's key-numbers cell lists the first three measured values."""
    page = render_report({"claims": [_record(key=None, evidence={"a": 1.5, "b": 2.5, "c": 3.5, "d": 4.5})]})
    cell = page.split('<td class="num">', 1)[1].split("</td>", 1)[0]
    assert cell == "a = 1.5<br>b = 2.5<br>c = 3.5"


def test_a_key_naming_no_measured_number_is_skipped_by_the_report():
    """A key that names no number in the evidence (an old or hand-made results.json) is skipped, not a KeyError."""
    page = render_report({"claims": [_record(key=["gone", "a"], evidence={"a": 2.0})]})
    assert "a = 2" in page and "gone" not in page


def test_quotes_in_ids_and_figure_names_are_escaped_in_attributes():
    """A '"' in a section ID or figure name is escaped: it cannot end the id/alt attribute."""
    page = render_report({"claims": [_record(id='x"y', figures=['a"b.png'])]})
    assert 'id="claim-x&quot;y"' in page and 'alt="figure a&quot;b.png"' in page
    assert 'x"y' not in page and 'a"b' not in page


def test_error_and_notes_text_are_html_escaped():
    """An error traceback or notes holding markup appear as text, not as HTML."""
    page = render_report({"claims": [_record(verdict="error", error="<b>boom</b>", notes="<i>note</i> & more")]})
    assert "<pre>&lt;b&gt;boom&lt;/b&gt;</pre>" in page and "&lt;i&gt;note&lt;/i&gt; &amp; more" in page
    assert "<b>boom</b>" not in page and "<i>note</i>" not in page


def test_summary_line_counts_claims_and_extras_apart_and_totals_every_section():
    """The verdict counts are over claims, then over the extras (since the twentieth session: a refuted extra had
    been left out of the headline); the total seconds of a run without one sums claims and extras."""
    claims = [_record(id="1.1", verdict="confirmed", seconds=1.0), _record(id="1.2", verdict="refuted", seconds=2.0)]
    extras = [_record(id="e", kind="extra", verdict="error", seconds=4.0)]
    page = render_report({"claims": claims, "extras": extras, "complete": False})
    assert ("<b>1/2</b> claims confirmed, 1 refuted, 0 errors; <b>0/1</b> extra sections confirmed, 0 refuted, "
            "1 errors; 7.0 s in all.") in page


def test_a_payload_without_a_complete_flag_reads_as_complete():
    """An older results.json without 'complete' is not labelled interrupted."""
    assert "partial results" not in render_report({"claims": [_record()]})
    assert "partial results" in render_report({"claims": [_record()], "complete": False})


def test_a_recorded_total_of_zero_seconds_is_used_as_is():
    """A total_seconds of 0 in the payload is reported as 0.0 s, not replaced by the sum of the sections."""
    page = render_report({"claims": [_record(seconds=3.0)], "total_seconds": 0})
    assert "0.0 s in all" in page


def test_summary_links_point_at_the_sections_anchors():
    """Each summary row links to its section by '#<kind>-<id>', the section's id attribute."""
    page = render_report({"claims": [_record(id="1.1")], "extras": [_record(id="rnn", kind="extra")]})
    for anchor in ("claim-1.1", "extra-rnn"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page


def test_environment_table_flattens_the_versions():
    """Versions appear as 'version of <package>' rows, not as one dict-valued row."""
    page = render_report({"claims": [], "environment": {"python": "3.12", "versions": {"torch": "2.13"}}})
    env = page.split("<h2>Environment</h2>", 1)[1]
    assert "<td>version of torch</td><td>2.13</td>" in env and "<td>versions</td>" not in env
