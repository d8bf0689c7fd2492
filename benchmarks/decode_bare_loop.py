"""One decoded token of `MultiheadAttention(128, 4, kind="linear", causal=True)` through its state, against a bare
recurrence S += φ(k)vᵀ, z += φ(k) written with the same projections, and against kind "softmax" with a KVCache.

    python benchmarks/decode_bare_loop.py [--contexts 128 1024 4096]

B = 1, one thread, float32, no autograd; medians of 7 interleaved rounds of 200 tokens, in µs per token. The
library's step makes about 40 tensor operations (the running maximum, padding, the guarded normaliser) against the
bare loop's 15: at this size that count, not the arithmetic, sets the cost (docs/attention.md, decoding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from theorylab.attention import MultiheadAttention

E, H = 128, 4


def _per_token_us(step, tokens: int = 200) -> float:
    start = time.perf_counter()
    step(tokens)
    return (time.perf_counter() - start) / tokens * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    linear = MultiheadAttention(E, H, kind="linear", causal=True).eval()
    softmax = MultiheadAttention(E, H, kind="softmax", causal=True).eval()
    token = torch.randn(1, 1, E)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, 1, H, E // H).transpose(1, 2)

    def phi(t: torch.Tensor) -> torch.Tensor:
        return F.elu(t) + 1

    print(f"{'context':>8s} {'library':>9s} {'bare loop':>10s} {'ratio':>6s} {'KV cache':>9s}  (µs per token)")
    with torch.no_grad():
        for n in args.contexts:
            prompt = torch.randn(1, n, E)
            _, state = linear(prompt, return_state=True)
            _, cache = softmax(prompt, return_state=True)
            S, z = torch.zeros(1, H, E // H, E // H), torch.zeros(1, H, E // H)

            def library(count: int, state: object = state) -> None:
                s = state
                for _ in range(count):
                    _, s = linear(token, state=s, return_state=True)

            def bare(count: int, S: torch.Tensor = S, z: torch.Tensor = z) -> None:
                for _ in range(count):
                    q, k, v = (heads(p(token)) for p in (linear.q_proj, linear.k_proj, linear.v_proj))
                    fq, fk = phi(q), phi(k)
                    S, z = S + fk.mT @ v, z + fk[:, :, 0]
                    out = (fq @ S) / (fq[:, :, 0] * z).sum(-1)[..., None, None]
                    linear.out_proj(out.transpose(1, 2).reshape(1, 1, E))

            def kv_cache(count: int, cache: object = cache) -> None:  # the cache grows a token a call, as in use
                c = cache
                for _ in range(count):
                    _, c = softmax(token, state=c, return_state=True)

            steps = {"library": library, "bare": bare, "kv": kv_cache}
            for step in steps.values():
                step(20)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(7):
                for name, step in steps.items():
                    times[name].append(_per_token_us(step))
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{n:8d} {med['library']:9.0f} {med['bare']:10.0f} {med['library'] / med['bare']:5.2f}x "
                  f"{med['kv']:9.0f}")


if __name__ == "__main__":
    main()
