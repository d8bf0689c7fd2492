"""Regressions found by the twentieth session's bug hunt of training and its output folder: the temporary files of
a run killed mid-write are removed by the next run that holds the folder, and the write probe has a unique name."""

from __future__ import annotations

import os
import time

from theorylab.claims.engine import write_json_atomic
from theorylab.cli import _args
from theorylab.experiments.checkpoint import save_checkpoint

STALE = [".checkpoint.pt-9270rkbw.tmp", ".results-ab_c1234.json"]
KEPT = ["checkpoint.pt", "metrics.json", ".results-notours.json", "notes.tmp", ".checkpoint.pt-short.tmp"]


def test_the_next_run_that_holds_the_folder_removes_a_killed_runs_temporaries(tmp_path):
    """A SIGKILL or SIGTERM during a checkpoint write left a checkpoint-sized .tmp that neither --resume nor
    --overwrite ever removed: each pre-emption during a write leaked one more copy."""
    for name in STALE + KEPT:
        _old_file(tmp_path / name)
    with _args.exclusive_output(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEPT)


def test_a_temporary_still_being_written_is_kept(tmp_path):
    """``bench --json`` and the library's functions write the same temporaries without the lock: one written to
    within the last minute may be live (removing it had failed that write)."""
    live = tmp_path / STALE[1]
    live.write_text("x")
    os.utime(live, (time.time() - _args.STALE_AFTER_S + 5,) * 2)
    _old_file(tmp_path / STALE[0])
    assert _args.remove_stale_temporaries(tmp_path) == [STALE[0]]
    assert live.exists()


def _old_file(path):
    path.write_text("x")
    old = time.time() - _args.STALE_AFTER_S - 1
    os.utime(path, (old, old))


def test_the_patterns_match_the_names_our_atomic_writes_use(tmp_path, monkeypatch):
    """The temporaries that a write killed between mkstemp and the rename leaves are the ones removed."""
    left = []

    def killed(src, dst):  # the process dies before the rename: the temporary stays
        left.append(os.path.basename(src))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    for write in (lambda: save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1}),
                  lambda: write_json_atomic(tmp_path / "metrics.json", {"a": 1})):
        try:
            write()
        except KeyboardInterrupt:
            pass
    assert len(left) == 2 and all(_args._TEMPORARY.fullmatch(name) for name in left)
    assert _args.remove_stale_temporaries(tmp_path) == []  # the writers' own cleanup ran: a KeyboardInterrupt
    for name in left:  # is an exception; SIGKILL is not, and leaves them
        _old_file(tmp_path / name)
    assert sorted(_args.remove_stale_temporaries(tmp_path)) == sorted(left)


def test_an_unlocked_folder_keeps_its_temporaries(tmp_path, monkeypatch, capsys):
    """Without the lock (no flock: Windows, NFS) another run may be writing them: nothing is removed."""
    _old_file(tmp_path / STALE[0])
    monkeypatch.setattr(_args, "fcntl", None)
    with _args.exclusive_output(tmp_path):
        assert (tmp_path / STALE[0]).exists()


def test_the_write_probe_does_not_touch_another_processs_probe_of_the_same_pid(tmp_path, monkeypatch):
    """The probe was named by the pid only: on a multi-node job over a shared folder, where identical containers
    give ranks the same pids, one node removed the other's probe, whose own removal then failed (exit 2)."""
    monkeypatch.setattr(os, "getpid", lambda: 42)
    other = tmp_path / ".theorylab-write-test-42"
    other.write_text("another node's probe")
    assert _args.check_writable(tmp_path) is None
    assert other.read_text() == "another node's probe"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]  # ours is gone


def test_a_broken_symbolic_link_as_the_output_folder_is_named_so(tmp_path):
    """It read "cannot write to output folder ...: File exists", where nothing exists."""
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere" / "x")
    why = _args.check_writable(link)
    assert why is not None and "broken symbolic link" in why and "nowhere" in why


def test_a_broken_symbolic_link_above_the_output_folder_is_named_too(tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    why = _args.check_writable(link / "sub" / "run")
    assert why is not None and f"its folder {str(link)!r} is a broken symbolic link" in why
