r"""AdamW on a CUDA GPU: ours (the chain, and ``fused=True``; each with the NaN check on and off) against
torch.optim.AdamW (foreach, fused), per step, with the steps queued as a training loop queues them.

The CPU suite (``theorylab bench optim``) is where the project's targets live; this script records what the same
optimizers cost on a GPU. There a step's kernels are queued and the host runs ahead, except where it reads a value
back: the default ``nonfinite="raise"`` (and ``"skip"``) must know on the host whether a gradient holds NaN or ±inf
before it touches anything, which is one read-back per step, and each read-back waits for every kernel queued
before it. So each call here runs ``--steps`` steps in a row and then one ``torch.cuda.synchronize()``, and the
time per step is the call's over ``--steps``: the read-back's cost shows as it would in training. Rounds are
interleaved (:func:`theorylab.cost.interleaved_times`), medians of ``--rounds``. Read-backs are the synchronising
CUDA calls of one step (``torch.cuda.set_sync_debug_mode``), a step after the timed ones and, apart, the first step,
which creates the optimizer's state. The parameter set is the CPU suite's (9,979,904
float32 parameters in 28 tensors; ``--quick``: 0.7M); the gradients stay fixed, so every step does the same work.

``--profile`` splits each step into the host's part and the GPU's: host ms per step (the time to queue
``--steps`` steps, before the synchronize; median of 5 calls), and from ``torch.profiler`` over 5 steps the kernel
launches and the GPU's kernel time per step. A step whose host time is near its time per step is host-bound: the
GPU waits for the host, and a faster kernel does not make it faster.

    python benchmarks/gpu_optim.py [--json FILE] [--steps 20] [--rounds 10] [--quick] [--compile] [--profile]
                                   [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity

from theorylab.bench.optim import FULL_SHAPES, HYPER, QUICK_SHAPES
from theorylab.cost import cuda_read_backs, interleaved_times
from theorylab.env import environment
from theorylab.optim import AdamW


def _params(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    """The same parameters and gradients for every contender (seed 0), on ``device``."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def contenders(shapes: list[tuple[int, ...]], device: torch.device, compiled: bool = False
               ) -> dict[str, torch.optim.Optimizer]:
    ours = {"theorylab AdamW": {}, "theorylab AdamW, nonfinite='skip'": {"nonfinite": "skip"},
            "theorylab AdamW, nonfinite='propagate'": {"nonfinite": "propagate"},
            "theorylab AdamW fused": {"fused": True},
            "theorylab AdamW fused, nonfinite='propagate'": {"fused": True, "nonfinite": "propagate"}}
    opts: dict[str, torch.optim.Optimizer] = {name: AdamW(_params(shapes, device), **HYPER, **kw)
                                              for name, kw in (ours | (COMPILED if compiled else {})).items()}
    opts["torch AdamW foreach"] = torch.optim.AdamW(_params(shapes, device), **HYPER, foreach=True)
    opts["torch AdamW fused"] = torch.optim.AdamW(_params(shapes, device), **HYPER, fused=True)
    return opts


#: with ``--compile``: our chain through ``torch.compile(opt.step)`` (inductor; Triton kernels on a GPU)
COMPILED = {"theorylab AdamW, torch.compile(step)": {},
            "theorylab AdamW, nonfinite='propagate', torch.compile(step)": {"nonfinite": "propagate"}}


def steppers(opts: dict[str, torch.optim.Optimizer]) -> dict[str, Callable[[], object]]:
    """Each contender's step: ``torch.compile(opt.step)`` for the :data:`COMPILED` rows, else ``opt.step``."""
    return {name: torch.compile(opt.step) if name in COMPILED else opt.step for name, opt in opts.items()}


def _steps(step: Callable[[], object], steps: int, device: torch.device) -> Callable[[], None]:
    def call() -> None:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return call


def _read_backs(fn: Callable[[], None], device: torch.device) -> int | None:
    """Calls ``fn`` once; its read-backs where it runs on the GPU, else None (on the CPU of a machine with a GPU,
    torch's count would say 0, as if it had been measured)."""
    if device.type == "cuda":
        return cuda_read_backs(fn)
    fn()
    return None


#: the host calls that launch a kernel (or a CUDA graph), as torch.profiler names them
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def host_ms_per_step(step: Callable[[], object], steps: int, device: torch.device, calls: int = 5) -> float:
    """Median over ``calls`` of the host's time to queue ``steps`` steps (before the synchronize), per step."""
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return statistics.median(times)


def kernel_profile(step: Callable[[], object], device: torch.device, steps: int = 5) -> dict[str, float | None]:
    """Kernel launches and the GPU's kernel time (ms) per step, from torch.profiler over ``steps`` steps; None for
    both off a GPU."""
    if device.type != "cuda":
        return {"kernel_launches_per_step": None, "kernel_ms_per_step": None}
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernel_launches_per_step": launches / steps, "kernel_ms_per_step": kernel_us / steps / 1e3}


def measure(shapes: list[tuple[int, ...]], device: torch.device, steps: int, rounds: int,
            compiled: bool = False, profiled: bool = False) -> list[dict]:
    """One row per contender: median ms per step, its interquartile range, ratios to torch's two, read-backs (and
    with ``profiled`` the host's and the kernels' share, see the module docstring). With ``compiled``, the first
    step of a compiled row also compiles, and its second (warm-up) recompiles once."""
    step = steppers(contenders(shapes, device, compiled))
    first = {name: _read_backs(fn, device) for name, fn in step.items()}  # the step that creates the state
    times = interleaved_times({name: _steps(fn, steps, device) for name, fn in step.items()},
                              rounds=rounds, warmup=2)
    warm = {name: _read_backs(fn, device) for name, fn in step.items()}
    per_step = {name: [t / steps for t in ts] for name, ts in times.items()}
    medians = {name: statistics.median(ts) for name, ts in per_step.items()}
    rows = []
    for name, ts in per_step.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows.append({"optimizer": name, "median_ms_per_step": medians[name] * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3,
                     "vs_torch_foreach": medians[name] / medians["torch AdamW foreach"],
                     "vs_torch_fused": medians[name] / medians["torch AdamW fused"],
                     "read_backs_per_step": warm[name], "read_backs_first_step": first[name]})
        if profiled:
            rows[-1] |= {"host_ms_per_step": host_ms_per_step(step[name], steps, device),
                         **kernel_profile(step[name], device)}
    return rows


def format_table(result: dict) -> str:
    width = max(len(r["optimizer"]) for r in result["rows"])
    lines = [f"{result['device_name']}, torch {result['torch']}: AdamW on {result['parameters']:,} float32 "
             f"parameters in {result['tensors']} tensors; {result['steps']} steps per call, then one synchronize; "
             f"medians of {result['rounds']} interleaved rounds",
             f"{'optimizer':{width}s} {'ms/step':>8s} {'IQR':>6s} {'/foreach':>9s} {'/fused':>7s} "
             f"{'read-backs':>10s} {'(first step)':>12s}"]
    profiled = "host_ms_per_step" in result["rows"][0]
    if profiled:
        lines[-1] += f" {'host ms':>8s} {'launches':>8s} {'kernel ms':>9s}"
    for r in result["rows"]:
        syncs, first = ("n/a" if n is None else str(n) for n in (r["read_backs_per_step"], r["read_backs_first_step"]))
        line = (f"{r['optimizer']:{width}s} {r['median_ms_per_step']:8.3f} {r['iqr_ms']:6.3f} "
                f"{r['vs_torch_foreach']:8.2f}x {r['vs_torch_fused']:6.2f}x {syncs:>10s} {first:>12s}")
        if profiled:
            launches, kernel = r["kernel_launches_per_step"], r["kernel_ms_per_step"]
            line += (f" {r['host_ms_per_step']:8.3f} {'n/a' if launches is None else f'{launches:.1f}':>8s} "
                     f"{'n/a' if kernel is None else f'{kernel:.3f}':>9s}")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call (default 20)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--quick", action="store_true", help="the CPU suite's quick parameter set (0.7M)")
    parser.add_argument("--device", default="cuda", help="default cuda; cpu runs the same code (for tests)")
    parser.add_argument("--compile", action="store_true",
                        help="also our AdamW through torch.compile(opt.step), NaN check on and off (minutes)")
    parser.add_argument("--profile", action="store_true",
                        help="also each step's host time, kernel launches and kernel time (torch.profiler)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be >= 1, got {args.steps} and {args.rounds}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_optim.py: no CUDA device (the CPU benchmark is `theorylab bench optim`)")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    result = {"device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "parameters": sum(torch.Size(s).numel() for s in shapes),
              "tensors": len(shapes), "steps": args.steps, "rounds": args.rounds,
              "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
              "rows": measure(shapes, device, args.steps, args.rounds, args.compile, args.profile),
              "environment": environment()}
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
