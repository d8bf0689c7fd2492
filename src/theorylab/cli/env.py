"""``theorylab env``: versions, CPU and threads, for bug reports."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions, CPU and threads (paste this into bug reports)",
                       description="Print the versions of Python, torch and the other libraries theorylab uses, the "
                                   "CPU, and the threads torch will use: what a bug report or a benchmark needs.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..env import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for k, v in env.items():
        if k == "versions":
            for pkg, ver in v.items():
                print(f"{pkg:>22}: {ver or 'not installed'}")
        else:
            print(f"{k:>22}: {'-' if v is None else v}")  # None: not set, no GPU, not a git checkout
    return 0
