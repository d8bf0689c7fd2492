"""How often causal FAVOR+ reads values back to the host: once per block of chunks for its steep-chunk check, which
also says whether a key is NaN or +inf. On a GPU each read-back waits for the queued kernels; a second one per
block (the non-finite key check on its own) had doubled them (18 instead of 10 at n = 65536 on an H200).

The GPU counts (``torch.cuda.set_sync_debug_mode``) are in ``benchmarks/gpu_attention.py``; here the helpers that
read back are counted, which holds on any device."""

from __future__ import annotations

import pytest
import torch

import theorylab.attention.linear as linear
from theorylab.attention import PositiveRandomFeatures, linear_attention
from theorylab.attention.linear import linear_attention_log_reference

D, M, CHUNK = 4, 16, 8


def _counting(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(linear, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, name, counted)
    return calls


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, n, D, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.fixture
def three_blocks(monkeypatch):
    """CPU sizes with room for two chunks per block: 40 positions are 3 blocks (the last padded)."""
    budget = 2 * (2 * 2 * M * CHUNK)  # two chunks of B·H·max(M, C)·C entries
    monkeypatch.setattr(linear, "_default_sizes", lambda device: (CHUNK, budget, budget))
    return 3


def test_finite_keys_take_one_read_back_per_block(monkeypatch, three_blocks):
    flags, again = _counting(monkeypatch, "_read_flags"), _counting(monkeypatch, "_flagged_chunks")
    q, k, v = _inputs(40)
    fm = PositiveRandomFeatures(D, M, seed=0).double()
    out = linear_attention(q, k, v, fm, causal=True)
    assert len(flags) == three_blocks and not again
    torch.testing.assert_close(out, linear_attention_log_reference(q, k, v, fm, causal=True), atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_costs_its_block_a_second_read_back_and_reaches_only_later_positions(
        monkeypatch, three_blocks, bad):
    flags, again = _counting(monkeypatch, "_read_flags"), _counting(monkeypatch, "_flagged_chunks")
    q, k, v = _inputs(40, seed=1)
    k[:, :, 18:] = k[:, :, 18:] / k[:, :, 18:].norm(dim=-1, keepdim=True) * 40.0  # a steep rise in block 2
    fm = PositiveRandomFeatures(D, M, seed=0).double()
    reference = linear_attention_log_reference(q, k, v, fm, causal=True)
    k[0, 0, 21, 0] = bad  # sequence 0, head 0: block 2 (positions 16..31), the chunk [16, 24)
    out = linear_attention(q, k, v, fm, causal=True)
    assert len(flags) == three_blocks and len(again) == 1
    torch.testing.assert_close(out[0, 0, :21], reference[0, 0, :21], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[1], reference[1], atol=1e-12, rtol=1e-12)  # the other sequence's steep rise
    torch.testing.assert_close(out[0, 1], reference[0, 1], atol=1e-12, rtol=1e-12)


def test_read_flags_returns_the_flagged_chunks_and_the_bad_flag():
    flagged = torch.tensor([False, True, False, True])
    assert linear._read_flags(flagged, torch.tensor(False)) == ([1, 3], False)
    assert linear._read_flags(flagged, torch.tensor(True)) == ([1, 3], True)
    assert linear._read_flags(torch.zeros(0, dtype=torch.bool), torch.tensor(True)) == ([], True)
