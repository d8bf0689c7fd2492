r"""Causal FAVOR+ or separable attention of several revisions of theorylab, timed against each other in one process.

Launch-bound GPU kernels vary from run to run far more than their changes do: a run of ``gpu_attention.py`` on an
H200 timed causal FAVOR+ (n = 65536, forward) at 22.8 ms, and this script's prototype, on the same code and card
in one process, at 13.8 ms. To tell a change's effect from that spread, time the revisions in the same rounds
(:func:`theorylab.cost.interleaved_times`, the order rotating each round; medians). Each revision's
``src/theorylab`` is taken with ``git archive`` and imported under a name of its own; ``--worktree`` adds the
working tree's, and ``--package LABEL=DIR`` a package unpacked elsewhere (for a machine without the repository's
history: ``git archive REV src/theorylab | tar -x -C DIR``, then pass ``DIR/src/theorylab``). On CUDA the
read-backs of one call are counted too (``torch.cuda.set_sync_debug_mode``). Outputs are compared with the first
package's (max |difference|, printed and in the JSON). Settings as ``gpu_attention.py``: B=1, H=8, d=64, m=256,
float32, on the GPU if there is one.

    python benchmarks/attention_revisions.py [REV ...] [--package LABEL=DIR ...] [--worktree]
        [--kind favor|separable] [--ns 4096 16384 65536] [--rounds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from theorylab.cost import cuda_read_backs, interleaved_times

B, H, D, M = 1, 8, 64, 256
ROOT = Path(__file__).resolve().parent.parent


def load(index: int, package: Path) -> ModuleType:
    """theorylab.attention of the package in ``package``, imported under a name of its own (``theorylab_rev<index>_``
    and a random suffix: a name already imported would be answered from sys.modules with the other code)."""
    name = f"theorylab_rev{index}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"attention_revisions.py: no package in {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(name + ".attention")


def extract(rev: str, into: Path) -> Path:
    """``src/theorylab`` of git revision ``rev``, unpacked under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/theorylab"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"attention_revisions.py: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src" / "theorylab"


def _read_backs(call: Callable[[], None], device: torch.device) -> int | None:
    """The read-backs of ``call`` (its synchronising calls less the closing ``torch.cuda.synchronize()``'s, none in
    torch's source, as ``gpu_attention.py`` counts them); None off CUDA, where reading back costs nothing extra."""
    if device.type != "cuda":
        return None
    return (cuda_read_backs(call) or 0) - (cuda_read_backs(torch.cuda.synchronize) or 0)


def _timed_call(attend: Callable[..., torch.Tensor], label: str, qkv: tuple[torch.Tensor, ...], backward: bool,
                sync: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        out = attend(label, *qkv)
        if backward:
            out.sum().backward()
        sync()
    return call


def measure(modules: dict[str, ModuleType], kind: str, ns: list[int], rounds: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    maps = {label: mod.PositiveRandomFeatures(D, M, seed=0).to(device) for label, mod in modules.items()}

    def attend(label: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kind == "favor":
            return modules[label].linear_attention(q, k, v, maps[label], causal=True)
        return modules[label].separable_attention(q, k, v, causal=True)

    rows = []
    for n in ns:
        for backward in (False, True):
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B, H, n, D, device=device, generator=gen).requires_grad_(backward)
                       for _ in range(3))

            calls = {label: _timed_call(attend, label, (q, k, v), backward, sync) for label in modules}
            with torch.no_grad():
                outs = {label: attend(label, q, k, v) for label in modules}
            first = next(iter(outs.values()))
            times = interleaved_times(calls, rounds=rounds, warmup=3)
            rows.append({"n": n, "pass": "forward+backward" if backward else "forward",
                         "median_ms": {label: statistics.median(t) * 1e3 for label, t in times.items()},
                         "read_backs": {label: _read_backs(c, device) for label, c in calls.items()},
                         "max_abs_diff_vs_first": {label: float((o - first).abs().max()) for label, o in outs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", metavar="REV", help="git revisions (e.g. HEAD~3 main a71a5a5)")
    parser.add_argument("--worktree", action="store_true", help="also the working tree's src/theorylab")
    parser.add_argument("--package", action="append", default=[], metavar="LABEL=DIR",
                        help="also the theorylab package in DIR (a folder holding its __init__.py), labelled LABEL")
    parser.add_argument("--kind", choices=["favor", "separable"], default="favor")
    parser.add_argument("--ns", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    given = {}
    for item in args.package:
        label, sep, folder = item.partition("=")
        if not sep or not label or not (Path(folder) / "__init__.py").is_file():
            parser.error(f"--package {item!r}: give LABEL=DIR, DIR a folder holding a package's __init__.py")
        given[label] = Path(folder)
    labels = [*args.revs, *given, *(["worktree"] if args.worktree else [])]
    if len(labels) < 2:
        parser.error("give at least two revisions or packages (or one and --worktree)")
    if len(set(labels)) < len(labels):
        parser.error(f"each label once ({' '.join(labels)}); the working tree with --worktree")
    with tempfile.TemporaryDirectory() as tmp:
        packages = {rev: extract(rev, Path(tmp) / f"rev{i}") for i, rev in enumerate(args.revs)}
        packages.update(given)
        if args.worktree:
            packages["worktree"] = ROOT / "src" / "theorylab"
        modules = {label: load(i, path) for i, (label, path) in enumerate(packages.items())}
        rows = measure(modules, args.kind, args.ns, args.rounds)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"causal {args.kind} on {device}, torch {torch.__version__}; B={B} H={H} d={D} m={M} float32; "
          f"medians of {args.rounds} interleaved rounds, ms" + (" (read-backs)" if torch.cuda.is_available() else ""))
    labels = list(modules)
    print(f"{'pass':17s} {'n':>6s} " + " ".join(f"{label[:16]:>22s}" for label in labels)
          + f" {'max |diff| vs ' + labels[0][:12]:>26s}")
    for row in rows:
        cells = []
        for label in labels:
            syncs = row["read_backs"][label]
            cells.append(f"{row['median_ms'][label]:.2f}" + (f" ({syncs})" if syncs is not None else ""))
        diff = max(row["max_abs_diff_vs_first"].values())
        print(f"{row['pass']:17s} {row['n']:6d} " + " ".join(f"{c:>22s}" for c in cells) + f" {diff:26.2e}")
    if args.json:
        result = {"kind": args.kind, "device": device, "torch": torch.__version__, "revisions": labels, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
