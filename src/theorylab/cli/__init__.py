"""``theorylab`` command line: each subcommand is a small module that adds its own parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, env, verify

_SUBCOMMANDS = (verify, bench, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="theorylab",
        description="RNN gradients, momentum, efficient attention and weight decay: verify each claim by measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code or 0)
    return int(args.run(args, argv))
