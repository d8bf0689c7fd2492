"""``theorylab bench decode``: the cost of generating one token after a context of n, per attention layer.

Autoregressive decoding asks for one new position's output given n earlier ones. Three ways, timed in the same
run on the same inputs (B = 1, H = 8, d = 64, FAVOR+ with m = 256 features, float32, no autograd):

* **FAVOR+, recurrent state**: ``linear_attention(..., state=state)`` on the new position alone, reading the
  (d + 1, m) state per head that the context left (``return_state=True``): constant work per token;
* **SDPA, KV cache**: the new key and value written into a preallocated cache, then
  ``scaled_dot_product_attention`` of the one query over the n + 1 cached keys: work linear in n;
* **FAVOR+, no state**: one causal ``linear_attention`` call over all n + 1 positions, its last output kept —
  what a linear-attention layer costs per token without its recurrent form: also linear in n.

Each time is the median of interleaved rounds of rotating order (:func:`theorylab.cost.interleaved_times`), one
token per contender per round, after a warm-up round. Every timed call starts from cold caches: a 256 MiB buffer is
written before it, untimed. In a model, a layer's next token comes after every other layer has run; and without the
flush the state's time grew with n only because the KV cache read before it (256 MiB at n = 65536) had evicted the
state (0.93 ms there against 0.59 ms at n = 1024; alone, 0.45–0.48 ms at both). A power law fitted to each
contender's times over n gives its growth. Memory per layer is what a token's successors must keep: the state's
(d + 1)·m + m numbers per head against the cache's 2·n·d. The accuracy row decodes 1024 positions token by token
after a prompt of 1024 and compares them, and one float32 causal call, with a float64 call.

No issue set targets for decoding. The one judged here was set after the first measurement, to catch a regression
of the one-position path: the state must be faster than the KV cache at the largest n (65536 in the full run).
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import LinearAttentionState, PositiveRandomFeatures, linear_attention
from ..cost import fit_power_law, interleaved_times
from ..experiments.progress import progress_steps

B, H, D, M = 1, 8, 64, 256
QK_STD = 0.35  # as the accuracy rows of `bench attention`
MAX_NO_STATE = 16384  # the no-state contender is O(n) per token with a large constant: skipped above this n
TARGET_N = 65536  # the must: at this context the state beats the KV cache
FLUSH_BYTES = 256 * 2**20  # written before every timed call: larger than this machine's caches


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = (QK_STD * torch.randn(B, H, n, D, generator=g) for _ in range(2))
    return q, k, torch.randn(B, H, n, D, generator=g)


def _state_step(fm: PositiveRandomFeatures, state: LinearAttentionState, x: torch.Tensor) -> torch.Tensor:
    return linear_attention(x, x, x, fm, causal=True, state=state)


def _cache_step(k_cache: torch.Tensor, v_cache: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    k_cache[:, :, n:n + 1] = x  # the new position's key and value join the cache
    v_cache[:, :, n:n + 1] = x
    return F.scaled_dot_product_attention(x, k_cache[:, :, :n + 1], v_cache[:, :, :n + 1])


def _no_state_step(fm: PositiveRandomFeatures, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return linear_attention(q, k, v, fm, causal=True)[:, :, -1:]


@torch.no_grad()
def _row(n: int, rounds: int) -> dict[str, Any]:
    fm = PositiveRandomFeatures(D, M, seed=0)
    q, k, v = _inputs(n + 1)
    x = q[:, :, n:n + 1].contiguous()  # the new position (its query, key and value alike: only the cost counts)
    _, state = linear_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], fm, causal=True, return_state=True)
    k_cache, v_cache = torch.empty(B, H, n + 1, D), torch.empty(B, H, n + 1, D)
    k_cache[:, :, :n], v_cache[:, :, :n] = k[:, :, :n], v[:, :, :n]
    fns = {"state": functools.partial(_state_step, fm, state, x),
           "kv_cache": functools.partial(_cache_step, k_cache, v_cache, n, x)}
    if n <= MAX_NO_STATE:
        fns["no_state"] = functools.partial(_no_state_step, fm, q, k, v)
    flush = torch.empty(FLUSH_BYTES // 4)
    times = interleaved_times(fns, rounds=rounds, warmup=1, before=flush.zero_)
    row: dict[str, Any] = {"n": n, "rounds": rounds}
    for name, ts in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(ts)
    row["state_bytes"] = (state.kv.numel() + state.ref.numel()) * state.kv.element_size()
    row["kv_cache_bytes"] = 2 * B * H * n * D * k_cache.element_size()
    row["kv_cache_over_state_time"] = row["kv_cache_ms"] / row["state_ms"]
    return row


@torch.no_grad()
def _accuracy(prompt: int = 1024, decoded: int = 1024) -> dict[str, float]:
    """Largest |error| against a float64 causal call over ``decoded`` positions decoded one at a time after a
    ``prompt``, and over the same positions of one float32 call: decoding should add nothing beyond rounding."""
    fm = PositiveRandomFeatures(D, M, seed=0)
    q, k, v = _inputs(prompt + decoded, seed=1)
    exact = linear_attention(q.double(), k.double(), v.double(), fm.double(), causal=True)[:, :, prompt:]
    fm = fm.float()
    one_call = linear_attention(q, k, v, fm, causal=True)[:, :, prompt:]
    _, state = linear_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], fm, causal=True,
                                return_state=True)
    outs = []
    for t in range(prompt, prompt + decoded):
        out, state = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fm, causal=True,
                                      state=state, return_state=True)
        outs.append(out)
    step_by_step = torch.cat(outs, dim=2)
    return {"prompt": prompt, "decoded_positions": decoded,
            "decoded_max_abs_err": float((step_by_step.double() - exact).abs().max()),
            "one_call_max_abs_err": float((one_call.double() - exact).abs().max()),
            "max_abs_output": float(exact.abs().max())}


def run(quick: bool = False) -> dict[str, Any]:
    """Per-token times over a grid of context lengths, their power-law growth, memory and accuracy."""
    ns = [256, 1024, 4096] if quick else [1024, 4096, 16384, TARGET_N]
    rounds = 5 if quick else 15
    rows = []
    with progress_steps(len(ns) + 1, "bench decode") as advance:
        for n in ns:
            advance(f"one token after n={n}")
            rows.append(_row(n, rounds))
        advance("accuracy of decoding")
        accuracy = _accuracy(256, 256) if quick else _accuracy()
    growth = {}
    for name in ("state", "kv_cache", "no_state"):
        pts = [(r["n"], r[f"{name}_ms"]) for r in rows if f"{name}_ms" in r]
        if len(pts) >= 2:
            growth[name] = fit_power_law([p[0] for p in pts], [p[1] for p in pts]).exponent
    result = {"suite": "decode", "quick": quick, "torch_threads": torch.get_num_threads(),
              "shape": {"B": B, "H": H, "d": D, "m": M, "dtype": "float32"}, "rows": rows,
              "exponent_in_n": growth, "state_faster_than_kv_cache_from_n": faster_from(rows),
              "accuracy": accuracy}
    return {**result, "targets": targets(result)}


def faster_from(rows: list[dict[str, Any]]) -> int | None:
    """The smallest measured n from which on (at every larger n measured too) the state beat the KV cache."""
    start = None
    for r in sorted(rows, key=lambda r: r["n"]):
        if r["kv_cache_over_state_time"] > 1:
            start = r["n"] if start is None else start
        else:
            start = None
    return start


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The must: at n = TARGET_N the state's token is faster than the KV cache's (judged in the full run)."""
    row = next((r for r in result["rows"] if r["n"] == TARGET_N), None)
    ratio = None if result["quick"] or row is None else row["kv_cache_over_state_time"]
    return [{"target": f"state vs KV cache at n={TARGET_N}, speed ratio", "measured": ratio, "must": "> 1",
             "goal": "-", "must_met": None if ratio is None else ratio > 1, "goal_met": None}]


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"one decoded token per layer (B={s['B']}, H={s['H']}, d={s['d']}, m={s['m']}, {s['dtype']}): "
             "median ms per token",
             f"{'n':>7} {'FAVOR+ state':>13} {'SDPA KV cache':>14} {'FAVOR+ no state':>16} {'cache/state':>12} "
             f"{'state KiB':>10} {'cache KiB':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['n']:>7} {_fmt(r['state_ms']):>13} {_fmt(r['kv_cache_ms']):>14} "
                     f"{_fmt(r.get('no_state_ms')):>16} {_fmt(r['kv_cache_over_state_time']):>12} "
                     f"{r['state_bytes'] / 1024:>10.0f} {r['kv_cache_bytes'] / 1024:>10.0f}")
    growth = ", ".join(f"{name} n^{_fmt(p, '.2f')}" for name, p in result["exponent_in_n"].items())
    acc = result["accuracy"]
    lines += ["", f"growth of the time per token: {growth}",
              f"the state is faster than the KV cache from n = {result['state_faster_than_kv_cache_from_n'] or '—'} "
              "on (of the n measured)",
              f"accuracy against float64, {acc['decoded_positions']} positions after a prompt of {acc['prompt']}: "
              f"decoded one at a time {acc['decoded_max_abs_err']:.2g}, one float32 call "
              f"{acc['one_call_max_abs_err']:.2g} (outputs up to {acc['max_abs_output']:.2g})",
              "", f"{'target':48s} {'measured':>9s} {'must':>7s}  status"]
    for tg in result["targets"]:
        value = "n/a" if tg["measured"] is None else f"{tg['measured']:.2f}x"
        status = "not judged (--quick)" if tg["measured"] is None else "met" if tg["must_met"] else "NOT met"
        lines.append(f"{tg['target']:48s} {value:>9s} {tg['must']:>7s}  {status}")
    return "\n".join(lines)
