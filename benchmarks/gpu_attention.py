r"""FAVOR+ (and separable attention) against torch SDPA on a CUDA GPU: forward and forward+backward, causal and
not, float32.

The CPU suite (``theorylab bench attention``) is where the project's targets live; this script records how the
same kernels fare on a GPU, where SDPA runs fused flash/memory-efficient kernels and the causal FAVOR+ kernel reads
one value back to the host per block of chunks (the steep-chunk check). Settings as the CPU suite: B=1, H=8, d=64,
m=256 features. Each contender is timed in interleaved rounds (:func:`theorylab.cost.interleaved_times`, every call
ending in ``torch.cuda.synchronize()``), median of at least 10 rounds after 3 warm-up rounds. Memory is the peak
of ``torch.cuda.max_memory_allocated`` above what was allocated before the call, for a call made after an
untimed one. Read-backs are the synchronising CUDA calls of one call (``torch.cuda.set_sync_debug_mode``): each
waits for the queued kernels, so the kernels' launches stop overlapping their work. Outputs are checked against
the float64 reference at n=256 and against the float64 CPU kernels at n=8192 (see :func:`accuracy`).

    python benchmarks/gpu_attention.py [--json FILE] [--ns 4096 16384 65536]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from theorylab.attention import PositiveRandomFeatures, linear_attention, separable_attention
from theorylab.attention.linear import linear_attention_log_reference
from theorylab.cost import cuda_read_backs, interleaved_times
from theorylab.env import environment

B, H, D, M = 1, 8, 64, 256


def _contenders(causal: bool, fm: torch.nn.Module) -> dict[str, Callable[..., torch.Tensor]]:
    return {"theorylab FAVOR+": lambda q, k, v: linear_attention(q, k, v, fm, causal=causal),
            "torch SDPA (exact)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "theorylab separable": lambda q, k, v: separable_attention(q, k, v, causal=causal)}


def _synced(fn: Callable[[], torch.Tensor], backward: bool) -> Callable[[], None]:
    def call() -> None:
        out = fn()
        if backward:
            out.sum().backward()
        torch.cuda.synchronize()
    return call


def _peak_mib(call: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _read_backs(call: Callable[[], None]) -> int:
    """The read-backs of ``call``: its synchronising calls less the closing ``torch.cuda.synchronize()``'s (none in
    torch's source, which does not report an explicit synchronize; subtracted in case a version does)."""
    return (cuda_read_backs(call) or 0) - (cuda_read_backs(torch.cuda.synchronize) or 0)


def measure(ns: list[int], rounds: int = 10) -> list[dict]:
    dev = torch.device("cuda")
    fm = PositiveRandomFeatures(D, M, seed=0).to(dev)
    rows = []
    for n in ns:
        gen = torch.Generator(device=dev).manual_seed(0)
        for backward in (False, True):
            q, k, v = (torch.randn(B, H, n, D, device=dev, generator=gen).requires_grad_(backward)
                       for _ in range(3))
            for causal in (False, True):
                calls = {name: _synced(lambda f=f, qkv=(q, k, v): f(*qkv), backward)
                         for name, f in _contenders(causal, fm).items()}
                for call in calls.values():  # one-time allocations (cuBLAS workspace, kernels) are not the call's
                    call()
                peaks = {name: _peak_mib(call) for name, call in calls.items()}
                syncs = {name: _read_backs(call) for name, call in calls.items()}
                times = interleaved_times(calls, rounds=rounds, warmup=3)
                for name, ts in times.items():
                    rows.append({"impl": name, "n": n, "causal": causal,
                                 "pass": "forward+backward" if backward else "forward",
                                 "median_ms": statistics.median(ts) * 1e3, "rounds": len(ts),
                                 "peak_mib": peaks[name], "read_backs": syncs[name]})
                for x in (q, k, v):
                    x.grad = None
    return rows


def accuracy(n: int = 256, n_long: int = 8192) -> dict[str, float]:
    """Max |ours on the GPU, float32 - a float64 result| for inputs of unit scale: against the log-domain
    reference at ``n`` (it forms n x n x m), and against our own kernel in float64 on the CPU (with the CPU's
    chunk and block sizes) at ``n_long``, where the GPU runs several chunks per block."""
    dev = torch.device("cuda")
    out = {}
    for length, name in ((n, "reference"), (n_long, "cpu_float64")):
        gen = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(B, H, length, D, device=dev, generator=gen) for _ in range(3))
        fm = PositiveRandomFeatures(D, M, seed=0).to(dev)
        fm64 = PositiveRandomFeatures(D, M, seed=0).double()
        for causal in (False, True):
            ours = linear_attention(q, k, v, fm, causal=causal).double().cpu()
            args = (q.double().cpu(), k.double().cpu(), v.double().cpu(), fm64)
            ref = (linear_attention_log_reference if name == "reference" else linear_attention)(*args, causal=causal)
            out[f"max_abs_err_{'causal' if causal else 'noncausal'}_vs_{name}_n{length}"] = float(
                (ours - ref).abs().max())
            if name == "cpu_float64":  # separable attention with the GPU's chunks against the CPU's
                sep = separable_attention(q, k, v, causal=causal).double().cpu()
                sep_ref = separable_attention(*args[:3], causal=causal)
                out[f"max_abs_err_separable_{'causal' if causal else 'noncausal'}_vs_{name}_n{length}"] = float(
                    (sep - sep_ref).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention.py: no CUDA device (the CPU benchmark is `theorylab bench attention`)")
    rows = measure(args.ns, args.rounds)
    result = {"setting": {"B": B, "H": H, "d": D, "m": M, "dtype": "float32"}, "gpu": torch.cuda.get_device_name(),
              "rows": rows, "accuracy": accuracy(), "environment": environment()}
    print(f"{result['gpu']}, torch {torch.__version__}; B={B} H={H} d={D} m={M} float32; medians of interleaved rounds")
    print(f"{'pass':17s} {'causal':>6s} {'n':>6s} {'FAVOR+ ms':>10s} {'SDPA ms':>9s} {'SDPA/FAVOR+':>12s} "
          f"{'FAVOR+ MiB':>11s} {'SDPA MiB':>9s} {'separable ms':>13s} {'read-backs':>11s}")
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["pass"], row["causal"], row["n"]), {})[row["impl"]] = row
    for (kind, causal, n), by in cells.items():
        ours, sdpa, sep = by["theorylab FAVOR+"], by["torch SDPA (exact)"], by["theorylab separable"]
        print(f"{kind:17s} {str(causal):>6s} {n:6d} {ours['median_ms']:10.2f} {sdpa['median_ms']:9.2f} "
              f"{sdpa['median_ms'] / ours['median_ms']:11.2f}x {ours['peak_mib']:11.1f} {sdpa['peak_mib']:9.1f} "
              f"{sep['median_ms']:13.2f} {ours['read_backs']:5d} {sep['read_backs']:5d}")
    print("accuracy:", {k: f"{v:.1e}" for k, v in result["accuracy"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
