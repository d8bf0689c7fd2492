"""The command line in automation: pipes that close, full disks, SIGTERM, error records, --only, bench's JSON."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from theorylab.bench import attention as bench_attention
from theorylab.bench import decode as bench_decode
from theorylab.bench import optim as bench_optim
from theorylab.bench import rnn as bench_rnn
from theorylab.claims import Evidence, Section, run_claims, select_sections
from theorylab.cli import main
from theorylab.cli import verify as cli_verify
from theorylab.report.html import why


class _Failing:
    """A stdout whose reader went away (EPIPE) or whose disk is full (ENOSPC)."""

    def __init__(self, code):
        self.code, self.writes = code, 0

    def write(self, text):
        self.writes += 1
        raise OSError(self.code, os.strerror(self.code))

    def flush(self):
        raise OSError(self.code, os.strerror(self.code))

    def isatty(self):
        return False


@pytest.mark.parametrize("code", [errno.EPIPE, errno.ENOSPC])
def test_an_unwritable_stdout_ends_the_printing_not_the_run(code, monkeypatch, capsys):
    """`theorylab verify | head -1` ended in a BrokenPipeError traceback and exit 1, the claims confirmed."""
    failing = _Failing(code)
    monkeypatch.setattr(sys, "stdout", failing)
    assert main(["env"]) == 0
    assert failing.writes == 1  # nothing more is tried after the first failure
    assert sys.stdout is failing  # restored
    err = capsys.readouterr().err
    assert ("could not write the output: No space left on device" in err) is (code == errno.ENOSPC)
    assert "Traceback" not in err


def test_verify_piped_into_head_exits_with_the_verdicts(tmp_path):
    command = [sys.executable, "-m", "theorylab", "verify", "--only", "2.2", "--out", str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.readline()
        proc.stdout.close()  # as head does after its line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_sigterm_is_taken_as_an_interrupt_and_exits_143(tmp_path, monkeypatch, capsys):
    """A CI timeout's SIGTERM had killed the run silently with no report."""

    def terminated(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):  # would kill the runner
            raise AssertionError("verify installed no SIGTERM handler")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(cli_verify, "run_claims", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["verify", "--only", "1.1", "--out", str(tmp_path)]) == 143
    assert "terminated before any result was written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_error_record_has_every_documented_key_and_its_line_is_shown(tmp_path):
    def raising(seed, quick):
        raise RuntimeError("boom in the middle")

    def fine(seed, quick):
        return Evidence(confirmed=True, numbers={"x": 1.0}, method="m")

    payload = run_claims([Section("t0", "t", "s", "claim", raising), Section("t1", "t", "s", "claim", fine)],
                         out_dir=tmp_path, seed=0, quick=True)
    record = payload["claims"][0]
    assert record["verdict"] == "error"
    assert record["summary"] == record["why"] == "RuntimeError: boom in the middle"
    assert record["checks"] == {} and "Traceback" in record["error"]
    assert why(record) == "RuntimeError: boom in the middle"
    old = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nValueError: old record\n'
    assert why({"verdict": "error", "error": old}) == "ValueError: old record"  # a record without `why`
    assert why(payload["claims"][1]) == ""


def test_only_takes_ids_in_one_argument_and_quotes_unknown_ones():
    assert [s.id for s in select_sections(["1.1 2.2", "3.1,4.1"], False)] == ["1.1", "2.2", "3.1", "4.1"]
    for given, named in (([""], "''"), ([" 9.9"], "'9.9'"), (["1.1", "x y"], "'x', 'y'")):
        with pytest.raises(ValueError, match=f"unknown claim ID\\(s\\): {named}; valid IDs"):
            select_sections(given, False)


def test_bench_json_to_stdout_gets_the_json_alone(tmp_path, monkeypatch, capsys):
    """`bench ... --json /dev/stdout | jq` failed: the table and a "wrote" line shared stdout with the JSON."""
    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "quick": True, "targets": []})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "the table")
    path = tmp_path / "out.json"
    with open(path, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["bench", "optim", "--quick", "--json", str(path)]) == 0
    monkeypatch.undo()
    payload = json.loads(path.read_text())
    assert payload["suite"] == "optim"
    assert payload["environment"]["command"] == f"theorylab bench optim --quick --json {path}"
    assert "the table" in capsys.readouterr().err


def test_bench_json_to_a_stdout_appending_to_a_log_keeps_the_log(tmp_path, monkeypatch, capsys):
    """`--json /dev/stdout >> log` reopened the log file to replace it: its earlier lines were lost (a user's
    journey). The JSON now goes into the stream itself."""
    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "quick": True, "targets": []})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "the table")
    log = tmp_path / "log.txt"
    log.write_text("an earlier line\n")
    with open(log, "a") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["bench", "optim", "--quick", "--json", f"/proc/self/fd/{stdout.fileno()}"]) == 0
    monkeypatch.undo()
    first, rest = log.read_text().split("\n", 1)
    assert first == "an earlier line" and json.loads(rest)["suite"] == "optim"


def test_bench_json_to_a_stdout_wrapper_without_a_buffer(tmp_path, monkeypatch, capsys):
    """A tee of one's own with write, flush and fileno but no buffer: the JSON failed after the benchmark with an
    AttributeError (the review)."""
    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "quick": True, "targets": []})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "the table")

    class Tee:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            return self.stream.write(text)

        def flush(self):
            self.stream.flush()

        def fileno(self):
            return self.stream.fileno()

    log = tmp_path / "log.txt"
    with open(log, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", Tee(stdout))
        assert main(["bench", "optim", "--quick", "--json", f"/proc/self/fd/{stdout.fileno()}"]) == 0
    monkeypatch.undo()
    assert json.loads(log.read_text())["suite"] == "optim"


def _fake_results(module):
    """Measured results of each suite as its targets read them (a full run: judged)."""
    if module is bench_attention:
        return {"quick": False, "rows": [
            {"impl": impl, "causal": causal, "n": 16384, "pass": kind, "seconds": seconds, "peak_mib": 10.0}
            for impl, seconds in (("theorylab FAVOR+", 1.0), ("torch SDPA (exact)", 20.0),
                                  ("performer-pytorch", 5.0))
            for causal in (False, True) for kind in ("forward", "forward+backward")]}
    if module is bench_optim:
        return {"quick": False, "results": [{"threads": 1, "rows": [
            {"optimizer": "theorylab AdamW", "vs_torch_foreach": 1.0, "vs_torch_fused": 2.0}]}]}
    if module is bench_rnn:
        return {"log_jacobian_norms": [{"H": bench_rnn.TARGET["H"], "T": bench_rnn.TARGET["T"], "seconds": 12.0}]}
    return {"quick": False, "rows": [{"n": bench_decode.TARGET_N, "kv_cache_over_state_time": 2.0}]}


@pytest.mark.parametrize("module", [bench_attention, bench_optim, bench_rnn, bench_decode])
def test_every_suite_reports_its_targets_with_the_same_keys(module):
    """A nightly parser needs one code path: optim's targets had {kind, met} where the others have
    {must_met, goal_met}."""
    rows = module.targets(_fake_results(module))
    assert rows
    for row in rows:
        assert {"target", "measured", "must", "goal", "must_met", "goal_met"} <= set(row), row
        for level in ("must", "goal"):  # a level without a bound is never judged; a measured one with a bound is
            assert row[f"{level}_met"] is None if row[level] == "-" else (row["measured"] is None) is (
                row[f"{level}_met"] is None), row


def test_no_stdout_at_all_is_not_an_error(monkeypatch):
    """`theorylab verify ... >&-` (or pythonw) has sys.stdout None: the guard had crashed on it (exit 1)."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["env"]) == 0


def test_the_error_line_is_the_exception_not_its_last_line():
    try:
        error = RuntimeError("boom line one\nsecond line of the message")
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note("hint: see docs")
        raise error
    except RuntimeError:
        import traceback

        text = traceback.format_exc()
    from theorylab.claims.base import error_line

    assert error_line(text) == "RuntimeError: boom line one"
    assert error_line("not implemented") == "not implemented"
    assert error_line("its module failed to import: x\ny") == "its module failed to import: x"


def test_a_json_pipe_closed_by_its_reader_is_not_an_error(tmp_path, monkeypatch, capsys):
    from theorylab.cli import bench as cli_bench

    def closed(name, payload):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "quick": True, "targets": []})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "the table")
    monkeypatch.setattr(cli_bench, "_write_json", closed)
    assert main(["bench", "optim", "--quick", "--json", str(tmp_path / "x.json")]) == 0
    captured = capsys.readouterr()
    assert "results follow" not in captured.err and "wrote" not in captured.out


def test_a_closed_stderr_is_not_a_crash(tmp_path):
    """`theorylab verify ... 2>&-` exited 1 at once with nothing written: with fd 2 closed Python sets sys.stderr
    to None, and the progress bar's check called None.isatty()."""
    script = 'exec "$0" -m theorylab verify --only 2.2 --out "$1" 2>&-'
    proc = subprocess.run(["sh", "-c", script, sys.executable, str(tmp_path)], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_stdout_and_stderr_both_on_a_full_disk_keep_the_exit_status(monkeypatch):
    """`theorylab env >log 2>&1` on a full disk exited 1: the notice that stdout failed could not be written
    to stderr either, and that failure escaped main."""
    out, err = _Failing(errno.ENOSPC), _Failing(errno.ENOSPC)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["env"]) == 0
    assert sys.stdout is out and sys.stderr is err


def test_main_leaves_the_streams_error_handlers_and_matplotlib_backend_as_it_found_them(tmp_path, monkeypatch):
    """Called from a script or a notebook, main() had set both streams' errors to "replace" and matplotlib's
    backend to Agg for good (a notebook's inline plots stopped showing)."""
    import io

    import matplotlib

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    previous = matplotlib.get_backend()
    matplotlib.use("svg", force=True)
    try:
        assert main(["verify", "--only", "2.2", "--out", str(tmp_path)]) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous, force=True)
    assert out.errors == "strict"
    out.seek(0)
    assert "2.2" in out.buffer.getvalue().decode("ascii")  # "≡" and the like were written as "?"


def test_the_first_verify_in_a_process_leaves_pythons_random_stream_alone(tmp_path):
    """rich, imported during the first run, draws from Python's global generator (its style ids): a script's
    `random` stream moved on the first call of main() only (a review). A fresh process, since rich is imported
    here already."""
    script = (
        "import random, sys\n"
        "from theorylab.cli import main\n"
        "random.seed(7); expected = [random.random() for _ in range(3)]\n"
        "random.seed(7)\n"
        "assert main(['verify', '--only', '2.2', '--out', sys.argv[1]]) == 0\n"
        "print([random.random() for _ in range(3)] == expected)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"
