"""``theorylab bench attention|optim|rnn``: medians of interleaved rounds against baselines timed in the same run."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ._args import check_writable

SUITES = ("attention", "optim", "rnn")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a system against its baselines (medians of interleaved rounds, "
                                     "same-run ratios, must/goal targets)")
    p.add_argument("suite", choices=SUITES, help="which system to benchmark")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    err = None
    if args.json is not None:  # before minutes of benchmarking, not after
        if not args.json.strip():
            err = "--json needs a file name"
        elif Path(args.json).is_dir():
            err = f"--json {args.json!r} is a folder; give a file name"
        else:
            err = check_writable(Path(args.json).parent, "the --json file's folder")
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

    result = {**module.run(quick=args.quick), "environment": environment()}  # the date and the machine
    print(module.format_table(result))
    if args.json:  # strict JSON: non-finite numbers as the strings "nan", "inf", "-inf" (as in results.json)
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
