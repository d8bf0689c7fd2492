"""Regressions found by the fifth session's review of the CLI, the claims engine and the trainer: each printed a
traceback, lost results or misled, where the README promises an exit status with a message."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from theorylab.claims import base  # noqa: E402
from theorylab.claims.base import Evidence  # noqa: E402
from theorylab.cli import main  # noqa: E402

MARKUP = 'expected [batch, n] got [2, 3] <script>x</script> [/red] [bold]y'
TINY = ["--seq-len", "16", "--layers", "1", "--width", "16", "--heads", "2", "--num-features", "8",
        "--batch-size", "4", "--warmup", "2", "--eval-chars", "300", "--threads", "1"]


@pytest.fixture
def claim_21(monkeypatch):
    """Replace claim 2.1 by a given function for one test."""
    base._load_modules()
    return lambda fn: monkeypatch.setitem(base._CLAIMS, "2.1", fn)


def test_an_error_text_that_looks_like_markup_is_printed_literally(claim_21, tmp_path, capsys):
    """rich read '[/red]' in an error as markup: a MarkupError traceback after every claim had run, or
    '[batch, n]' silently dropped from the summary."""

    def boom(seed, quick):
        raise ValueError(MARKUP)

    claim_21(boom)
    assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "[batch, n]" in out and "[/red]" in out
    assert "<script>" not in (tmp_path / "report.html").read_text()


def test_a_figure_that_fails_to_render_keeps_the_verdict_and_numbers(claim_21, tmp_path):
    def claim(seed, quick):
        good, ax = plt.subplots()
        ax.plot([1, 2])
        bad, ax = plt.subplots()
        ax.set_title(r"$\undefinedmacro{x}$")
        return Evidence(confirmed=True, numbers={"measured": 0.123}, method="m", figures={"good": good, "bad": bad})

    claim_21(claim)
    assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())["claims"][0]
    assert record["verdict"] == "confirmed" and record["evidence"] == {"measured": 0.123}
    assert record["figures"] == ["claim-2.1-good.png"] and "figure 'bad' could not be drawn" in record["notes"]
    assert not (tmp_path / "claim-2.1-bad.png").exists()


def test_results_are_as_readable_as_the_report(claim_21, tmp_path):
    """mkstemp made results.json, metrics.json and checkpoint.pt 0600 while the report beside them was 0644."""
    claim_21(lambda seed, quick: Evidence(confirmed=True, numbers={"x": 1.0}, method="m"))
    old = os.umask(0o022)
    try:
        assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    for name in ("results.json", "report.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_outputs_that_exist_as_folders_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "v" / "results.json").mkdir(parents=True)
    assert main(["verify", "--only", "2.1", "--out", str(tmp_path / "v")]) == 2
    (tmp_path / "adir").mkdir()
    assert main(["bench", "rnn", "--json", str(tmp_path / "adir")]) == 2
    assert main(["bench", "rnn", "--json", ""]) == 2
    (tmp_path / "t" / "metrics.json").mkdir(parents=True)
    assert main(["train", "charlm", "--out", str(tmp_path / "t"), *TINY, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "a folder of that name exists" in err and "is a folder" in err and "needs a file name" in err


@pytest.mark.parametrize("tamper", ["width", "step", "options", "seq_len", "model key"])
def test_a_checkpoint_that_loads_but_does_not_fit_exits_2(tmp_path, capsys, tamper):
    """Each of these was a traceback (exit 1): size mismatch, math domain error, TypeError, KeyError."""
    assert main(["train", "charlm", "--out", str(tmp_path), *TINY, "--steps", "2"]) == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    if tamper == "width":
        ckpt["config"]["width"] = 32
    elif tamper == "step":
        ckpt["step"] = -5
    elif tamper == "options":
        ckpt["options"] = {"bogus": 1}
    elif tamper == "seq_len":
        ckpt["config"]["seq_len"] = 16.5
    else:
        ckpt["model"].pop(next(iter(ckpt["model"])))
    torch.save(ckpt, path)
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_overwrite_interrupted_before_its_first_checkpoint_leaves_nothing_to_resume(tmp_path, capsys, monkeypatch):
    """The hint said --resume, which then continued the *old* run."""
    from theorylab.experiments import trainer

    assert main(["train", "charlm", "--out", str(tmp_path), *TINY, "--steps", "2"]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "sample_batch", interrupted)
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), *TINY, "--steps", "5", "--overwrite",
                 "--attention", "linear"]) == 130
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_out_of_memory_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    from theorylab.experiments import trainer

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer, "train_charlm", oom)
    assert main(["train", "charlm", "--out", str(tmp_path), *TINY, "--steps", "2"]) == 1
    assert "out of memory" in capsys.readouterr().err


def test_a_stdout_that_cannot_encode_unicode_gets_no_traceback(tmp_path):
    """The claim titles hold '≡': with PYTHONIOENCODING=ascii the summary raised UnicodeEncodeError at the end."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    run = subprocess.run([sys.executable, "-m", "theorylab", "verify", "--quick", "--only", "2.3", "--out",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr


def test_an_interrupt_during_start_up_is_a_message_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C while the subcommands (and torch) were imported printed Python's traceback."""
    import theorylab.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_subcommands", interrupted)
    assert cli.main(["verify", "--quick"]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "expected"), [("", True), ("0", True), ("false", True), ("1", False),
                                                  ("true", False)])
def test_progress_bars_follow_stderr_and_the_ci_variable(monkeypatch, value, expected):
    """CI=false had disabled the bar, and the bar was drawn on stdout while the test looked at stderr."""
    from theorylab.experiments import progress

    monkeypatch.setenv("CI", value)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.show_progress() is expected
    assert progress.progress_console().stderr
