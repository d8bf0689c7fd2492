"""``theorylab bench attention``: time and peak memory vs n for FAVOR+ attention (ours, non-causal and causal),
torch SDPA (exact) and performer-pytorch 1.1.4 (when installed: ``pip install 'theorylab[bench]'``), in one run.

Setting of the issue: B=1, H=8, d=64, m=256 features, float32, forward pass under ``torch.no_grad()``; plus
forward+backward of causal attention at n=8192 (ours also with ``recompute=True``, which keeps only each block's
inputs for the backward pass). Every contender gets the same q, k, v.

* time: the median of 3 to 5 calls per contender, timed in interleaved rounds of rotating order after a first
  call under the memory tracker (never timed);
* memory: the extra peak a call adds over the process after setup — the most bytes of tensor storage alive at
  once during the call (``theorylab.cost.PeakMemory``: inputs and imports excluded, exact and reproducible; it
  does not see scratch buffers allocated inside one fused kernel such as SDPA's CPU flash kernel);
* FLOP efficiency: FLOPs per second over the machine's float32 matmul rate measured in the same run (FLOPs
  counted by FlopCounterMode on meta tensors for ours and performer-pytorch; SDPA's nominal 4·B·H·Nq·Nk·d,
  halved when causal).
"""

from __future__ import annotations

import contextlib
import functools
import io
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import PositiveRandomFeatures, linear_attention
from ..cost import PeakMemory, count_flops, interleaved_times
from ..experiments.progress import progress_steps

B, H, D, M = 1, 8, 64, 256
FULL_NS = [1024, 2048, 4096, 8192, 16384]
QUICK_NS = [512, 1024, 2048]
FWD_BWD_N = {False: 8192, True: 1024}  # quick -> n
MIN_ROUNDS, MAX_ROUNDS = 3, 5  # interleaved timing rounds per size: the median of at least 3 calls each
RECOMPUTE = "theorylab FAVOR+ recompute"


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matmul rate (GFLOP/s): best of ``repeats`` (size x size) @ (size x size)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _performer(causal: bool, device: str = "cpu") -> torch.nn.Module | None:
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a note about its CUDA kernel when causal
        return FastAttention(dim_heads=D, nb_features=M, causal=causal).to(device)


def performer_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("performer-pytorch")
    except metadata.PackageNotFoundError:
        return None if _performer(False) is None else "importable (version unknown)"


def contenders(causal: bool, device: str = "cpu"
               ) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(q, k, v) for one masking mode (device "meta": for counting FLOPs without computing)."""
    fm = PositiveRandomFeatures(D, M, seed=0).to(device)
    out: dict[str, Callable] = {
        "theorylab FAVOR+": lambda q, k, v: linear_attention(q, k, v, fm, causal=causal),
        "torch SDPA (exact)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    performer = _performer(causal, device)
    if performer is not None:
        out["performer-pytorch"] = lambda q, k, v: performer(q, k, v)
    return out


def _fwd_bwd_contenders() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The causal contenders, plus ours recomputing its blocks in the backward pass (memory for time)."""
    fm = PositiveRandomFeatures(D, M, seed=0)
    out = contenders(True)
    out[RECOMPUTE] = lambda q, k, v: linear_attention(q, k, v, fm, causal=True, recompute=True)
    return out


def _flops(name: str, n: int, causal: bool) -> float | None:
    if name.startswith("torch SDPA"):
        return 4 * B * H * n * n * D * (0.5 if causal else 1.0)
    q, k, v = (torch.empty(B, H, n, D, device="meta") for _ in range(3))
    try:
        return float(count_flops(contenders(causal, "meta")[name], q, k, v))
    except Exception:  # noqa: BLE001 - a contender that cannot run on meta tensors gets no FLOP count
        return None


def _measure(fns: Mapping[str, Callable[[], Any]], budget_s: float) -> dict[str, tuple[float, int, int]]:
    """name -> (median seconds, timed calls, peak bytes). Each contender's first call runs under PeakMemory (its
    memory; also its warm-up: the tracker's per-op Python hook slows a loop of small ops, so it is never timed),
    then the contenders are timed in interleaved rounds of rotating order (:func:`interleaved_times`): at least
    ``MIN_ROUNDS``, up to ``MAX_ROUNDS`` while the timed seconds are below ``budget_s``."""
    peaks = {}
    for name, fn in fns.items():
        with PeakMemory() as mem:
            fn()
        peaks[name] = mem.peak
    times = interleaved_times(fns, rounds=MIN_ROUNDS, warmup=0, max_rounds=MAX_ROUNDS, budget_s=budget_s)
    return {name: (statistics.median(ts), len(ts), peaks[name]) for name, ts in times.items()}


def _inputs(n: int, seed: int = 0, requires_grad: bool = False, qk_std: float = 1.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    return tuple(x.requires_grad_(requires_grad) for x in (q * qk_std, k * qk_std, v))


def _accuracy(causal: bool, n: int = 1024) -> dict[str, float]:
    """Mean |approximate - exact| / mean |exact| of each contender at a small n (same inputs, same m).

    q, k ~ N(0, 0.35² I) so that |q|²/sqrt(d) ≈ 1: with unit-variance inputs at d = 64 the estimator's variance
    factor e^{|q'+k'|²} is ~e^16 and no feature count of this size estimates softmax attention."""
    q, k, v = _inputs(n, seed=1, qk_std=0.35)
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        scale = float(exact.abs().mean())
        return {name: float((fn(q, k, v) - exact).abs().mean()) / scale
                for name, fn in contenders(causal).items() if not name.startswith("torch SDPA")}


def run(quick: bool = False) -> dict[str, Any]:
    ns = QUICK_NS if quick else FULL_NS
    budget = 2.0 if quick else 6.0
    with progress_steps(2 * len(ns) + 1, "bench attention") as advance:
        return _run(ns, quick, budget, advance)


def _run(ns: list[int], quick: bool, budget: float, advance: Callable[[str], None]) -> dict[str, Any]:
    with PeakMemory():  # its first use imports torch._dynamo: not inside anyone's timing
        torch.zeros(1) + 1
    rate = matmul_gflops()
    rows: list[dict[str, Any]] = []
    for causal in (False, True):
        fns = contenders(causal)
        for n in ns:
            q, k, v = _inputs(n)
            advance(f"{'causal' if causal else 'non-causal'} forward, n={n}")
            calls = {name: functools.partial(fn, q, k, v) for name, fn in fns.items()}
            with torch.no_grad():
                measured = _measure(calls, budget)
            for name, (seconds, timed, peak) in measured.items():
                flops = _flops(name, n, causal)
                rows.append({"impl": name, "causal": causal, "n": n, "pass": "forward", "seconds": seconds,
                             "calls": timed, "peak_mib": peak / 2**20,
                             "gflop": None if flops is None else flops / 1e9})
    # forward + backward, causal
    n_fb = FWD_BWD_N[quick]
    advance(f"causal forward+backward, n={n_fb}")
    q, k, v = _inputs(n_fb, requires_grad=True)

    def fwd_bwd(fn):
        fn(q, k, v).square().mean().backward()
        q.grad = k.grad = v.grad = None

    calls = {name: functools.partial(fwd_bwd, fn) for name, fn in _fwd_bwd_contenders().items()
             if not (name == "performer-pytorch" and quick)}
    for name, (seconds, timed, peak) in _measure(calls, budget).items():
        rows.append({"impl": name, "causal": True, "n": n_fb, "pass": "forward+backward", "seconds": seconds,
                     "calls": timed, "peak_mib": peak / 2**20, "gflop": None})
    # the rate at the start and at the end, the higher one: a start still disturbed by whatever ran before (a
    # clock ramping up, a process ending) had read 124 GFLOP/s against 186 later, and efficiencies above 100%
    rate = max(rate, matmul_gflops())
    for row in rows:
        row["efficiency"] = None if row["gflop"] is None else row["gflop"] / row["seconds"] / rate
    result = {
        "suite": "attention", "setting": {"B": B, "H": H, "d": D, "m": M, "dtype": "float32"},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "performer_pytorch": performer_version(), "matmul_gflops": rate, "quick": quick, "rows": rows,
        "relative_error_vs_exact_n1024": {"non-causal": _accuracy(False), "causal": _accuracy(True)},
    }
    result["targets"] = targets(result)
    return result


def _row(result: dict[str, Any], impl: str, causal: bool, n: int, kind: str = "forward") -> dict | None:
    for r in result["rows"]:
        if r["impl"] == impl and r["causal"] == causal and r["n"] == n and r["pass"] == kind:
            return r
    return None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's must/goal targets at the largest n of the run (they are stated for n=16384)."""
    n = max(r["n"] for r in result["rows"] if r["pass"] == "forward")
    ours, sdpa, perf = "theorylab FAVOR+", "torch SDPA (exact)", "performer-pytorch"
    out = []

    def speedup(causal: bool, other: str) -> float | None:
        a, b = _row(result, ours, causal, n), _row(result, other, causal, n)
        return None if a is None or b is None else b["seconds"] / a["seconds"]

    checks = [
        ("non-causal speed-up vs performer-pytorch", speedup(False, perf), 3.0, 4.0),
        ("non-causal speed-up vs SDPA", speedup(False, sdpa), 10.0, 15.0),
        ("causal speed-up vs performer-pytorch", speedup(True, perf), 20.0, 50.0),
        ("causal speed-up vs SDPA causal", speedup(True, sdpa), 2.5, 4.0),
    ]
    judged = not result.get("quick")  # the targets are stated for n=16384: a --quick run is not judged

    def met(ok: bool | None) -> bool | None:
        return ok if judged else None

    for name, value, must, goal in checks:
        out.append({"target": f"{name} (n={n})", "measured": value, "must": f">= {must}x", "goal": f">= {goal}x",
                    "must_met": met(None if value is None else value >= must),
                    "goal_met": met(None if value is None else value >= goal)})
    a, b = _row(result, ours, True, n), _row(result, sdpa, True, n)
    mem_ratio = a["peak_mib"] / b["peak_mib"] if a and b and b["peak_mib"] > 0 else None
    out.append({"target": f"causal extra memory / SDPA causal's (n={n})", "measured": mem_ratio,
                "must": "<= 2x", "goal": "<= 1x",
                "must_met": met(None if mem_ratio is None else mem_ratio <= 2.0),
                "goal_met": met(None if mem_ratio is None else mem_ratio <= 1.0)})
    n_fb = max(r["n"] for r in result["rows"] if r["pass"] == "forward+backward")
    a, b = _row(result, ours, True, n_fb, "forward+backward"), _row(result, sdpa, True, n_fb, "forward+backward")
    fb = b["seconds"] / a["seconds"] if a and b else None
    out.append({"target": f"causal forward+backward speed-up vs SDPA causal (n={n_fb})", "measured": fb,
                "must": "-", "goal": "> 1x", "must_met": None, "goal_met": met(None if fb is None else fb > 1.0)})
    return out


def format_table(result: dict[str, Any]) -> str:
    s = result["setting"]
    lines = [f"Attention, B={s['B']}, H={s['H']}, d={s['d']}, m={s['m']}, {s['dtype']}; torch {result['torch']}, "
             f"{result['threads']} threads; float32 matmul {result['matmul_gflops']:.0f} GFLOP/s (same run); "
             f"performer-pytorch {result['performer_pytorch'] or 'not installed (skipped)'}"]
    header = f"{'pass':17s} {'causal':6s} {'n':>6s} {'implementation':26s} {'seconds':>9s} {'peak MiB':>9s} " \
             f"{'GFLOP':>8s} {'of matmul':>9s}"
    lines += ["", header, "-" * len(header)]
    for r in result["rows"]:
        eff = "" if r["efficiency"] is None else f"{100 * r['efficiency']:8.0f}%"
        gflop = "" if r["gflop"] is None else f"{r['gflop']:8.1f}"
        lines.append(f"{r['pass']:17s} {'yes' if r['causal'] else 'no':6s} {r['n']:6d} {r['impl']:26s} "
                     f"{r['seconds']:9.3f} {r['peak_mib']:9.1f} {gflop:>8s} {eff:>9s}")
    lines += ["", "relative error vs exact softmax attention at n=1024, q, k ~ N(0, 0.35²) "
                  "(mean |approx - exact| / mean |exact|):"]
    for mode, errs in result["relative_error_vs_exact_n1024"].items():
        lines.append(f"  {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in errs.items()))
    lines += ["", f"{'target':58s} {'measured':>9s} {'must':>7s} {'goal':>7s}  status"]
    for t in result["targets"]:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}x"
        status = ("not measured" if t["measured"] is None else
                  "not judged (--quick: the targets are for the full sizes)" if result.get("quick") else
                  "goal met" if t["goal_met"] else "must met, goal not" if t["must_met"] else
                  "NOT met" if t["must_met"] is False else "goal not met")
        lines.append(f"{t['target']:58s} {value:>9s} {t['must']:>7s} {t['goal']:>7s}  {status}")
    return "\n".join(lines)
