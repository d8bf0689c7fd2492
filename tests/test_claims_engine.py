"""The claims engine: isolation, atomic results, interruption, serialisation, selection, the report."""

import json

import pytest
from matplotlib.figure import Figure

from theorylab.claims import CLAIM_IDS, Evidence, Section, UnknownClaimError, run_claims, select_sections
from theorylab.claims.engine import json_number
from theorylab.report import render_report, write_report


def ok_claim(seed, quick):
    fig = Figure()
    fig.subplots().plot([0, 1], [seed, seed + 1])
    return Evidence(confirmed=True, numbers={"x": 1.5, "seed": seed}, method="m", figures={"line": fig})


def raising_claim(seed, quick):
    raise RuntimeError("boom in the middle")


def refuted_claim(seed, quick):
    return Evidence(confirmed=False, numbers={"gap": float("inf")}, method="m", notes="bound violated")


def sections(*fns):
    return [Section(f"t{i}", f"test {i}", "stmt", "claim", fn) for i, fn in enumerate(fns)]


def test_a_raising_claim_does_not_lose_the_others(tmp_path):
    payload = run_claims(sections(ok_claim, raising_claim, ok_claim), out_dir=tmp_path, seed=3, progress=False)
    verdicts = [r["verdict"] for r in payload["claims"]]
    assert verdicts == ["confirmed", "error", "confirmed"]
    assert "boom in the middle" in payload["claims"][1]["error"]
    assert "Traceback" in payload["claims"][1]["error"]
    on_disk = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert on_disk["complete"] is True and len(on_disk["claims"]) == 3
    assert on_disk["claims"][0]["evidence"]["seed"] == 3
    assert (tmp_path / on_disk["claims"][0]["figures"][0]).stat().st_size > 1000


def test_interrupted_run_keeps_finished_claims(tmp_path):
    def interrupt(seed, quick):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_claims(sections(ok_claim, interrupt, ok_claim), out_dir=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))  # still valid JSON
    assert on_disk["complete"] is False
    assert [r["verdict"] for r in on_disk["claims"]] == ["confirmed"]
    assert not list(tmp_path.glob(".results-*"))  # no temporary files left behind
    assert "partial results" in write_report(tmp_path).read_text(encoding="utf-8")


def test_not_implemented_is_an_error_not_a_pass(tmp_path):
    payload = run_claims([Section("9.9", "future", "s", "claim", None)], out_dir=tmp_path, progress=False)
    rec = payload["claims"][0]
    assert rec["verdict"] == "error" and rec["error"] == "not implemented"


def test_non_finite_numbers_and_wrong_return_type(tmp_path):
    def returns_dict(seed, quick):
        return {"verdict": "confirmed"}

    payload = run_claims(sections(refuted_claim, returns_dict), out_dir=tmp_path, progress=False)
    assert payload["claims"][0]["verdict"] == "refuted"
    assert payload["claims"][0]["evidence"]["gap"] == "inf"
    assert payload["claims"][0]["notes"] == "bound violated"
    assert payload["claims"][1]["verdict"] == "error" and "not Evidence" in payload["claims"][1]["error"]
    json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))


def test_json_number():
    import numpy as np
    import torch

    assert json_number(True) == 1 and json_number(np.float32(0.5)) == 0.5
    assert json_number(torch.tensor(2.0)) == 2.0 and json_number(float("-inf")) == "-inf"
    assert json_number(float("nan")) == "nan" and json_number(np.int64(3)) == 3


def test_same_seed_same_numbers(tmp_path):
    import torch

    def random_claim(seed, quick):
        return Evidence(confirmed=True, numbers={"r": torch.rand(()).item()}, method="m")

    a = run_claims(sections(random_claim), out_dir=tmp_path / "a", seed=5, progress=False)
    b = run_claims(sections(random_claim), out_dir=tmp_path / "b", seed=5, progress=False)
    c = run_claims(sections(random_claim), out_dir=tmp_path / "c", seed=6, progress=False)
    assert a["claims"][0]["evidence"] == b["claims"][0]["evidence"] != c["claims"][0]["evidence"]


def test_select_sections():
    every = select_sections(None, extras=False)
    assert [s.id for s in every] == list(CLAIM_IDS) and len(every) == 16
    assert [s.id for s in select_sections(["2.3", "2.1"], extras=False)] == ["2.1", "2.3"]
    with pytest.raises(UnknownClaimError, match="valid IDs: 1.1, 1.2"):
        select_sections(["2.1", "7.7"], extras=False)


def test_report_has_summary_sections_figures_and_environment(tmp_path):
    payload = run_claims(sections(ok_claim, raising_claim), out_dir=tmp_path, progress=False)
    page = render_report(payload)
    assert page.index("Summary") < page.index("test 0")
    assert 'src="claim-t0-line.png"' in page and "boom in the middle" in page
    assert "Environment" in page and "torch" in page
    assert "http://" not in page and "https://" not in page  # offline: no CDN
    assert "<script" not in page


@pytest.mark.parametrize("odd", [
    dict(evidence={"a": None, "b": {"x": 1}, "c": [1, 2]}, key=["a", "b"]), dict(evidence=None), dict(seconds=None),
    dict(seconds="nan"), dict(figures=None), dict(id=["3", "1"]), dict(notes=7, verdict="refuted"),
    dict(title=None, kind=None), {"drop": "seconds"}, {"drop": "verdict"}, dict(key=[["a"]]), dict(key=5),
    dict(checks={"a": "no", "b": True}), dict(checks=[1])])
def test_a_hand_edited_results_json_still_renders(odd):
    """One odd value in a results.json the engine did not write (None evidence, seconds as a string, figures set
    to null) had lost the whole page to a TypeError, AttributeError or KeyError."""
    record = {"id": "3.1", "title": "t", "kind": "claim", "statement": "s", "verdict": "confirmed",
              "evidence": {"a": 1.0}, "key": ["a"], "method": "m", "notes": "", "summary": "", "figures": [],
              "seconds": 1.0}
    record.pop(odd.pop("drop", ""), None)
    record.update(odd)
    page = render_report({"claims": [record, {**record, "id": "3.2", "title": "kept"}],
                          "environment": {"versions": None, "cpu": "<x>"}, "total_seconds": "?"})
    assert "kept" in page and "&lt;x&gt;" in page


@pytest.mark.parametrize("bad", [dict(notes=float("nan")), dict(numbers={("a", 1): 1.0}), dict(method=b"bytes")])
def test_evidence_that_json_cannot_hold_costs_nothing_else(tmp_path, bad):
    """NaN notes or a tuple key made json.dumps raise inside run_claims: the later claims and the report were lost."""

    def odd(seed, quick):
        return Evidence(**{"confirmed": True, "numbers": {"a": 1.0}, "method": "m", **bad})

    payload = run_claims(sections(odd, ok_claim), out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in payload["claims"]] == ["confirmed", "confirmed"]
    json.loads((tmp_path / "results.json").read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(c))
    assert "test 1" in write_report(tmp_path).read_text(encoding="utf-8")


def test_sys_exit_in_a_claim_is_an_error_of_that_claim(tmp_path):
    def exits(seed, quick):
        raise SystemExit(3)

    payload = run_claims(sections(exits, ok_claim), out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in payload["claims"]] == ["error", "confirmed"]
    assert "SystemExit" in payload["claims"][0]["error"]


def test_a_claim_that_changes_global_torch_state_does_not_change_the_next(tmp_path):
    import torch

    seen = {}

    def meddles(seed, quick):
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.set_num_threads(1)
        raise RuntimeError("and then fails")

    def looks(seed, quick):
        seen.update(dtype=torch.get_default_dtype(), grad=torch.is_grad_enabled(), threads=torch.get_num_threads())
        return Evidence(confirmed=True, numbers={}, method="m")

    before = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads())
    run_claims(sections(meddles, looks), out_dir=tmp_path, progress=False)
    assert (seen["dtype"], seen["grad"], seen["threads"]) == before


def test_a_figure_that_is_not_a_figure_keeps_the_verdict(tmp_path):
    def axes_not_figure(seed, quick):
        ax = Figure().subplots()
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m", figures={"axes": ax})

    rec = run_claims(sections(axes_not_figure), out_dir=tmp_path, progress=False)["claims"][0]
    assert rec["verdict"] == "confirmed" and rec["figures"] == []
    assert "is not a matplotlib Figure" in rec["notes"]


def test_an_interrupt_before_the_first_write_carries_no_payload(tmp_path, monkeypatch):
    """Ctrl-C before results.json was written rendered an earlier run's file as this run's partial results."""
    from theorylab.claims import engine

    def interrupted():
        raise KeyboardInterrupt

    def interrupt(seed, quick):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run_claims(sections(ok_claim, interrupt), out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in caught.value.payload["claims"]] == ["confirmed"]
    monkeypatch.setattr(engine, "write_json_atomic", lambda *a: interrupted())
    with pytest.raises(KeyboardInterrupt) as caught:
        run_claims(sections(ok_claim), out_dir=tmp_path, progress=False)
    assert caught.value.payload is None


def test_default_device_and_anomaly_mode_are_restored_and_figure_names_do_not_collide(tmp_path):
    import torch

    seen = {}

    def meddles(seed, quick):
        torch.set_default_device("meta")
        torch.set_anomaly_enabled(True)
        raise SystemExit(1)

    def looks(seed, quick):
        seen.update(device=torch.empty(1).device.type, anomaly=torch.is_anomaly_enabled())
        figs = {}
        for name in ("a b", "a/b"):
            figs[name] = Figure()
            figs[name].subplots().plot([0, 1], [0, 1])
        return Evidence(confirmed=True, numbers={}, method="m", figures=figs)

    payload = run_claims(sections(meddles, looks), out_dir=tmp_path, progress=False)
    assert seen == {"device": "cpu", "anomaly": False}
    files = payload["claims"][1]["figures"]
    assert len(set(files)) == 2 and all((tmp_path / f).exists() for f in files)


def test_an_interrupt_during_the_final_write_still_carries_the_payload(tmp_path, monkeypatch):
    from theorylab.claims import engine

    real = engine.write_json_atomic
    calls = []

    def interrupted_on_the_last(path, payload):
        calls.append(1)
        if payload.get("complete"):
            raise KeyboardInterrupt
        real(path, payload)

    monkeypatch.setattr(engine, "write_json_atomic", interrupted_on_the_last)
    with pytest.raises(KeyboardInterrupt) as caught:
        run_claims(sections(ok_claim), out_dir=tmp_path, progress=False)
    assert caught.value.payload is not None and len(caught.value.payload["claims"]) == 1


def test_the_default_device_reads_as_the_cpu_where_torch_2_4_breaks_its_getter(tmp_path, monkeypatch):
    """torch 2.4's get_default_device() raises AttributeError after set_default_device(None): every claim after one
    that had reset the device became an error."""
    import torch

    def broken():
        raise AttributeError("'NoneType' object has no attribute 'device'")

    monkeypatch.setattr(torch, "get_default_device", broken)
    payload = run_claims(sections(ok_claim, ok_claim), out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in payload["claims"]] == ["confirmed", "confirmed"]


def test_write_report_reads_results_as_utf8_whatever_the_locale(tmp_path):
    """results.json is written in UTF-8 (claim titles hold ≡, σ, λ); write_report(out_dir) read it in the locale's
    encoding: UnicodeDecodeError under the C locale, mojibake under Windows' cp1252."""
    import os
    import subprocess
    import sys

    run_claims([Section("2.1", "Momentum ≡ SGD", "λ, σ", "claim", ok_claim)], out_dir=tmp_path, progress=False)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    code = "import sys, pathlib; from theorylab.report import write_report; write_report(pathlib.Path(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Momentum ≡ SGD" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_a_claims_summary_is_one_line_in_results_json_and_in_both_summary_tables(tmp_path, capsys):
    """Evidence.summary is the summary table's line: whitespace collapsed (a line break would tear the terminal
    table), shown in the report's summary and its section; a claim without one shows its key numbers there."""
    from theorylab.cli.verify import _print_summary

    def summarised(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.5}, method="m", summary="x = 1.5\n   (needs < 2)")

    payload = run_claims(sections(summarised, ok_claim, raising_claim), out_dir=tmp_path, progress=False)
    with_summary, without, error = payload["claims"]
    assert with_summary["summary"] == "x = 1.5 (needs < 2)" and without["summary"] == ""
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"][0]["summary"] == \
        "x = 1.5 (needs < 2)"
    table = render_report(payload).split("</table>", 1)[0]
    assert "<td>x = 1.5 (needs &lt; 2)</td>" in table
    assert '<td class="num">x = 1.5<br>seed = 0</td>' in table
    assert "<td>RuntimeError: boom in the middle</td>" in table  # an error: its last line
    assert "<b>Measured.</b> x = 1.5 (needs &lt; 2)" in render_report(payload)
    _print_summary(payload["claims"])
    printed = capsys.readouterr().out
    assert "x = 1.5 (needs < 2)" in printed and "x = 1.5; seed = 0" in printed and "boom in the middle" in printed


def test_a_refuted_claim_names_its_failed_checks_and_lists_every_criterion(tmp_path):
    """Claims 3.1, 3.2, 3.3 and 3.5 judged criteria that their summary line did not show, and set no notes: with
    one such criterion failing, the report read "refuted" beside numbers that all passed, with no reason."""

    def refuted(seed, quick):
        return Evidence(confirmed=False, numbers={"x": 1.0}, method="m", summary="FLOPs ∝ n^2.0 (needs 1.85–2.05)",
                        checks={"FLOPs ∝ n^2.000 (needs 1.85–2.05)": True, "FLOPs ∝ d^1.500 (needs 0.95–1.2)": False},
                        figures={"broken": "not a figure"})

    payload = run_claims(sections(refuted), out_dir=tmp_path, progress=False)
    record = payload["claims"][0]
    assert record["verdict"] == "refuted"
    assert record["checks"] == {"FLOPs ∝ n^2.000 (needs 1.85–2.05)": True, "FLOPs ∝ d^1.500 (needs 0.95–1.2)": False}
    # the reason is the failed check, not the figure that failed to draw (which the notes still report)
    assert record["why"] == "failed: FLOPs ∝ d^1.500 (needs 0.95–1.2)" and "could not be drawn" in record["notes"]
    page = render_report(payload)
    assert '<div class="why">failed: FLOPs ∝ d^1.500 (needs 0.95–1.2)</div>' in page
    assert '<li class="failed">✗ FLOPs ∝ d^1.500 (needs 0.95–1.2)</li>' in page
    assert '<li class="held">✓ FLOPs ∝ n^2.000 (needs 1.85–2.05)</li>' in page


def test_a_claim_whose_verdict_disagrees_with_its_checks_is_an_error(tmp_path):
    def inconsistent(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m", checks={"a": True, "b": False})

    payload = run_claims(sections(inconsistent, ok_claim), out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in payload["claims"]] == ["error", "confirmed"]
    assert "but its checks say False" in payload["claims"][0]["error"]


def test_a_results_json_without_why_takes_the_reason_from_its_record():
    """results.json written before the engine recorded "why": the notes' first sentence, else the failed checks."""
    from theorylab.report.html import why

    base = {"id": "3.1", "verdict": "refuted"}
    assert why({**base, "notes": "too short. More."}) == "too short"
    assert why({**base, "checks": {"a (needs 1)": False, "b": True}}) == "failed: a (needs 1)"
    assert why({**base, "verdict": "confirmed", "checks": {"a": False}}) == ""


def test_only_selects_extra_sections_built_in_or_registered(tmp_path):
    """``--only`` took claim IDs alone: a section registered with @extra could run only with --extras, which also
    trains every built-in extra (minutes), and ``--only charlm`` was an unknown ID."""
    import json

    import torch

    from theorylab.claims import base, extra
    from theorylab.cli import main

    assert [s.id for s in select_sections(["charlm", "1.1"], extras=False)] == ["1.1", "charlm"]
    assert {s.id for s in select_sections(["charlm"], extras=True)} == {"charlm", "rnn-tasks"}
    with pytest.raises(UnknownClaimError, match="and the extra sections .*charlm"):
        select_sections(["my-check"], extras=False)

    @extra("my-check", "What I measured", "The statement it tests")
    def my_check(seed: int, quick: bool) -> Evidence:  # the docstring's example of @extra
        error = float(torch.rand((), generator=torch.Generator().manual_seed(seed))) * 1e-7
        return Evidence(error < 1e-6, {"error": error}, "How it was measured.",
                        checks={f"error {error:.1e} (needs < 1e-6)": error < 1e-6})

    try:
        assert main(["verify", "--only", "my-check", "--out", str(tmp_path)]) == 0
    finally:
        base._EXTRAS.pop("my-check")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["claims"] == [] and [r["id"] for r in results["extras"]] == ["my-check"]
    assert results["extras"][0]["verdict"] == "confirmed"
    assert "What I measured" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(("section_id", "what"), [("1.1", "the ID of claim 1.1"),
                                                  ("charlm", "theorylab's own extra section")])
def test_a_section_of_ones_own_cannot_take_a_built_in_id(section_id, what):
    """A user's @extra("charlm") was replaced by the built-in section when its module loaded (``--only charlm``
    then trained the char-LM), and @extra("1.1") ran beside claim 1.1 under the same ID."""
    from theorylab.claims import base, extra

    before = dict(base._EXTRAS)
    with pytest.raises(ValueError, match=what):
        extra(section_id, "Mine")(lambda seed, quick: None)
    assert base._EXTRAS == before


def test_the_callers_random_streams_go_on_where_they_were(tmp_path):
    """Every claim is seeded, but a script that calls verify between its own draws must not find Python's, numpy's
    and torch's generators reset to the run's seed (they were: a user's journey found the streams equal to a fresh
    manual_seed(0) afterwards)."""
    import random

    import numpy as np
    import torch

    def draws(seed, quick):
        return Evidence(confirmed=True, numbers={"t": torch.rand(()).item(), "n": float(np.random.rand()),
                                                 "p": random.random()}, method="m")

    random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)
    expected = (random.random(), float(np.random.rand()), torch.rand(()).item())
    random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)
    payload = run_claims(sections(draws, draws), out_dir=tmp_path, seed=0, progress=False)
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected
    first, second = (r["evidence"] for r in payload["claims"])
    assert first == second  # and each claim still starts from the run's seed


def test_evidence_that_is_not_a_number_names_its_key_and_an_error_record_has_string_notes(tmp_path):
    def texty(seed, quick):
        return Evidence(confirmed=True, numbers={"error": 1e-8, "device": "cpu"}, method="m")

    payload = run_claims(sections(texty, ok_claim), out_dir=tmp_path, progress=False)
    record = payload["claims"][0]
    assert record["verdict"] == "error" and payload["claims"][1]["verdict"] == "confirmed"
    assert "Evidence.numbers['device'] is 'cpu', not a number" in record["why"]
    assert "put text in notes or method" in record["why"]
    assert record["notes"] == ""
