"""``theorylab bench attention|optim|rnn|decode``: medians of interleaved rounds against same-run baselines."""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import json
import os
import shlex
import stat
import sys
from pathlib import Path

from ._args import check_writable

SUITES = ("attention", "optim", "rnn", "decode")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a system against its baselines (medians of interleaved rounds, "
                                     "same-run ratios, must/goal targets)",
                       description="Time one system against baselines measured in the same run (medians of "
                                   "interleaved rounds) and judge its must/goal targets. attention: FAVOR+ against "
                                   "torch's SDPA (and performer-pytorch when installed), n up to 16384; optim: one "
                                   "AdamW step on 10M parameters against torch.optim.AdamW (foreach and fused); "
                                   "rnn: exact Jacobian norms and Lyapunov spectra against autograd and an SVD per "
                                   "step; decode: one token after a context of n, recurrent state against a KV "
                                   "cache. Each takes minutes. Every suite's sizes, baselines and targets, and the "
                                   "tables they gave: docs/benchmarks.md.")
    p.add_argument("suite", choices=SUITES, help="which system to benchmark")
    p.add_argument("--json", metavar="FILE",
                   help="also write the results as JSON (a missing folder of FILE is created)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, about a minute: a smoke run whose targets are not judged")
    p.set_defaults(run=run)


def _check_json_target(name: str) -> str | None:
    """Why ``--json name`` cannot be written, or None: checked before the benchmark, not after minutes of it."""
    if not name.strip():
        return "--json needs a file name"
    if "\0" in name:  # pathlib's is_dir() answers False for it; the write at the end raised
        return "--json contains a NUL byte"
    # "newdir/" and "newdir/." (no such folder) had become a file named newdir: pathlib and realpath drop them
    if name.endswith(("/", os.sep)) or os.path.basename(name) in (".", ".."):
        return f"--json {name!r} names a folder; give a file name"
    path = Path(name)
    try:
        if path.is_dir():
            return f"--json {name!r} is a folder; give a file name"
        if path.exists() and not os.access(path, os.W_OK):  # replacing it would overwrite a read-only file
            return f"--json {name!r} exists and is not writable"
        if _in_place(name) or _is_stdout(name):  # a pipe, a device, stdout: written into, not replaced
            return None
        path = _target(name)  # a link to a file that does not exist yet: that file, created in its folder
    except (OSError, ValueError) as e:  # Python 3.11's pathlib lets "file name too long" and NUL bytes through
        if getattr(e, "errno", None) == errno.ENAMETOOLONG:
            return "--json file name is longer than the filesystem allows"
        return f"--json {name!r} cannot be used: {getattr(e, 'strerror', None) or e}"
    err = check_writable(path.parent, "the --json file's folder")
    if err is None and hasattr(os, "pathconf"):  # the name itself: one longer than the filesystem allows
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
        if len(os.fsencode(path.name)) > limit:
            err = f"--json file name is longer than the filesystem allows ({limit} bytes)"
    return err


def _target(name: str) -> Path:
    """The file that ``--json name`` writes: a link's target, so that the atomic replace keeps the link."""
    return Path(os.path.realpath(name))


def _in_place(name: str) -> bool:
    """Whether ``--json name`` is written into rather than replaced: an existing file that is not a regular one
    (a pipe, /dev/stdout, a device: a rename would put a regular file in its place) or has other names (hard
    links, which a rename would leave with the old results)."""
    try:
        st = os.stat(name)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) or st.st_nlink > 1


def _is_stdout(name: str) -> bool:
    """Whether the file ``name`` is the one standard output writes to (the same device and inode)."""
    try:
        mine, theirs = os.stat(name), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _write_json(name: str, payload: dict) -> None:
    """Atomically, keeping an existing file's permission bits (a private results file stays private); in place
    where a rename would not do (:func:`_in_place`)."""
    from ..claims.engine import write_json_atomic

    text = json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    if _is_stdout(name):  # into the stream itself: reopening the file that `>> log` appends to truncated it
        sys.stdout.flush()
        buffer = getattr(sys.stdout, "buffer", None)  # a wrapper of one's own (a tee to a log) may have none
        if buffer is not None:
            buffer.write(text.encode("utf-8", errors="backslashreplace"))  # as the file would hold it
            buffer.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        return
    if _in_place(name):
        with open(name, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        return
    target = _target(name)
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    write_json_atomic(target, payload, mode=mode)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    err = None
    if args.json is not None:  # before minutes of benchmarking, not after
        err = _check_json_target(args.json)
    if err:
        print(f"theorylab bench: error: {err}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"theorylab.bench.{args.suite}")
    except ModuleNotFoundError as e:
        if e.name != f"theorylab.bench.{args.suite}":
            raise
        print(f"theorylab bench: error: the {args.suite} benchmark is not implemented yet", file=sys.stderr)
        return 2
    from ..claims.engine import json_safe
    from ..env import environment

    environment_ = {**environment(), "command": shlex.join(["theorylab", *argv])}  # the date and the machine
    result = {**module.run(quick=args.quick), "environment": environment_}
    # --json /dev/stdout (or the file stdout is redirected to): the JSON alone there, for jq; the table to stderr
    text = sys.stderr if args.json is not None and _is_stdout(args.json) else sys.stdout
    print(module.format_table(result), file=text)
    if args.json:  # strict JSON: non-finite numbers as the strings "nan", "inf", "-inf" (as in results.json)
        payload = json_safe(result)
        try:  # atomic: a write that fails halfway (a full disk) keeps the previous file whole
            _write_json(args.json, payload)
            print(f"wrote {args.json}", file=text)
        except BrokenPipeError:  # --json into a pipe whose reader stopped reading: its choice, as for stdout
            pass
        except OSError as e:  # minutes of measurement: not lost to a traceback
            print(f"theorylab bench: error: cannot write {args.json!r}: {e.strerror or e}; the results follow "
                  "as JSON", file=sys.stderr)
            print(json.dumps(payload, indent=2, allow_nan=False), file=sys.stderr)
            return 2
    failed = unmet_musts(result)
    for target in failed:
        print(f"theorylab bench: must not met: {target}", file=sys.stderr)
    return 1 if failed else 0


def unmet_musts(result: dict) -> list[str]:
    """The judged must targets that did not hold (a --quick run judges none): the exit status is 1 if any."""
    return [t["target"] for t in result.get("targets", []) if t.get("must_met") is False]
