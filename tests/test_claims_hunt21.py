"""Twenty-first session: a claim that a run cannot judge by design (4.4 under --quick) is "not judged", which the
terminal, the report and the exit status tell apart from refuted."""

from __future__ import annotations

import json

from theorylab.claims import Evidence, Section
from theorylab.cli import main


def _short(seed, quick):
    return Evidence(confirmed=False, judged=not quick, numbers={"x": 1.0}, method="m",
                    checks={"x ≥ 2 (needs a long run)": False},
                    notes="--quick: a smoke run, too short to judge this claim; run without --quick. Detail.")


def _fine(seed, quick):
    return Evidence(confirmed=True, numbers={"x": 1.0}, method="m")


def _run(tmp_path, monkeypatch, *argv):
    from theorylab.cli import verify

    monkeypatch.setattr(verify, "select_sections", lambda only, extras: [
        Section("2.1", "t", "s", "claim", _fine), Section("4.4", "t", "s", "claim", _short)])
    return main(["verify", "--out", str(tmp_path), *argv])


def test_a_claim_too_short_to_judge_is_not_judged_and_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    """verify --quick had always exited 1 (4.4 "refuted" by a grid too small to judge it), so it could not serve
    as a smoke test."""
    assert _run(tmp_path, monkeypatch, "--quick") == 0
    out = capsys.readouterr().out
    assert "4.4 not judged: --quick: a smoke run, too short to judge this claim; run without --quick\n" in out
    assert "1/2 confirmed (1 not judged)" in out
    record = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"][1]
    assert record["verdict"] == "not judged" and record["checks"] == {"x ≥ 2 (needs a long run)": False}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<span class="verdict not-judged">not judged</span>' in page
    assert "<b>1/2</b> claims confirmed, 0 refuted, 0 errors, 1 not judged" in page
    assert '<div class="why">--quick: a smoke run, too short to judge this claim; run without --quick</div>' in page


def test_the_same_claim_judged_still_fails_the_run(tmp_path, monkeypatch, capsys):
    assert _run(tmp_path, monkeypatch) == 1
    assert "4.4 refuted: --quick" in capsys.readouterr().out


def test_claim_3_5_runs_at_different_seeds_share_no_draws():
    """Its feature draws were seeded seed + m (and seed + 7, seed + 11): --seed 4's m = 4 draws were --seed 0's
    first m = 8 draws, so the seed sweeps were not independent."""
    from theorylab.claims.q3_attention import _draw_seed

    families = [(1, m) for m in (4, 8, 16, 32, 64, 128, 256)] + [(2,), (3,)]
    seeds = [_draw_seed(s, *tags) for s in range(10) for tags in families]
    assert len(set(seeds)) == len(seeds)
    assert _draw_seed(4, 1, 4) == _draw_seed(4, 1, 4)  # and reproducible
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.Generator.manual_seed takes
