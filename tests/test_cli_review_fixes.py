"""Regressions found by the fifth session's review of the CLI, the claims engine and the trainer: each printed a
traceback, lost results or misled, where the README promises an exit status with a message."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

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
    assert "<script>" not in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_a_figure_that_fails_to_render_keeps_the_verdict_and_numbers(claim_21, tmp_path, capsys):
    def claim(seed, quick):
        good, ax = plt.subplots()
        ax.plot([1, 2])
        bad, ax = plt.subplots()
        ax.set_title(r"$\undefinedmacro{x}$")
        return Evidence(confirmed=True, numbers={"measured": 0.123}, method="m", figures={"good": good, "bad": bad})

    claim_21(claim)
    assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"][0]
    assert record["verdict"] == "confirmed" and record["evidence"] == {"measured": 0.123}
    assert record["figures"] == ["claim-2.1-good.png"] and "figure 'bad' could not be drawn" in record["notes"]
    assert not (tmp_path / "claim-2.1-bad.png").exists()
    assert len(record["figure_errors"]) == 1 and record["figure_errors"][0] in record["notes"]
    assert "warning: 2.1: figure 'bad' could not be drawn" in capsys.readouterr().err  # had been silent


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


def test_outputs_are_written_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Windows before Python 3.13 has no os.fchmod: every results.json and checkpoint.pt write failed there."""
    import torch

    from theorylab.experiments.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.delattr(os, "fchmod", raising=False)
    save_checkpoint(tmp_path / "c.pt", {"format": "x", "w": torch.arange(3.0)})
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["w"], torch.arange(3.0))


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


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="SIGINT is held back on Unix only")
def test_a_real_ctrl_c_while_torch_loads_exits_130(tmp_path):
    """A SIGINT during ``import torch`` was ignored (the run finished, exit 0) or left a half-imported module
    (exit 1, 'cannot load module more than once per process'), in 14 of 24 tries at 0.30-0.40 s."""
    import signal
    import time

    def as_from_a_terminal():  # a shell's background job (`pytest ... &`) ignores SIGINT, and Python keeps that
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    for delay in [0.22 + 0.04 * i for i in range(8)]:  # torch loads somewhere in 0.2-0.6 s; the window is narrow
        proc = subprocess.Popen([sys.executable, "-m", "theorylab", "verify", "--only", "2.2", "--quick", "--out",
                                 str(tmp_path / f"run-{delay}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=as_from_a_terminal)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, (delay, err[-2000:])
        assert "Traceback" not in err, (delay, err[-2000:])


def test_a_ctrl_c_while_the_command_line_loads_exits_130(tmp_path):
    """A SIGINT before the Ctrl-C handling is set up (``python -m theorylab`` importing argparse and gettext, the
    first 20-50 ms, longer on a loaded machine) ended in a KeyboardInterrupt traceback. Stood for here by an
    argparse whose import is interrupted."""
    (tmp_path / "argparse.py").write_text("raise KeyboardInterrupt\n")
    src = str(Path(__import__("theorylab").__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}
    proc = subprocess.run([sys.executable, "-m", "theorylab", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == "theorylab: interrupted"


def test_an_out_folder_whose_name_is_not_utf8_is_written_and_reported(claim_21, tmp_path, capsys):
    """Linux allows any bytes in names: the command line then held lone surrogates, and writing results.json
    raised UnicodeEncodeError before any claim ran."""
    claim_21(lambda seed, quick: Evidence(confirmed=True, numbers={"x": 1.0}, method="m"))
    out = tmp_path / os.fsdecode(b"bad\xff")
    assert main(["verify", "--only", "2.1", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert payload["complete"] and "\udcff" in payload["environment"]["command"]  # the byte 0xff, escaped
    assert (out / "report.html").read_text(encoding="utf-8").count("claim") > 0


def test_a_figure_name_the_filesystem_refuses_costs_only_that_figure(tmp_path):
    """The clean-up unlink of the failed figure raised again (name too long, or a NUL byte): the claim became
    'error' and lost its verdict and its other figure."""
    from theorylab.claims.base import Section
    from theorylab.claims.engine import run_claims

    def claim(seed, quick):
        figs = {"ok": plt.figure(), "y" * 300: plt.figure(), "nul\0": plt.figure()}
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m", figures=figs)

    payload = run_claims([Section("x", "x", "", "claim", claim)], out_dir=tmp_path, progress=False)
    (record,) = payload["claims"]
    assert record["verdict"] == "confirmed" and record["figures"] == ["claim-x-ok.png"]
    assert record["notes"].count("could not be drawn") == 2


def test_a_claim_raising_a_base_exception_is_an_error_and_the_run_goes_on(tmp_path):
    from theorylab.claims.base import Section
    from theorylab.claims.engine import run_claims

    def raises(seed, quick):
        raise GeneratorExit("not an Exception")

    sections = [Section("a", "a", "", "claim", raises),
                Section("b", "b", "", "claim", lambda s, q: Evidence(confirmed=True, numbers={}, method="m"))]
    payload = run_claims(sections, out_dir=tmp_path, progress=False)
    assert [r["verdict"] for r in payload["claims"]] == ["error", "confirmed"] and payload["complete"]


def test_report_quotes_figure_urls_and_totals_a_partial_run():
    from theorylab.report.html import render_report

    record = {"id": "x", "title": "t", "kind": "claim", "verdict": "confirmed", "evidence": {}, "key": [],
              "figures": ["claim-x-loss_#1.png"], "seconds": 1.5}
    page = render_report({"claims": [record, {**record, "id": "y", "figures": []}], "complete": False})
    assert 'src="claim-x-loss_%231.png"' in page  # '#' had made the browser ask for "claim-x-loss_"
    odd = render_report({"claims": [{**record, "figures": [os.fsdecode(b"claim-x-\xff.png")]}]})
    assert 'src="claim-x-%FF.png"' in odd  # the file's bytes, as the browser must ask for them
    assert "3.0 s in all" in page  # an interrupted run has no total_seconds: it said 0.0 s


@pytest.mark.parametrize("args", [["train", "charlm", "--steps", "1", "--out", "x" * 300],
                                  ["train", "charlm", "--steps", "1", "--out", "x" * 300, "--resume"],
                                  ["bench", "rnn", "--quick", "--json", "x" * 300 + ".json"],
                                  ["bench", "rnn", "--quick", "--json", "\0"]])
def test_a_path_the_filesystem_refuses_exits_2_before_any_work(tmp_path, monkeypatch, capsys, args):
    """'File name too long' from pathlib (Python 3.11) was a traceback; a NUL in --json failed after the bench."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
