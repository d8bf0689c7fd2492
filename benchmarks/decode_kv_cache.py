"""theorylab's own KVCache (a new cache by concatenation per call) against a preallocated cache written in place
(what `theorylab bench decode` times) and FAVOR+'s recurrent state, per decoded token.

    python benchmarks/decode_kv_cache.py [--contexts 1024 4096 16384]

B = 1, H = 8, d = 64 (as `bench decode`), FAVOR+ with m = 256, one thread, float32, no autograd; each contender
decodes 20 tokens after a context of n; medians of 7 interleaved rounds, in ms per token, warm caches. The
library's cache copies its 2·n·d numbers per head at every token (it is immutable: an old cache stays valid for
beam search and branching), so its cost grows faster with n than the preallocated cache's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from theorylab.attention import KVCache, PositiveRandomFeatures, linear_attention
from theorylab.attention.exact import cached_softmax_attention  # what MultiheadAttention(kind="softmax") calls
from theorylab.cost import interleaved_times

B, H, D, M, TOKENS = 1, 8, 64, 256, 20


@torch.no_grad()
def _contenders(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    keys, values = 0.35 * torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    new = 0.35 * torch.randn(TOKENS, B, H, 1, D, generator=g)
    k_buf, v_buf = torch.empty(B, H, n + TOKENS, D), torch.empty(B, H, n + TOKENS, D)
    k_buf[:, :, :n], v_buf[:, :, :n] = keys, values
    fm = PositiveRandomFeatures(D, M, seed=0)
    _, state = linear_attention(keys, keys, values, fm, causal=True, return_state=True)

    @torch.no_grad()
    def library() -> None:
        cache = KVCache(keys, values)
        for x in new:
            _, cache = cached_softmax_attention(x, x, x, cache)

    @torch.no_grad()
    def preallocated() -> None:
        for i, x in enumerate(new):
            end = n + i + 1
            k_buf[:, :, end - 1:end], v_buf[:, :, end - 1:end] = x, x
            F.scaled_dot_product_attention(x, k_buf[:, :, :end], v_buf[:, :, :end])

    @torch.no_grad()
    def recurrent() -> None:
        s = state
        for x in new:
            _, s = linear_attention(x, x, x, fm, causal=True, state=s, return_state=True)

    return {"theorylab KVCache": library, "preallocated cache": preallocated, "FAVOR+ state": recurrent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ms per token (B={B}, H={H}, d={D}, m={M}, one thread)")
    for n in args.contexts:
        times = interleaved_times(_contenders(n), rounds=7, warmup=1)
        medians = {name: 1e3 * sorted(ts)[len(ts) // 2] / TOKENS for name, ts in times.items()}
        print(f"n = {n:6d}: " + ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()))


if __name__ == "__main__":
    main()
