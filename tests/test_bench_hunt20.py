"""Regressions found by the twentieth session's bug hunt of the benchmarks: ``--json`` written atomically and
checked for the file itself, a must that fails sets the exit status, counts are validated, ``--quick`` reaches the
iterative path of the RNN norms, and every suite shows progress."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from attention_helpers import needs_cxx_compiler

from theorylab.bench import decode as bench_decode
from theorylab.bench import optim as bench_optim
from theorylab.bench import rnn as bench_rnn
from theorylab.cli import main
from theorylab.cost import interleaved_times, median_time
from theorylab.rnn.jacobian import SVD_MAX_WORK


@pytest.fixture
def fake_rnn_bench(monkeypatch):
    """``bench rnn`` with an instant result whose target ``must_met`` the test sets."""
    outcome = {"must_met": None}

    def run(quick):
        return {"suite": "rnn", "x": math.nan, "targets": [{"target": "log_jacobian_norms, H=256, T=10000",
                                                            "measured": 1.0, "must": "< 30 s", "goal": "-",
                                                            "must_met": outcome["must_met"], "goal_met": None}]}

    monkeypatch.setattr(bench_rnn, "run", run)
    monkeypatch.setattr(bench_rnn, "format_table", lambda result: "table")
    return outcome


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_json_naming_a_folder_is_refused_not_written_as_a_file(tmp_path, fake_rnn_bench, capsys, suffix):
    """``--json newdir/`` and ``newdir/.`` (no such folder) wrote a file named newdir (the name is normalised)."""
    target = tmp_path / "newdir"
    assert main(["bench", "rnn", "--json", f"{target}{suffix}"]) == 2
    assert "names a folder" in capsys.readouterr().err
    assert not target.exists()


def test_json_through_a_link_writes_its_target_and_keeps_the_link(tmp_path, fake_rnn_bench):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("{}")
    link.symlink_to(real)
    assert main(["bench", "rnn", "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(real.read_text())["x"] == "nan"


def test_json_through_a_link_to_a_file_not_yet_there_creates_it(tmp_path, fake_rnn_bench):
    (tmp_path / "results").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "results" / "new.json")
    assert main(["bench", "rnn", "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(link.read_text())["suite"] == "rnn"


def test_an_existing_json_file_keeps_its_permissions_and_its_other_names(tmp_path, fake_rnn_bench):
    """The atomic replace gave a private (0600) file the umask's mode (world-readable) and left a hard link to it
    with the old results."""
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    assert main(["bench", "rnn", "--json", str(private)]) == 0
    assert private.stat().st_mode & 0o777 == 0o600 and json.loads(private.read_text())["suite"] == "rnn"
    linked, other = tmp_path / "linked.json", tmp_path / "other-name.json"
    linked.write_text("{}")
    os.link(linked, other)
    assert main(["bench", "rnn", "--json", str(linked)]) == 0
    assert json.loads(other.read_text())["suite"] == "rnn" and linked.stat().st_ino == other.stat().st_ino


def test_json_into_a_pipe_is_written_into_it_not_replaced(tmp_path, fake_rnn_bench):
    """A rename put a regular file where the FIFO was: its reader waited forever while bench said "wrote"."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    # a daemon: where the FIFO is replaced, its reader waits forever and must not hold pytest at exit
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["bench", "rnn", "--json", str(fifo)]) == 0
    reader.join(timeout=10)
    assert not reader.is_alive() and json.loads(got[0])["suite"] == "rnn"
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_read_only_json_file_is_refused_before_the_benchmark(tmp_path, fake_rnn_bench, monkeypatch, capsys):
    """The atomic replace would overwrite a read-only file; the check asks the OS (which lets root write anything,
    so the answer is faked here for the suite to mean the same under root)."""
    from theorylab.cli import bench as cli_bench

    out = tmp_path / "o.json"
    out.write_text("{}")
    monkeypatch.setattr(cli_bench.os, "access", lambda path, mode: not (os.fspath(path) == str(out)
                                                                        and mode == os.W_OK))
    assert main(["bench", "rnn", "--json", str(out)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_a_failed_json_write_keeps_the_old_file_and_prints_the_results(tmp_path, fake_rnn_bench, monkeypatch,
                                                                       capsys):
    """The write happened in place and unguarded: a full disk left invalid JSON (the old results gone) and a
    traceback that lost the minutes of measurement."""
    import theorylab.claims.engine as engine

    out = tmp_path / "o.json"
    out.write_text('{"old": true}\n')
    real_dump = json.dump

    def full_disk(obj, f, **kw):
        f.write('{"half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine.json, "dump", full_disk)
    assert main(["bench", "rnn", "--json", str(out)]) == 2
    monkeypatch.setattr(engine.json, "dump", real_dump)
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left" in err
    assert json.loads(out.read_text()) == {"old": True}  # untouched
    printed = json.loads(err[err.index("{"):])  # the results, as strict JSON, on stderr
    assert printed["x"] == "nan" and printed["suite"] == "rnn"
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]  # no temporary file left behind


@pytest.mark.parametrize(("must_met", "status"), [(True, 0), (None, 0), (False, 1)])
def test_a_must_that_is_not_met_sets_the_exit_status(fake_rnn_bench, capsys, must_met, status):
    """A must printed as NOT met exited 0, so no script or CI job could see the regression it exists to catch."""
    fake_rnn_bench["must_met"] = must_met
    assert main(["bench", "rnn"]) == status
    assert ("must not met: log_jacobian_norms" in capsys.readouterr().err) is (status == 1)


def test_optim_musts_count_and_goals_do_not(monkeypatch, capsys):
    result = {"quick": False, "results": [{"threads": 1, "rows": [
        {"optimizer": "theorylab AdamW", "vs_torch_foreach": 1.05, "vs_torch_fused": 9.0}]}]}
    rows = bench_optim.targets(result)  # goals missed (9× fused), the must met
    assert rows[0]["kind"] == "must" and rows[0]["must_met"] and not rows[1]["goal_met"]
    monkeypatch.setattr(bench_optim, "run", lambda quick: {"suite": "optim", "targets": rows})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "table")
    assert main(["bench", "optim"]) == 0
    result["results"][0]["rows"][0]["vs_torch_foreach"] = 1.2
    rows[:] = bench_optim.targets(result)
    assert main(["bench", "optim"]) == 1


@pytest.mark.parametrize("repeats", [0, -3, math.nan, 2.5, True])
def test_median_time_refuses_a_repeat_count_that_is_not_a_positive_integer(repeats):
    """nan, -3 and True timed one call silently; 2.5 raised a bare TypeError."""
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        median_time(lambda: None, repeats=repeats)


def test_numpy_integers_are_counts():
    assert median_time(lambda: None, repeats=np.int64(2), warmup=np.int32(0)) >= 0
    times = interleaved_times({"a": lambda: None}, rounds=np.int64(2), warmup=np.int64(0), max_rounds=np.int64(3))
    assert len(times["a"]) == 2


@pytest.mark.parametrize("warmup", [-2, 1.5])
def test_warmup_must_be_a_count(warmup):
    """warmup=-2 ran no warm-up without a word; 1.5 raised a bare TypeError."""
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        median_time(lambda: None, warmup=warmup)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        interleaved_times({"a": lambda: None}, warmup=warmup)


def test_max_rounds_below_rounds_is_refused():
    with pytest.raises(ValueError, match="max_rounds must be an integer >= 3"):
        interleaved_times({"a": lambda: None}, rounds=3, max_rounds=2)
    assert len(interleaved_times({"a": lambda: None}, rounds=3, max_rounds=3)["a"]) == 3


def test_quick_rnn_rows_reach_the_iterative_path_and_its_proof():
    """Every --quick row took the SVD path: the iteration, its Cholesky proof and their counts never ran."""
    assert any(h**3 > SVD_MAX_WORK for h, _, _ in bench_rnn.QUICK["norms"])
    assert any(h**3 > SVD_MAX_WORK and init == "orthogonal" for h, _, init in bench_rnn.QUICK["norms"])
    hidden, steps, init = max(bench_rnn.QUICK["norms"], key=lambda r: (r[0], r[2] == "orthogonal"))
    row = bench_rnn._norm_row(hidden, steps, init)
    assert row["extensions_per_step"] > 0 and row["cholesky_proofs"] > 0 and row["rescaled"] == 0
    assert row["max_rel_err_vs_svd"] < 1e-9


def _recorder(monkeypatch, module):
    labels, totals = [], []

    @contextlib.contextmanager
    def steps(total, description):
        totals.append((description, total))
        yield labels.append

    monkeypatch.setattr(module, "progress_steps", steps)
    return labels, totals


def test_bench_decode_and_rnn_advance_a_progress_bar_once_per_step(monkeypatch):
    """Only ``bench attention`` showed progress; a full ``bench decode`` ran 28 s without a sign of life."""
    labels, totals = _recorder(monkeypatch, bench_decode)
    monkeypatch.setattr(bench_decode, "_row", lambda n, rounds: {"n": n, "state_ms": 1.0, "kv_cache_ms": 2.0,
                                                                  "kv_cache_over_state_time": 2.0})
    monkeypatch.setattr(bench_decode, "_accuracy", lambda *a: {})
    bench_decode.run(quick=True)
    assert totals == [("bench decode", len(labels))] and labels[-1] == "accuracy of decoding"

    labels, totals = _recorder(monkeypatch, bench_rnn)
    monkeypatch.setattr(bench_rnn, "_norm_row", lambda h, t, init: {"H": h, "T": t, "seconds": 0.0})
    monkeypatch.setattr(bench_rnn, "_autograd_row", lambda h, t: {})
    monkeypatch.setattr(bench_rnn, "_timed", lambda fns, reps: ({"ours": 0.0}, {"ours": torch.zeros(1, 1)}))
    bench_rnn.run(quick=True)
    assert totals == [("bench rnn", len(labels))] and len(labels) == sum(map(len, bench_rnn.QUICK.values()))


def test_bench_optim_advances_once_per_thread_count(monkeypatch):
    labels, totals = _recorder(monkeypatch, bench_optim)
    monkeypatch.setattr(bench_optim, "_measure", lambda shapes, threads, rounds, compile_chain:
                        {"threads": threads, "rounds": rounds, "rows": []})
    monkeypatch.setattr(bench_optim.torch, "get_num_threads", lambda: 2)
    bench_optim.run(quick=False)
    assert totals == [("bench optim", 2)] and labels == ["AdamW steps on 1 thread(s), torch.compile",
                                                          "AdamW steps on 2 thread(s)"]


@needs_cxx_compiler
@pytest.mark.slow
def test_the_compiled_rows_are_measured_and_judged():
    """``--quick`` never builds the torch.compile rows, so only a full run would find them broken."""
    res = bench_optim._measure([(8, 8), (8,)], threads=1, rounds=2, compile_chain=True)
    assert "compile_error" not in res and res["compile_seconds"] > 0
    rows = {r["optimizer"]: r for r in res["rows"]}
    assert {bench_optim.COMPILED, bench_optim.COMPILED_PROPAGATE} <= set(rows)
    targets = bench_optim.targets({"quick": False, "results": [res]})
    judged = [t for t in targets if t["target"].startswith(bench_optim.COMPILED_PROPAGATE)]
    assert len(judged) == 1 and judged[0]["met"] is (rows[bench_optim.COMPILED_PROPAGATE]["vs_torch_fused"] <= 1.3)


def test_a_failed_compile_shows_its_targets_as_not_measured(monkeypatch):
    """The compiled rows' targets vanished from the table when torch.compile failed (no C++ compiler)."""
    def no_compiler(fn):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(bench_optim.torch, "compile", no_compiler)
    res = bench_optim._measure([(8, 8), (8,)], threads=1, rounds=2, compile_chain=True)
    assert "no C++ compiler" in res["compile_error"]
    result = {"parameters": 72, "tensors": 2, "torch": "x", "quick": False, "results": [res]}
    result["targets"] = bench_optim.targets(result)
    names = (bench_optim.COMPILED, bench_optim.COMPILED_PROPAGATE)
    compiled = [t for t in result["targets"] if t["target"].split(" / ")[0] in names]
    assert len(compiled) == 2 and all(t["measured"] is None and t["met"] is None for t in compiled)
    table = bench_optim.format_table(result)
    assert "torch.compile failed: RuntimeError('no C++ compiler')" in table and "not measured" in table
