"""``theorylab verify``: run the claims, write results.json and report.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..claims import CLAIM_IDS, UnknownClaimError, run_claims, select_sections
from ..claims.base import PASSING
from ..report import write_report
from ..report.html import why
from ._args import (
    MAX_SEED,
    OutputBusyError,
    check_files,
    check_writable,
    exclusive_output,
    folder,
    seed,
    sigterm_as_interrupt,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="run every claim and write results.json and an HTML report",
                       description="Run the claims of the problem set by measurement. Writes DIR/results.json "
                                   "(rewritten after every claim) and DIR/report.html with figures beside it. "
                                   "Exit 0 when every selected claim is confirmed (or not judged), 1 otherwise, 2 "
                                   "for bad arguments.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes, about 30 s: a smoke run; claim 4.4's grids are too small to judge it, so "
                        "its verdict is 'not judged'")
    p.add_argument("--extras", action="store_true",
                   help="also run the extra sections that train models (minutes)")
    p.add_argument("--only", nargs="+", action="extend", metavar="ID",
                   help=f"claim IDs to run ({' '.join(CLAIM_IDS)}), or IDs of extra sections (rnn-tasks, "
                        "charlm, or one registered with theorylab.claims.extra) to run without the other extras; "
                        "may be given more than once")
    p.add_argument("--out", type=folder, default="theorylab-report", metavar="DIR",
                   help="output folder (default: ./theorylab-report)")
    p.add_argument("--seed", type=seed, default=0, help=f"seed of every experiment, 0..{MAX_SEED} (default: 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        sections = select_sections(args.only, args.extras)
    except UnknownClaimError as e:
        print(f"theorylab verify: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if err := check_writable(out) or check_files(out, ("results.json", "report.html")):
        print(f"theorylab verify: error: {err}", file=sys.stderr)
        return 2
    try:
        with exclusive_output(out), sigterm_as_interrupt() as terminated:
            try:
                payload = run_claims(sections, out_dir=out, seed=args.seed, quick=args.quick,
                                     argv=["theorylab", *argv])
            except KeyboardInterrupt as e:
                what = "terminated" if terminated else "interrupted"
                finished = getattr(e, "payload", None)  # None: interrupted before this run wrote anything
                if finished is None:
                    print(f"{what} before any result was written", file=sys.stderr)
                else:
                    write_report(out, finished)  # every finished claim
                    print(f"{what}; partial results in {out / 'results.json'}", file=sys.stderr)
                return 143 if terminated else 130
            report = write_report(out, payload)
    except OutputBusyError as e:
        print(f"theorylab verify: error: {e}", file=sys.stderr)
        return 2
    records = payload["claims"] + payload["extras"]
    for r in records:  # a figure lost (a full disk) leaves the verdict standing, but must not pass unseen
        for failure in r.get("figure_errors", []):
            print(f"theorylab verify: warning: {r['id']}: {failure}", file=sys.stderr)
    _print_summary(records)
    for r in records:  # why, in a line: the table has no room for it (the report has all of it)
        if line := why(r):
            print(f"{r['id']} {r['verdict']}: {line}")
    counts = {v: sum(r["verdict"] == v for r in records) for v in ("confirmed", "not judged", "refuted", "error")}
    others = ", ".join(f"{n} {v}{'s' if v == 'error' and n > 1 else ''}" for v, n in counts.items()
                       if n and v != "confirmed")
    print(f"{counts['confirmed']}/{len(records)} confirmed{f' ({others})' if others else ''} in "
          f"{payload['total_seconds']:.1f} s; report: {report}")
    return 0 if all(r["verdict"] in PASSING for r in records) else 1


def _print_summary(records: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..report.html import result_line

    table = Table(title="theorylab verify")
    for col in ("ID", "title", "verdict", "measured vs criterion", "s"):
        table.add_column(col)
    colours = {"confirmed": "green", "refuted": "red", "error": "yellow", "not judged": "blue"}
    for r in records:
        # escaped: an error text such as "expected [batch, n]" is not rich markup (it was dropped, or crashed)
        table.add_row(escape(r["id"]), escape(r["title"]), f"[{colours[r['verdict']]}]{r['verdict']}",
                      escape(result_line(r)), f"{r['seconds']:.1f}")
    console = Console()  # a terminal's own width; in a pipe or log rich assumes 80, too narrow for the numbers
    (console if console.is_terminal else Console(width=160)).print(table)
