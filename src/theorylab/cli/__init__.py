"""``theorylab`` command line: each subcommand is a small module that adds its own parser."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import io
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any


def _subcommands() -> list:
    from . import bench, env, verify  # here, not at import: main() catches an interrupt while torch loads

    modules = [verify, bench, env]
    for position, name in ((2, "train"), (3, "sample")):  # these two live with the training experiments
        try:
            modules.insert(position, importlib.import_module(f"theorylab.cli.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"theorylab.cli.{name}":
                raise
    return modules


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C back (block SIGINT) for the block; a Ctrl-C meanwhile arrives when it ends, as KeyboardInterrupt.

    ``import torch`` is not safe to interrupt: a SIGINT during it was ignored (the run went on and exited 0), or
    left a half-initialised module (``ImportError: cannot load module more than once per process``, a claim
    failing with RecursionError). Unix only; elsewhere, and off the main thread, the block runs as it is."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending SIGINT is delivered here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="theorylab",
        description="RNN gradients, momentum, efficient attention and weight decay: verify each claim by measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _subcommands():
        module.add_parser(sub)
    _mark_parsers(parser)
    return parser


def _mark_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as its own default ``command_parser``, so that an unknown option is reported with
    the usage of the innermost command given (``train charlm``), not the top level's."""
    for action in parser._actions:  # argparse keeps its subparsers there only
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _mark_parsers(command)


def _unrecognised(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's message for arguments nobody took, with the nearest option for a misspelt one (names compared
    without their "--", whose shared prefix made "--bogus" look like "--out"; none for an option that exists)."""
    options = {o[2:]: o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    hints = []
    for arg in extras:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name[2:] in options or name == "--":
            continue
        close = difflib.get_close_matches(name[2:], list(options), n=1, cutoff=0.75)
        if close:
            hints.append(f"{name}: did you mean {options[close[0]]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + "".join(f"\n  {h}" for h in hints)


def _owner(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
           extras: list[str]) -> argparse.ArgumentParser:
    """The parser to report ``extras`` with: the top level's when the first of them comes before the subcommand
    (``theorylab --bogus verify``), else the innermost subcommand's."""
    command = argv.index(args.command) if args.command in argv else len(argv)
    return parser if extras and extras[0] in argv[:command] else args.command_parser


class _GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` that survives its reader: a closed pipe (``theorylab verify | head -1``) or
    a full disk ends the printed output, not the run, whose results are in files and whose exit status stays the
    verdicts'.

    After the first failure, writes are dropped and the stream's file descriptor is pointed at /dev/null, so that
    the interpreter's own flush at exit does not fail again ("Exception ignored ... BrokenPipeError")."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.failure: OSError | None = None

    def write(self, text: str) -> int:
        if self.failure is None:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self) -> None:
        if self.failure is None:
            try:
                self.stream.flush()
            except OSError as e:
                self._fail(e)

    def _fail(self, error: OSError) -> None:
        self.failure = error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # no descriptor: nothing to do
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def _caller_random_streams() -> Iterator[None]:
    """Python's, numpy's and torch's global random streams (those the caller has imported) as they were: a
    claim reseeds them, and so does a library imported during the run (rich draws from Python's at import)."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    saved = (random.getstate(), numpy.random.get_state() if numpy is not None else None,
             torch.get_rng_state() if torch is not None else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        if saved[1] is not None:
            numpy.random.set_state(saved[1])  # type: ignore[union-attr]
        if saved[2] is not None:
            torch.set_rng_state(saved[2])  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit status. Called from a script
    or a notebook, it leaves the process as it found it: its streams, their error handlers, the random
    generators the caller has imported, and (see verify) matplotlib's backend."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout, stderr = sys.stdout, sys.stderr
    # a stream that cannot encode "≡" gets "?", not a traceback at the end
    handlers = [(s, s.errors) for s in (stdout, stderr) if hasattr(s, "reconfigure") and hasattr(s, "errors")]
    for stream, _ in handlers:
        stream.reconfigure(errors="replace")
    # no stderr at all (fd 2 closed, pythonw): Python sets it to None, and writing a progress bar or a warning
    # there would fail; a closed stdout (also None) needs nothing: print() drops its output
    devnull = open(os.devnull, "w", encoding="utf-8") if stderr is None else None  # noqa: SIM115 - closed below
    guarded_out = None if stdout is None else _GuardedStream(stdout)
    guarded_err = _GuardedStream(stderr if stderr is not None else devnull)
    sys.stdout, sys.stderr = guarded_out, guarded_err  # type: ignore[assignment]
    try:
        with _caller_random_streams():
            code = _main(argv)
        failure = None if guarded_out is None else guarded_out.failure
        if failure is not None and failure.errno != errno.EPIPE:  # a closed pipe is the reader's choice
            print(f"theorylab: could not write the output: {failure.strerror or failure}", file=sys.stderr)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        for stream, errors in handlers:
            stream.reconfigure(errors=errors)
        if devnull is not None:
            devnull.close()
    return code


def _main(argv: list[str]) -> int:
    try:
        with _interrupts_held():  # the subcommands import torch and numpy
            parser = build_parser()
        try:
            args, extras = parser.parse_known_args(argv)
            if extras:  # parse_args would report them with the top-level usage, not the subcommand's
                owner = _owner(parser, args, argv, extras)
                owner.error(_unrecognised(extras, owner))
        except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
            return int(e.code or 0)
        return int(args.run(args, argv))
    except KeyboardInterrupt:  # during start-up or a benchmark; verify and train handle their own first
        # under torchrun (RANK and WORLD_SIZE, as job_rank_world reads them) once, from rank 0 (it came from each)
        if "WORLD_SIZE" not in os.environ or os.environ.get("RANK", "0") in ("", "0"):
            print("theorylab: interrupted", file=sys.stderr)
        return 130
