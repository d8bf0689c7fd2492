r"""Is claim 4.4's Adam half a lack of power or a lack of effect? Design 4 with more replicates.

``theorylab verify`` runs claim 4.4 (the fourth design) with 5 replicates; its Adam half fails because the paired
bootstrap interval of the orientation gap :math:`|r|_{L2} - |r|_{decoupled}` reaches 0 (the Adam surfaces are
flat: signal/noise 1.1-1.9). This script runs the same design, changing only the number of replicates, at one or
more data seeds (each data seed draws its own replicates: splits, training images, initialisations, minibatch
streams), and applies the claim's own analysis (:func:`theorylab.claims.q4_weight_decay.why_decoupled`).

The plan and its read-out were written down (docs/history.md, ninth session) before the first run:
"power" when, at every data seed, the Adam gap's 90% interval lies above 0 and the problem set's point criterion
passes; otherwise "no effect at this power".

    .venv/bin/python benchmarks/q4_power.py [--replicates 30] [--data-seeds 0 1] [--json FILE] [--figures DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from theorylab.claims import q4_weight_decay as q4

PANELS = ("adam_l2", "adam_decoupled", "sgd_l2", "sgd_decoupled", "adam_decoupled_lr")


def run(replicates: int, data_seed: int, figures: Path | None) -> dict:
    """One data seed: the claim's numbers and its verdict, on ``replicates`` replicates."""
    cfg = dataclasses.replace(q4.FULL, seeds=replicates)
    start = time.perf_counter()
    evidence = q4.why_decoupled(data_seed, quick=False, cfg=cfg)
    seconds = time.perf_counter() - start
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for name, fig in evidence.figures.items():
            fig.savefig(figures / f"q4_power_{replicates}rep_seed{data_seed}_{name}.png", dpi=90)
    n = evidence.numbers
    return {"data_seed": data_seed, "replicates": replicates, "seconds": seconds,
            "verify_rule_confirms": evidence.confirmed,
            "point_criterion_passes": bool(n["point_criterion_passes"]),
            "adam_gap_resolved": q4.gap_side(n["orientation_gap_adam_bootstrap_90_lo"],
                                             n["orientation_gap_adam_bootstrap_90_hi"]) > 0,
            "numbers": n}


def describe(row: dict) -> str:
    n = row["numbers"]
    lines = [f"data seed {row['data_seed']}, {row['replicates']} replicates ({row['seconds']:.0f} s):"]
    for panel in PANELS:
        lines.append(f"  {panel:18s} r = {n['orientation_' + panel]:+.2f} "
                     f"({n[f'orientation_{panel}_bootstrap_90_lo']:+.2f} .. "
                     f"{n[f'orientation_{panel}_bootstrap_90_hi']:+.2f})  "
                     f"best {100 * n['best_test_error_' + panel]:.2f} ± "
                     f"{100 * n['best_test_error_se_' + panel]:.2f}%  signal/noise "
                     f"{n['signal_to_noise_' + panel]:.1f}")
    for opt in ("adam", "sgd"):
        lines.append(f"  gap {opt}: |r| L2 - |r| decoupled = {n[f'orientation_gap_{opt}_l2_minus_decoupled']:+.2f} "
                     f"(paired 90% bootstrap {n[f'orientation_gap_{opt}_bootstrap_90_lo']:+.2f} .. "
                     f"{n[f'orientation_gap_{opt}_bootstrap_90_hi']:+.2f})")
    lines.append(f"  point criterion {'passes' if row['point_criterion_passes'] else 'fails'}; verify's rule "
                 f"{'confirms' if row['verify_rule_confirms'] else 'refutes'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=30)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--figures", type=Path, help="save the heat maps here")
    args = parser.parse_args()
    if args.replicates < 2:
        parser.error(f"--replicates must be >= 2, got {args.replicates}")
    rows = []
    for seed in args.data_seeds:
        rows.append(run(args.replicates, seed, args.figures))
        print(describe(rows[-1]), flush=True)
    power = all(r["adam_gap_resolved"] and r["point_criterion_passes"] for r in rows)
    print(f"read-out: {'power' if power else 'no effect at this power'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"replicates": args.replicates, "rows": rows, "readout":
                                               "power" if power else "no effect at this power",
                                               "torch": torch.__version__}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
