"""``theorylab`` command line: each subcommand is a small module that adds its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def _subcommands() -> list:
    from . import bench, env, verify  # here, not at import: main() catches an interrupt while torch loads

    modules = [verify, bench, env]
    try:  # `theorylab train` lives with the training experiments
        modules.insert(2, importlib.import_module("theorylab.cli.train"))
    except ModuleNotFoundError as e:
        if e.name != "theorylab.cli.train":
            raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="theorylab",
        description="RNN gradients, momentum, efficient attention and weight decay: verify each claim by measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _subcommands():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a stdout that cannot encode "≡" gets "?", not a traceback at the end
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
            return int(e.code or 0)
        return int(args.run(args, argv))
    except KeyboardInterrupt:  # during start-up or a benchmark; verify and train handle their own first
        print("theorylab: interrupted", file=sys.stderr)
        return 130
