"""Found by a newcomer's review of the README and the command line (2026-11-26): each case as the reviewer met it."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from theorylab.cli import main
from theorylab.experiments import progress


def _charlm(out, *extra: str) -> int:
    return main(["train", "charlm", "--out", str(out), "--seq-len", "32", "--layers", "1", "--width", "16",
                 "--heads", "2", "--batch-size", "2", "--eval-chars", "65", "--threads", "1", *extra])


@pytest.mark.parametrize(("argv", "usage", "hint"), [
    (["verify", "--quik"], "usage: theorylab verify", "--quik: did you mean --quick?"),
    (["bench", "attention", "--jsn", "x"], "usage: theorylab bench", "--jsn: did you mean --json?"),
    (["sample", "runs/x", "--temprature", "0.5"], "usage: theorylab sample", "did you mean --temperature?"),
    (["train", "charlm", "--out", "x", "--step", "3", "--sed", "1"], "usage: theorylab train charlm",
     "--sed: did you mean --seed?"),
    (["env", "--bogus"], "usage: theorylab env", "unrecognized arguments: --bogus"),
])
def test_an_unknown_option_is_reported_with_its_subcommand_and_the_nearest_option(argv, usage, hint, capsys):
    """It had been reported with the top-level usage ("usage: theorylab [-h] COMMAND ..."), with no suggestion."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert usage in err and hint in err


def test_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert _charlm(f, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.count(str(f)) == 1 and "is a file, not a folder" in err  # had said it twice, as "cannot be used"
    assert f.read_text(encoding="utf-8") == "keep me"


def test_sample_takes_the_checkpoint_file_too(tmp_path, capsys):
    """Given RUN_DIR/checkpoint.pt it had looked for RUN_DIR/checkpoint.pt/checkpoint.pt."""
    assert _charlm(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path), "--chars", "5", "--prompt", "T"]) == 0
    from_dir = capsys.readouterr().out
    assert main(["sample", str(tmp_path / "checkpoint.pt"), "--chars", "5", "--prompt", "T"]) == 0
    assert capsys.readouterr().out == from_dir


def test_the_training_bar_shows_no_nan_loss_before_the_first_step(tmp_path, monkeypatch):
    """The bar started at "loss nan bits/char", which reads as a diverged run."""
    screen = io.StringIO()
    monkeypatch.setattr(progress, "show_progress", lambda: True)
    monkeypatch.setattr(progress, "progress_console",
                        lambda: Console(file=screen, force_terminal=True, width=200, color_system=None))
    assert _charlm(tmp_path, "--steps", "2") == 0
    drawn = screen.getvalue()
    assert "loss - bits/char" in drawn and "nan" not in drawn


def test_a_refuted_claim_says_why_in_one_line_under_the_table(tmp_path, monkeypatch, capsys):
    """--quick ends with 4.4 refuted; the reason (too short to judge) was only in the claim's section of the report."""
    from theorylab.claims import Evidence, Section
    from theorylab.cli import verify

    def refuted(seed, quick):
        return Evidence(confirmed=False, numbers={"x": 1.0}, method="m",
                        notes="--quick: a smoke run, too short to judge this claim; run without --quick. More detail.")

    def fine(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m", notes="all good. Detail.")

    monkeypatch.setattr(verify, "select_sections", lambda only, extras: [
        Section("2.1", "t", "s", "claim", fine), Section("4.4", "t", "s", "claim", refuted)])
    assert main(["verify", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "4.4 refuted: --quick: a smoke run, too short to judge this claim; run without --quick\n" in out
    assert "More detail" not in out and "all good" not in out
    summary = (tmp_path / "report.html").read_text(encoding="utf-8").split("</table>", 1)[0]  # the report's too
    assert summary.count('<div class="why">') == 1
    assert '<div class="why">--quick: a smoke run, too short to judge this claim; run without --quick</div>' in summary


# ------------------------------------------------------------------------------- found by the review of the fixes
@pytest.mark.parametrize("argv", [["train", "charlm", "--out", "x", "--verbose"], ["verify", "--bogus"],
                                  ["verify", "--foo"], ["verify", "--", "--only"]])
def test_no_misleading_hint(argv, capsys):
    """--verbose had been "did you mean --overwrite?" (a destructive option), --bogus and --foo "--out" (the shared
    "--" carried them over the cutoff), and "-- --only" "did you mean --only?"."""
    assert main(argv) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_an_option_before_the_subcommand_is_the_top_levels(capsys):
    assert main(["--bogus", "verify"]) == 2
    err = capsys.readouterr().err
    assert "theorylab: error: unrecognized arguments: --bogus" in err and "theorylab verify" not in err


def test_sample_refuses_a_file_that_is_not_a_checkpoint_clearly(tmp_path, capsys):
    assert _charlm(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "metrics.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file; give the run's folder" in err and "metrics.json/checkpoint.pt" not in err


def test_resume_of_a_finished_run_without_its_metrics_writes_them(tmp_path, capsys):
    """An interrupt between the last checkpoint and metrics.json leaves a run at its target without metrics: the
    "nothing to train" shortcut had left it so."""
    assert _charlm(tmp_path, "--steps", "2") == 0
    metrics = (tmp_path / "metrics.json").read_bytes()
    (tmp_path / "metrics.json").unlink()
    capsys.readouterr()
    assert _charlm(tmp_path, "--resume") == 0
    assert "nothing to train" not in capsys.readouterr().out
    assert (tmp_path / "metrics.json").exists()
    assert json.loads((tmp_path / "metrics.json").read_bytes())["final_bpc"] == json.loads(metrics)["final_bpc"]


def test_a_failed_exploding_example_says_why():
    """Claim 1.3's notes had said only "failed: c_explodes" when the one W = 3Q drawn did not explode (on an Intel
    Xeon at --quick --seed 8: λ₁ = -0.073)."""
    from theorylab.claims import q1_rnn

    checks = {"a_never_grows": True, "c_explodes": False, "c_slope_matches_lyapunov": False}
    notes = q1_rnn._failed_checks(checks, {"c_explodes": q1_rnn._why_no_explosion(-0.073, -70.3)})
    assert notes == ("failed: c_explodes (the W = 3Q drawn at this seed has λ₁ = -0.073 and log-norm -70.3 at T, "
                     "where explosion needs λ₁ > 0.1 and > 100; its states settle on a stable orbit, not a chaotic "
                     "one), c_slope_matches_lyapunov")
    assert "stable orbit" not in q1_rnn._why_no_explosion(0.05, 50.0)
    assert q1_rnn._failed_checks({"a": True}, {}) == ""
