"""``theorylab bench rnn``: exact Jacobian norms and Lyapunov spectra — time vs T and H, against baselines.

Baselines, measured in the same run on the same inputs:

* **autograd**: ``torch.autograd.functional.jacobian`` of all states with respect to h_0 (vectorised), then an SVD
  of each ∂h_t/∂h_0 — what one writes without this library (small sizes only: it holds T·H² numbers and does
  H backward passes over T steps);
* **SVD per step**: the explicit running product and a full SVD at every step (``log_norms_of_products_reference``;
  it also overflows for long horizons, which the timing ignores).

Ours and its baseline are timed in interleaved rounds (:func:`theorylab.cost.interleaved_times`) after one
untimed warm-up round; each time is the median of 3 rounds (for log_jacobian_norms at T = 10,000 and H = 256, one
round and no warm-up: a call takes seconds; the Lyapunov rows always take 3 rounds after a warm-up). The error
column is the largest relative error of our norms against the reference where both are computed; where one is
finite and the other not, it is inf. The baselines run with one torch thread: they are loops of small kernels,
which are faster so on a shared 2-core machine (the fair comparison). The target of the issue, T = 10,000 and
H = 256 in under 30 s, is judged in the full run.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch

from ..cost import interleaved_times
from ..experiments.progress import progress_steps
from ..rnn import (
    RNN,
    JacobianFactors,
    jacobian_factors,
    log_jacobian_norms,
    log_norms_of_products,
    log_norms_of_products_reference,
    lyapunov_spectrum,
)
from ..rnn._threads import threads_for

F64 = torch.float64
T = TypeVar("T")


TARGET = {"H": 256, "T": 10000, "seconds": 30.0}  # the must: log_jacobian_norms at this size


def _timed(fns: Mapping[str, Callable[[], T]], repeats: int) -> tuple[dict[str, float], dict[str, T]]:
    """(median seconds, last output) per name: interleaved rounds after a warm-up round (none for one round)."""
    outputs: dict[str, T] = {}

    def keeping(name: str, fn: Callable[[], T]) -> Callable[[], None]:
        def call() -> None:
            outputs[name] = fn()
        return call

    times = interleaved_times({name: keeping(name, fn) for name, fn in fns.items()}, rounds=repeats,
                              warmup=1 if repeats > 1 else 0)
    return {name: statistics.median(ts) for name, ts in times.items()}, outputs


def _model(hidden: int, init: str, seed: int = 0) -> RNN:
    torch.manual_seed(seed)
    rnn = RNN(4, hidden).double()
    if init == "orthogonal":
        with torch.no_grad():
            torch.nn.init.orthogonal_(rnn.W)
    return rnn


def _inputs(steps: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, steps, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _autograd_log_norms(rnn: RNN, x: torch.Tensor) -> torch.Tensor:
    h0 = torch.zeros(x.shape[0], rnn.hidden_size, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda s: rnn.forward_reference(x, s)[0], h0, vectorize=True)
    per_seq = torch.stack([jac[i, :, :, i, :] for i in range(x.shape[0])])  # (B, T, H, H)
    return torch.log(torch.linalg.svdvals(per_seq)[..., 0])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |e^{a-b} - 1| of two log-norm tensors; inf where one is finite and the other not (or NaN), NaN when
    no entry is finite in both (nothing compared). Equal infinities (-inf: an exactly zero norm) agree."""
    both = torch.isfinite(a) & torch.isfinite(b)
    if bool(((a != b) & ~both).any()):
        return math.inf
    return float((torch.exp(a[both] - b[both]) - 1).abs().max()) if both.any() else math.nan


#: (H, T, init) rows of log_jacobian_norms; (H, T, k) of lyapunov_spectrum; (H, T) against autograd
FULL: dict[str, list[Any]] = {
    "norms": [(32, 1000, "default"), (64, 1000, "default"), (128, 1000, "default"), (256, 1000, "default"),
              (256, 1000, "orthogonal"), (64, 10000, "default"), (256, 10000, "default")],
    "lyapunov": [(64, 10000, 1), (64, 10000, 8), (256, 10000, 1), (256, 10000, 16)],
    "autograd": [(16, 50), (16, 100), (16, 200), (32, 100), (32, 200)]}
#: H = 128 takes the iterative path (B·H³ > SVD_MAX_WORK), and the orthogonal W its Cholesky proof, as in the full run
QUICK: dict[str, list[Any]] = {
    "norms": [(16, 200, "default"), (64, 200, "default"), (128, 200, "default"), (128, 200, "orthogonal")],
    "lyapunov": [(64, 1000, 1), (64, 1000, 8)],
    "autograd": [(8, 50), (16, 50)]}
REPEATS = 3


def run(quick: bool = False) -> dict:
    """Time the diagnostics over grids of (H, T) and the baselines at small sizes; JSON-able dict."""
    grid = QUICK if quick else FULL
    with progress_steps(sum(map(len, grid.values())), "bench rnn") as advance:
        norms = []
        for hidden, steps, init in grid["norms"]:
            advance(f"log_jacobian_norms, H={hidden}, T={steps}, {init}")
            norms.append(_norm_row(hidden, steps, init))
        lyap = []
        for hidden, steps, k in grid["lyapunov"]:
            advance(f"lyapunov_spectrum, H={hidden}, T={steps}, k={k}")
            rnn, x = _model(hidden, "default"), _inputs(steps)
            t, out = _timed({"ours": functools.partial(lyapunov_spectrum, rnn, x, None, k)}, REPEATS)
            lyap.append({"H": hidden, "T": steps, "k": k, "seconds": t["ours"], "repeats": REPEATS,
                         "lambda_1": float(out["ours"][0, 0])})
        baselines = []
        for hidden, steps in grid["autograd"]:
            advance(f"vs autograd, H={hidden}, T={steps}")
            baselines.append(_autograd_row(hidden, steps))
    result = {"suite": "rnn", "quick": quick, "torch_threads": torch.get_num_threads(),
              "log_jacobian_norms": norms, "lyapunov_spectrum": lyap, "vs_autograd": baselines}
    return {**result, "targets": targets(result)}


def _norm_row(hidden: int, steps: int, init: str) -> dict:
    """log_jacobian_norms at one size against the SVD-per-step reference (up to T = 1000), with the method's counts."""
    rnn, x = _model(hidden, init), _inputs(steps)
    stats: dict = {}
    reps = 1 if hidden**3 * steps > 5e10 else REPEATS  # one run only for the T = 10,000 sizes at H = 256
    factors = jacobian_factors(rnn, x, None)
    fns: dict[str, Callable[[], torch.Tensor | JacobianFactors]] = {
        "ours": functools.partial(log_norms_of_products, factors, stats=stats),
        "trajectory": functools.partial(jacobian_factors, rnn, x, None)}
    if steps <= 1000:  # the SVD-per-step reference: slow but feasible; also gives the error
        fns["reference"] = functools.partial(_one_thread, log_norms_of_products_reference, factors)
    t, outputs = _timed(fns, reps)
    ours = cast(torch.Tensor, outputs["ours"])
    row = {"H": hidden, "T": steps, "init": init, "seconds": t["ours"] + t["trajectory"], "repeats": reps,
           "extensions_per_step": stats["extensions"] / steps,  # of the last call (reset per call)
           "cholesky_proofs": stats["cholesky"], "svd_fallbacks": stats["fallbacks"],
           "rescaled": stats["rescaled"], "log_norm_T": float(ours[0, -1])}
    if "reference" in t:
        row.update(svd_per_step_seconds=t["reference"], speedup_vs_svd_per_step=t["reference"] / row["seconds"],
                   max_rel_err_vs_svd=_rel_err(ours, cast(torch.Tensor, outputs["reference"])))
    return row


def _autograd_row(hidden: int, steps: int) -> dict:
    rnn, x = _model(hidden, "default"), _inputs(steps, batch=2)
    t, out = _timed({"ours": functools.partial(log_jacobian_norms, rnn, x, None),
                     "autograd": functools.partial(_one_thread, _autograd_log_norms, rnn, x)}, REPEATS)
    return {"H": hidden, "T": steps, "B": 2, "ours_seconds": t["ours"], "autograd_seconds": t["autograd"],
            "speedup_vs_autograd": t["autograd"] / t["ours"],
            "max_rel_err_vs_autograd": _rel_err(out["ours"], out["autograd"])}


def _one_thread(fn: Callable[..., T], *args: object) -> T:
    with threads_for(0):
        return fn(*args)


def targets(result: dict) -> list[dict]:
    """The issue's must: log_jacobian_norms at T = 10,000, H = 256 in under 30 s (judged in the full run only)."""
    row = next((r for r in result["log_jacobian_norms"] if r["H"] == TARGET["H"] and r["T"] == TARGET["T"]), None)
    seconds = None if row is None else row["seconds"]
    return [{"target": f"log_jacobian_norms, H={TARGET['H']}, T={TARGET['T']}", "measured": seconds,
             "must": f"< {TARGET['seconds']:g} s", "goal": "-",
             "must_met": None if seconds is None else seconds < TARGET["seconds"], "goal_met": None}]


def _fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def format_table(result: dict) -> str:
    lines = ["log_jacobian_norms (B = 1, float64; seconds include the trajectory)",
             f"{'H':>5} {'T':>6} {'init':>10} {'seconds':>9} {'ext/step':>9} {'proofs':>7} {'SVD s':>8} "
             f"{'speedup':>8} {'rel err':>9}"]
    for r in result["log_jacobian_norms"]:
        lines.append(f"{r['H']:>5} {r['T']:>6} {r['init']:>10} {_fmt(r['seconds']):>9} "
                     f"{_fmt(r['extensions_per_step']):>9} {r.get('cholesky_proofs', '—'):>7} "
                     f"{_fmt(r.get('svd_per_step_seconds')):>8} "
                     f"{_fmt(r.get('speedup_vs_svd_per_step')):>8} {_fmt(r.get('max_rel_err_vs_svd')):>9}")
    lines += ["", "lyapunov_spectrum (QR every step, B = 1)", f"{'H':>5} {'T':>6} {'k':>4} {'seconds':>9} "
              f"{'λ₁':>9}"]
    for r in result["lyapunov_spectrum"]:
        lines.append(f"{r['H']:>5} {r['T']:>6} {r['k']:>4} {_fmt(r['seconds']):>9} {_fmt(r['lambda_1']):>9}")
    lines += ["", "vs autograd Jacobian + SVD (B = 2)", f"{'H':>5} {'T':>6} {'ours s':>9} {'autograd s':>11} "
              f"{'speedup':>8} {'rel err':>9}"]
    for r in result["vs_autograd"]:
        lines.append(f"{r['H']:>5} {r['T']:>6} {_fmt(r['ours_seconds']):>9} {_fmt(r['autograd_seconds']):>11} "
                     f"{_fmt(r['speedup_vs_autograd']):>8} {_fmt(r['max_rel_err_vs_autograd']):>9}")
    lines += ["", f"{'target':40s} {'measured':>9s} {'must':>7s}  status"]
    for tg in result.get("targets", []):
        value = "n/a" if tg["measured"] is None else f"{tg['measured']:.1f} s"
        status = ("not measured (--quick)" if tg["measured"] is None else "met" if tg["must_met"] else "NOT met")
        lines.append(f"{tg['target']:40s} {value:>9s} {tg['must']:>7s}  {status}")
    return "\n".join(lines)
