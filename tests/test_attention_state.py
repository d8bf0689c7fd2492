"""Incremental decoding: a sequence fed in pieces (a prompt, then one token at a time) through ``state=`` /
``return_state=True`` gives the outputs and gradients of one call on the whole sequence. Linear and separable
attention carry a recurrent state of fixed size, exact attention (in ``MultiheadAttention``) a KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from theorylab.attention import (
    EluFeatures,
    KVCache,
    LinearAttentionState,
    MultiheadAttention,
    PositiveRandomFeatures,
    ReluFeatures,
    TrigRandomFeatures,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.attention import linear as linear_module
from theorylab.attention.exact import cached_softmax_attention, softmax_attention_reference
from theorylab.attention.linear import linear_attention_log_reference, linear_attention_reference
from theorylab.attention.separable import separable_attention_reference

F64 = torch.float64
D = 8


def _map(name: str) -> nn.Module:
    if name == "favor":
        return PositiveRandomFeatures(D, 16, seed=0).double()
    if name == "trig":
        return TrigRandomFeatures(D, 16, seed=0).double()
    return {"elu": EluFeatures, "relu": ReluFeatures}[name](D)


def _qkv(B: int, H: int, N: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, H, N, D, generator=g, dtype=F64)).to(dtype).requires_grad_() for _ in range(3)]


def _in_pieces(q, k, v, fm, cuts, pad=None, **kwargs):
    """The outputs of the pieces [cuts[i], cuts[i+1]) fed one after another, concatenated; and the last state."""
    outs, state = [], None
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece_pad = None if pad is None else pad[:, a:b]
        out, state = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], fm, causal=True, state=state,
                                      key_padding_mask=piece_pad, return_state=True, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return list(torch.autograd.grad((out * w).sum(), inputs))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["favor", "elu", "relu", "trig"]), N=st.integers(1, 90),
       cuts=st.lists(st.integers(0, 90), max_size=5), chunk=st.sampled_from([None, 1, 7, 16]),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_pieces_equal_one_call_outputs_and_gradients(name, N, cuts, chunk, padded, seed):
    fm = _map(name)
    B, H = 2, 2
    q, k, v = _qkv(B, H, N, seed, scale=0.5 if name == "trig" else 1.0)  # trig: a well-conditioned normaliser
    pad = None
    if padded:
        pad = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.3
    full = linear_attention(q, k, v, fm, causal=True, key_padding_mask=pad, chunk_size=chunk)
    points = sorted({0, N, *(c for c in cuts if c <= N)})
    pieces, state = _in_pieces(q, k, v, fm, points, pad, chunk_size=chunk)
    assert state.length == N
    tol = 1e-9 if name == "trig" else 1e-12
    torch.testing.assert_close(pieces, full, atol=tol, rtol=tol)
    for g_full, g_pieces in zip(_grads(full, [q, k, v]), _grads(pieces, [q, k, v]), strict=True):
        torch.testing.assert_close(g_pieces, g_full, atol=100 * tol, rtol=100 * tol)


@pytest.mark.parametrize("name", ["favor", "elu", "trig"])
def test_token_by_token_decoding_equals_the_reference(name):
    fm = _map(name)
    q, k, v = _qkv(2, 3, 40, seed=1, scale=0.5)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 5:9] = True  # padded keys in the middle of the stream are skipped, as in one call
    prompt = 17
    pieces, state = _in_pieces(q, k, v, fm, [0, prompt, *range(prompt + 1, 41)], pad)
    reference = linear_attention_reference(q, k, v, fm, causal=True, key_padding_mask=pad)
    torch.testing.assert_close(pieces, reference, atol=1e-10, rtol=1e-10)
    assert state.kv.shape == (2, 3, D + 1, fm(q[:, :, :1]).shape[-1]) and state.length == 40


def test_favor_state_stays_stable_across_a_steep_rise_between_pieces():
    """Keys of norm ~110 after ordinary ones raise the running maximum by thousands in log space; the state is
    rescaled, never overflowed, and the pieces equal the log-domain reference."""
    fm = PositiveRandomFeatures(D, 16, seed=3).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 48, seed=2))
    k[:, :, 20:] *= 40.0
    q[:, :, 20:] *= 40.0
    reference = linear_attention_log_reference(q, k, v, fm, causal=True)
    for cuts in ([0, 20, 48], [0, 19, 20, 21, 48], [0, *range(1, 49)]):
        pieces, state = _in_pieces(q, k, v, fm, cuts)
        torch.testing.assert_close(pieces, reference, atol=1e-9, rtol=1e-9)
        assert torch.isfinite(state.kv).all() and (state.kv[:, :, -1] <= 48).all()  # relative to ref: bounded


def test_a_piece_that_needs_float64_widens_the_state_for_good():
    fm = PositiveRandomFeatures(D, 16, seed=0)
    q, k, v = (x.detach() for x in _qkv(1, 2, 30, seed=4, dtype=torch.float32))
    q[:, :, 10:20] *= 300.0  # scale·|x|² beyond what float32 rounds finely enough: computed in float64
    k[:, :, 10:20] *= 300.0
    _, state = _in_pieces(q, k, v, fm, [0, 10])
    assert state.kv.dtype == torch.float32 and state.ref.dtype == torch.float32
    out2, state = linear_attention(q[:, :, 10:20], k[:, :, 10:20], v[:, :, 10:20], fm, causal=True, state=state,
                                   return_state=True)
    assert out2.dtype == torch.float32 and state.kv.dtype == F64
    out3, state = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], fm, causal=True, state=state,
                                   return_state=True)
    assert out3.dtype == torch.float32 and state.kv.dtype == F64  # ordinary inputs after: still float64
    reference = linear_attention_log_reference(q.double(), k.double(), v.double(), fm.double(), causal=True)
    torch.testing.assert_close(torch.cat([out2, out3], 2).double(), reference[:, :, 10:], atol=2e-5, rtol=2e-5)


def test_a_fresh_state_in_a_wider_dtype_keeps_its_no_key_seen_marker(monkeypatch):
    """A state made before any visible key holds float32's lowest value as its reference; widened to float64 it
    must become float64's lowest, or the next piece would see a huge rise and take the slow exact path."""
    def per_query(*args, **kwargs):
        raise AssertionError("a chunk was redone per query")

    monkeypatch.setattr(linear_module, "_chunk_per_query", per_query)
    fm = PositiveRandomFeatures(D, 16, seed=0)
    q, k, v = (x.detach() for x in _qkv(1, 1, 12, seed=5, dtype=torch.float32))
    pad = torch.ones(1, 4, dtype=torch.bool)
    _, state = linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], fm, causal=True, key_padding_mask=pad,
                                return_state=True)
    assert (state.ref == -torch.finfo(torch.float32).max).all()
    big = 300.0 * torch.ones(1, 1, 8, D)  # needs float64; its first two keys are padded too
    pad = torch.tensor([[True, True] + [False] * 6])
    out, state = linear_attention(big, big, v[:, :, 4:], fm, causal=True, state=state, key_padding_mask=pad,
                                  return_state=True)
    assert state.kv.dtype == F64 and torch.isfinite(out).all()
    expected = v[:, :, 6:].cumsum(2) / torch.arange(1, 7).view(1, 1, 6, 1)  # equal keys: running mean of values
    torch.testing.assert_close(out[:, :, 2:], expected, atol=1e-5, rtol=1e-5)
    assert (out[:, :, :2] == 0).all()  # no visible key yet


def test_half_precision_pieces_keep_a_float32_state():
    fm = PositiveRandomFeatures(D, 16, seed=0)
    q, k, v = (x.detach() for x in _qkv(1, 2, 20, seed=6, dtype=torch.bfloat16))
    pieces, state = _in_pieces(q, k, v, fm, [0, 7, 8, 20])
    assert pieces.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    whole = linear_attention(q, k, v, fm, causal=True)
    torch.testing.assert_close(pieces.float(), whole.float(), atol=1e-2, rtol=1e-2)


def test_recompute_gives_the_same_gradients_through_pieces():
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = _qkv(1, 2, 200, seed=7)
    plain, _ = _in_pieces(q, k, v, fm, [0, 150, 200], chunk_size=8)
    again, _ = _in_pieces(q, k, v, fm, [0, 150, 200], chunk_size=8, recompute=True)
    for a, b in zip(_grads(plain, [q, k, v]), _grads(again, [q, k, v]), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_given_state_is_not_changed_and_can_be_reused():
    fm = EluFeatures(D)
    q, k, v = (x.detach() for x in _qkv(1, 2, 30, seed=8))
    with torch.no_grad():  # where the non-causal kernel updates its own state in place
        _, state = _in_pieces(q, k, v, fm, [0, 20])
        before = state.kv.clone(), state.ref.clone()
        a = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], fm, causal=True, state=state)
        b = linear_attention(q[:, :, 20:21], k[:, :, 20:21], v[:, :, 20:21], fm, causal=True, state=state)
    assert torch.equal(state.kv, before[0]) and torch.equal(state.ref, before[1])
    torch.testing.assert_close(b, a[:, :, :1], atol=1e-12, rtol=1e-12)


def test_detach_cuts_the_history_as_in_truncated_backpropagation():
    fm = EluFeatures(D)
    q, k, v = _qkv(1, 1, 20, seed=9)
    _, state = linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], fm, causal=True, return_state=True)
    assert state.kv.grad_fn is not None and state.detach().kv.grad_fn is None
    out = linear_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], fm, causal=True, state=state.detach())
    out.sum().backward()
    assert k.grad is not None and (k.grad[:, :, :10] == 0).all() and (k.grad[:, :, 10:] != 0).any()


def test_empty_pieces_pass_the_state_on():
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = _qkv(2, 2, 10, seed=10)
    out, state = linear_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], fm, causal=True, return_state=True)
    assert out.shape == (2, 2, 0, D) and state.length == 0 and state.kv.shape == (2, 2, D + 1, 16)
    pieces, state = _in_pieces(q, k, v, fm, [0, 0, 4, 4, 10])
    torch.testing.assert_close(pieces, linear_attention(q, k, v, fm, causal=True), atol=1e-12, rtol=1e-12)


def test_a_batch_can_be_reordered_as_in_beam_search():
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(3, 2, 12, seed=11))
    _, state = _in_pieces(q, k, v, fm, [0, 8])
    order = torch.tensor([2, 0, 2])
    beams = dataclasses.replace(state, kv=state.kv[order], ref=state.ref[order])
    out = linear_attention(q[order, :, 8:], k[order, :, 8:], v[order, :, 8:], fm, causal=True, state=beams)
    torch.testing.assert_close(out, linear_attention(q, k, v, fm, causal=True)[order, :, 8:], atol=1e-12,
                               rtol=1e-12)


def test_a_trained_map_continues_its_state_after_an_optimizer_step():
    """Parameters are not part of a state's identity: truncated BPTT carries states across updates."""

    class Learned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.eye(D, dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.elu(x @ self.w) + 1

    fm = Learned()
    q, k, v = (x.detach() for x in _qkv(1, 1, 8, seed=12))
    _, state = linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], fm, causal=True, return_state=True)
    with torch.no_grad():
        fm.w.mul_(1.01)
    out = linear_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], fm, causal=True, state=state.detach())
    assert torch.isfinite(out).all()


def _state(fm: nn.Module, B: int = 1, H: int = 2, N: int = 6, dtype: torch.dtype = F64) -> LinearAttentionState:
    q, k, v = (x.detach().to(dtype) for x in _qkv(B, H, N, seed=13))
    return linear_attention(q, k, v, fm, causal=True, return_state=True)[1]


def test_bad_states_and_flags_are_refused_with_the_reason():
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=14))
    state = _state(fm)
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, k, v, fm, state=state)
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, k, v, fm, return_state=True)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        linear_attention(q, k, v, fm, causal=True, return_state=1)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention(q, k, v, fm, causal=True, state=(state.kv, state.ref))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"expected \(3, 2, 9, M\)"):
        linear_attention(q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), fm,
                         causal=True, state=state)
    with pytest.raises(ValueError, match=r"expected \(1, 2, 5, M\)"):
        linear_attention(q, k, v[..., :4], fm, causal=True, state=state)
    meta = dataclasses.replace(state, kv=state.kv.to("meta"), ref=state.ref.to("meta"))
    with pytest.raises(ValueError, match="on meta"):
        linear_attention(q, k, v, fm, causal=True, state=meta)


@pytest.mark.parametrize("change", ["redraw", "other map", "load_state_dict", "to"])
def test_a_state_is_refused_once_its_features_changed(change):
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=15))
    state = _state(fm)
    if change == "redraw":
        fm.redraw()
    elif change == "other map":
        fm = PositiveRandomFeatures(D, 16, seed=0).double()  # equal features, but not the map that made it
    elif change == "load_state_dict":
        fm.load_state_dict(PositiveRandomFeatures(D, 16, seed=1).double().state_dict())
    else:
        fm = fm.float().double()
    with pytest.raises(ValueError, match="other features"):
        linear_attention(q, k, v, fm, causal=True, state=state)


def _decode(mha: MultiheadAttention, x: torch.Tensor, prompt: int) -> tuple[torch.Tensor, LinearAttentionState]:
    """The module's outputs for x (B, N, E): the prompt in one call, then one position at a time."""
    out, state = mha(x[:, :prompt], return_state=True)
    outs = [out]
    for t in range(prompt, x.shape[1]):
        out, state = mha(x[:, t:t + 1], state=state, return_state=True)
        outs.append(out)
    return torch.cat(outs, 1), state


def test_multihead_decoding_one_token_at_a_time_equals_one_call():
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 2, kind="favor", causal=True, num_features=32, seed=0).double()
    x = torch.randn(2, 25, 16, dtype=F64)
    decoded, state = _decode(mha, x, 10)
    torch.testing.assert_close(decoded, mha(x), atol=1e-12, rtol=1e-12)
    assert isinstance(state, LinearAttentionState) and state.length == 25


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear", "favor"])
def test_multihead_decodes_every_kind_in_pieces_with_padding(kind):
    torch.manual_seed(1)
    mha = MultiheadAttention(16, 2, kind=kind, causal=True, num_features=32, seed=0).double()
    x = torch.randn(2, 25, 16, dtype=F64)
    pad = torch.zeros(2, 25, dtype=torch.bool)
    pad[1, 3:6] = True
    pad[0, 7:9] = True  # a whole piece of padding
    outs, state = [], None
    for a, b in zip([0, 7, 9, 10, 16], [7, 9, 10, 16, 25], strict=True):
        out, state = mha(x[:, a:b], key_padding_mask=pad[:, a:b], state=state, return_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), mha(x, key_padding_mask=pad), atol=1e-12, rtol=1e-12)
    assert isinstance(state, KVCache if kind == "softmax" else LinearAttentionState) and state.length == 25


def test_a_state_goes_only_to_the_kind_that_made_it():
    x = torch.randn(1, 4, 16, dtype=F64)
    made = {kind: MultiheadAttention(16, 2, kind=kind, causal=True, num_features=8).double()
            for kind in ("softmax", "separable", "favor")}
    states = {kind: mha(x, return_state=True)[1] for kind, mha in made.items()}
    with pytest.raises(ValueError, match="made by linear_attention"):
        made["separable"](x, state=states["favor"])
    with pytest.raises(ValueError, match="made by separable_attention"):
        made["favor"](x, state=states["separable"])
    with pytest.raises(TypeError, match="must be a LinearAttentionState"):
        made["favor"](x, state=states["softmax"])
    with pytest.raises(TypeError, match="the state of exact attention is a KVCache"):
        made["softmax"](x, state=states["separable"])


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear"])
def test_multihead_state_needs_causal_attention_and_a_bool(kind):
    mha = MultiheadAttention(16, 2, kind=kind)
    with pytest.raises(ValueError, match="causal"):
        mha(torch.randn(1, 3, 16), return_state=True)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        mha(torch.randn(1, 3, 16), causal=True, return_state=1)  # type: ignore[call-overload]
    out, state = mha(torch.randn(1, 3, 16), causal=True, return_state=True)
    assert out.shape == (1, 3, 16) and state.length == 3


# ------------------------------------------------------------------------------------------ separable attention
@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 90), cuts=st.lists(st.integers(0, 90), max_size=5), chunk=st.sampled_from([None, 1, 7]),
       padded=st.booleans(), steep=st.booleans(), seed=st.integers(0, 2**16))
def test_separable_pieces_equal_one_call_outputs_and_gradients(N, cuts, chunk, padded, steep, seed):
    q, k, v = _qkv(2, 2, N, seed)
    if steep:  # keys far above the earlier ones: chunks redone per query, references that rise between pieces
        k = (k.detach() * torch.where(torch.arange(N) >= N // 2, 40.0, 1.0).view(1, 1, N, 1)).requires_grad_()
    pad = torch.rand(2, N, generator=torch.Generator().manual_seed(seed)) < 0.3 if padded else None
    full = separable_attention(q, k, v, causal=True, key_padding_mask=pad, chunk_size=chunk)
    outs, state = [], None
    points = sorted({0, N, *(c for c in cuts if c <= N)})
    for a, b in zip(points, points[1:], strict=False):
        out, state = separable_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, state=state,
                                         key_padding_mask=None if pad is None else pad[:, a:b], chunk_size=chunk,
                                         return_state=True)
        outs.append(out)
    pieces = torch.cat(outs, dim=2)
    assert state.length == N and state.kind == "separable" and state.kv.shape == (2, 2, D + 1, D)
    torch.testing.assert_close(pieces, full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full, separable_attention_reference(q, k, v, causal=True, key_padding_mask=pad),
                               atol=1e-12, rtol=1e-12)
    for g_full, g_pieces in zip(_grads(full, [q, k, v]), _grads(pieces, [q, k, v]), strict=True):
        torch.testing.assert_close(g_pieces, g_full, atol=1e-10, rtol=1e-10)


def test_separable_state_errors_name_the_problem():
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=21))
    _, state = separable_attention(q, k, v, causal=True, return_state=True)
    with pytest.raises(ValueError, match="causal attention over as many queries as keys"):
        separable_attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="as many queries as keys"):
        separable_attention(q, k[:, :, :3], v[:, :, :3], causal=True, state=state)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        separable_attention(q, k, v, causal=True, return_state="yes")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"expected \(1, 2, 5, M\)"):
        separable_attention(q, k, v[..., :4], causal=True, state=state)
    wider = dataclasses.replace(state, kv=torch.zeros(1, 2, D + 1, D + 1, dtype=F64))
    with pytest.raises(ValueError, match="holds 9 feature columns"):
        separable_attention(q, k, v, causal=True, state=wider)
    empty = torch.zeros(1, 2, 0, D, dtype=F64)
    out, after = separable_attention(empty, empty, empty, causal=True, state=state, return_state=True)
    assert out.shape == (1, 2, 0, D) and after.length == 4 and torch.equal(after.kv, state.kv)


# ------------------------------------------------------------------------------------------------- the KV cache
def test_kv_cache_pieces_equal_one_causal_call_with_padding_and_a_fully_padded_prefix():
    q, k, v = (x.detach() for x in _qkv(2, 2, 30, seed=22))
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[0, :12] = True  # every key of the first pieces padded: those queries see nothing (zeros, never NaN)
    pad[1, 20:25] = True
    whole = softmax_attention(q, k, v, causal=True, key_padding_mask=pad)
    outs, cache = [], None
    for a, b in zip([0, 5, 12, 13, 21], [5, 12, 13, 21, 30], strict=True):
        out, cache = cached_softmax_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], cache,
                                              key_padding_mask=pad[:, a:b])
        outs.append(out)
    pieces = torch.cat(outs, dim=2)
    torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=1e-12)
    assert (pieces[0, :, :12] == 0).all() and cache.length == 30 and torch.equal(cache.padding, pad)
    torch.testing.assert_close(pieces, softmax_attention_reference(q, k, v, causal=True, key_padding_mask=pad),
                               atol=1e-12, rtol=1e-12)


def test_kv_cache_errors_name_the_problem():
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=23))
    _, cache = cached_softmax_attention(q, k, v, None)
    with pytest.raises(ValueError, match="as many new queries as keys"):
        cached_softmax_attention(q, k[:, :, :3], v[:, :, :3], cache)
    with pytest.raises(ValueError, match="does not fit this call"):
        cached_softmax_attention(q[..., :4], k[..., :4], v, cache)
    with pytest.raises(TypeError, match="is a KVCache"):
        cached_softmax_attention(q, k, v, (cache.keys, cache.values))  # type: ignore[arg-type]
    assert cache.detach().keys.grad_fn is None and cache.length == 4


def test_a_saved_state_loads_and_continues(tmp_path):
    """torch.save / torch.load (pickle): weak references do not survive, so the loaded state is not checked
    against the map, which is reloaded with it."""
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 10, seed=16))
    _, state = _in_pieces(q, k, v, fm, [0, 6])
    torch.save({"state": state, "map": fm.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=False)
    fresh = PositiveRandomFeatures(D, 16, seed=5).double()
    fresh.load_state_dict(saved["map"])
    out = linear_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], fresh, causal=True, state=saved["state"])
    torch.testing.assert_close(out, linear_attention(q, k, v, fm, causal=True)[:, :, 6:], atol=1e-12, rtol=1e-12)


def test_one_position_takes_the_step_path_not_the_chunks(monkeypatch):
    """Decoding a token costs a dozen small ops: the chunked kernel's bookkeeping (~10x more at one position) is
    not run (the benchmark, ``theorylab bench decode``, measures the time)."""
    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 9, seed=17))
    expected = linear_attention(q, k, v, fm, causal=True)

    def chunked(*args, **kwargs):
        raise AssertionError("one position went through the chunked kernel")

    _, state = linear_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], fm, causal=True, return_state=True)
    monkeypatch.setattr(linear_module, "_causal", chunked)
    out = linear_attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], fm, causal=True, state=state)
    torch.testing.assert_close(out, expected[:, :, 8:], atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- bench decode
def test_bench_decode_quick_writes_its_table_and_json(tmp_path, capsys):
    import json

    from theorylab.cli import main

    assert main(["bench", "decode", "--quick", "--json", str(tmp_path / "d.json")]) == 0
    printed = capsys.readouterr().out
    assert "FAVOR+ state" in printed and "not judged (--quick)" in printed
    result = json.loads((tmp_path / "d.json").read_text())
    rows = result["rows"]
    assert [r["n"] for r in rows] == [256, 1024, 4096] and all(r["state_ms"] > 0 for r in rows)
    # the memory a token's successors keep: constant for the state, 2·n·d per head for the cache
    assert len({r["state_bytes"] for r in rows}) == 1 and rows[0]["state_bytes"] == 8 * (65 * 256 + 256) * 4
    assert [r["kv_cache_bytes"] for r in rows] == [2 * 8 * n * 64 * 4 for n in (256, 1024, 4096)]
    acc = result["accuracy"]
    assert acc["decoded_max_abs_err"] < 1e-5 and acc["one_call_max_abs_err"] < 1e-5 and "environment" in result


def test_bench_decode_judges_its_must_at_the_largest_context():
    from theorylab.bench import decode

    def rows(*ratios):
        return [{"n": n, "kv_cache_over_state_time": r} for n, r in zip((1024, 4096, 16384, 65536), ratios,
                                                                          strict=False)]

    [target] = decode.targets({"quick": False, "rows": rows(0.4, 0.9, 3.0, 0.8)})
    assert target["measured"] == 0.8 and target["must_met"] is False
    [target] = decode.targets({"quick": False, "rows": rows(0.4, 0.9, 3.0, 12.0)})
    assert target["must_met"] is True
    [target] = decode.targets({"quick": True, "rows": rows(0.4, 0.9, 3.0, 12.0)})
    assert target["measured"] is None and target["must_met"] is None
    # "from n on": a win at a small n followed by a loss is not a crossover
    assert decode.faster_from(rows(1.2, 0.9, 3.0, 12.0)) == 16384
    assert decode.faster_from(rows(1.2, 1.1, 3.0, 12.0)) == 1024
    assert decode.faster_from(rows(0.4, 0.9, 3.0, 0.9)) is None


# ------------------------------------------------------------------------------ found by the review of the feature
def test_a_map_built_under_inference_mode_decodes_and_is_still_checked():
    """Inference tensors have no version counter (reading it raised RuntimeError): their values are summed."""
    x = torch.randn(1, 12, 16, dtype=F64)
    with torch.inference_mode():
        mha = MultiheadAttention(16, 2, kind="favor", causal=True, num_features=32, seed=0).double()
        decoded, state = _decode(mha, x, 8)
        torch.testing.assert_close(decoded, mha(x), atol=1e-12, rtol=1e-12)
        mha.redraw_features()
        with pytest.raises(ValueError, match="other features"):
            mha(x[:, :1], state=state)


@pytest.mark.parametrize("name", ["favor", "trig"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_reaches_only_the_positions_that_see_it(name, bad):
    """A chunk's reference is the largest key log-scale in it: a NaN or +inf key had set it for the whole chunk,
    so the positions before that key (in one call; not in pieces) were NaN, or silently 0 for trigonometric
    features (a NaN normaliser was divided as a zero one)."""
    fm = _map(name)
    q, k, v = (x.detach() for x in _qkv(1, 2, 20, seed=18, scale=0.5))
    clean = linear_attention(q, k, v, fm, causal=True)
    k[0, 1, 10, 0] = bad
    one = linear_attention(q, k, v, fm, causal=True)
    torch.testing.assert_close(one[:, :, :10], clean[:, :, :10], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(one[:, 0], clean[:, 0], atol=1e-12, rtol=1e-12)  # the other head
    assert one[:, 1, 10:].isnan().all()  # from the key on: NaN, as exact attention gives, never a silent 0
    pieces, _ = _in_pieces(q, k, v, fm, [0, *range(1, 21)])
    torch.testing.assert_close(pieces, one, atol=1e-12, rtol=1e-12, equal_nan=True)


def test_a_copied_state_still_belongs_to_its_map():
    import copy

    fm = PositiveRandomFeatures(D, 16, seed=0).double()
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=19))
    state = _state(fm)
    twin_map, twin_state = copy.deepcopy((fm, state))
    fm.redraw()
    for copied in (copy.copy(state), copy.deepcopy(state)):  # a deepcopy had matched any map
        with pytest.raises(ValueError, match="other features"):
            linear_attention(q, k, v, fm, causal=True, state=copied)
    with pytest.raises(ValueError, match="other features"):  # the copy is tied to the original map object
        linear_attention(q, k, v, twin_map, causal=True, state=twin_state)


def test_an_unpickled_state_with_another_feature_width_is_refused_clearly(tmp_path):
    q, k, v = (x.detach() for x in _qkv(1, 2, 4, seed=20))
    torch.save(_state(TrigRandomFeatures(D, 16, seed=0).double()), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)  # not tied to a map any more
    for piece in (slice(0, 1), slice(0, 4)):  # the one-position path and the chunked one
        with pytest.raises(ValueError, match="holds 16 feature columns, the feature map gives 8"):
            linear_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece], EluFeatures(D), causal=True,
                             state=state)


def test_positions_of_an_empty_batch_still_count():
    fm = EluFeatures(D)
    empty = torch.zeros(0, 2, 5, D)
    _, state = linear_attention(empty, empty, empty, fm, causal=True, return_state=True)
    _, state = linear_attention(empty[:, :, :1], empty[:, :, :1], empty[:, :, :1], fm, causal=True, state=state,
                                return_state=True)
    assert state.length == 6


def test_a_state_whose_parts_are_not_tensors_is_a_type_error():
    fm = EluFeatures(D)
    state = _state(fm)
    q = torch.zeros(1, 2, 1, D, dtype=F64)
    with pytest.raises(TypeError, match="kv and ref must be tensors"):
        linear_attention(q, q, q, fm, causal=True, state=dataclasses.replace(state, kv=state.kv.tolist()))


# --------------------------------------------------------------------------- found by the review of the fixes
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_at_a_chunk_start_does_not_hide_other_sequences_steep_rises(bad):
    """A NaN rise made the steep-rise check's max NaN, so the per-query path was skipped for every sequence of the
    batch: a finite sequence whose keys rise steeply inside that chunk lost its earlier queries (error 2.55)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, dtype=F64) for _ in range(3))
    k[:, :, :6] = k[:, :, :6] / k[:, :, :6].norm(dim=-1, keepdim=True) * 110.0  # a steep rise at position 6
    fm = PositiveRandomFeatures(4, 16, seed=0).double()
    reference = linear_attention_log_reference(q, k, v, fm, causal=True)
    k[0, 0, 0, 0] = bad  # sequence 0, head 0, the chunk's first position
    one = linear_attention(q, k, v, fm, causal=True, chunk_size=12)
    torch.testing.assert_close(one[1], reference[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(one[0, 1], reference[0, 1], atol=1e-12, rtol=1e-12)  # the other head
    # in pieces: the step path's state then enters a chunked piece
    _, state = linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], fm, causal=True, return_state=True)
    assert torch.isfinite(state.ref).all()  # the reference leaves the non-finite key out, as in the chunks
    rest = linear_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], fm, causal=True, state=state, chunk_size=11)
    torch.testing.assert_close(rest[1], reference[1, :, 1:], atol=1e-12, rtol=1e-12)


def test_a_nan_key_does_not_hide_another_sequences_steep_rise_in_separable_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 40, 4, generator=g, dtype=F64) for _ in range(3))
    k[:, :, 20:] += 400.0  # a rise inside the chunk [16, 32) beyond float64's limit (0.45 · 708)
    reference = separable_attention_reference(q, k, v, causal=True)
    k[0, 0, 16, 0] = float("nan")
    out = separable_attention(q, k, v, causal=True, chunk_size=16)
    torch.testing.assert_close(out[1], reference[1], atol=1e-12, rtol=1e-12)


# ------------------------------------------------------- found by the review of separable states and the KV cache
def test_a_nan_key_reaches_only_the_separable_positions_that_see_it():
    """torch.cummax carried the NaN to the chunk's end, whose maximum is the chunk's reference: every earlier
    position of the chunk was NaN in one call, but not when fed one token at a time."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 3, generator=g, dtype=F64) for _ in range(3))
    clean = separable_attention(q, k, v, causal=True)
    k[0, 0, 5, 1] = float("nan")
    one = separable_attention(q, k, v, causal=True)
    torch.testing.assert_close(one[:, :, :5], clean[:, :, :5], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(one[:, 1], clean[:, 1], atol=1e-12, rtol=1e-12)  # the other head
    assert one[0, 0, 5:].isnan().all()
    outs, state = [], None
    for t in range(8):
        out, state = separable_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], causal=True,
                                         state=state, return_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), one, atol=1e-12, rtol=1e-12, equal_nan=True)
    assert torch.isfinite(state.ref).all()  # the maxima leave the NaN key out, as in the chunks


def test_a_kv_cache_that_does_not_fit_is_refused_naming_it():
    q, k, v = (x.detach() for x in _qkv(2, 2, 4, seed=24))
    _, cache = cached_softmax_attention(q, k, v, None)
    for padding in (torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match="the KV cache does not fit this call"):
            cached_softmax_attention(q, k, v, KVCache(cache.keys, cache.values, padding))
    with pytest.raises(TypeError, match="a KVCache holds tensors"):
        cached_softmax_attention(q, k, v, KVCache([0], [0]))  # type: ignore[arg-type]


def test_a_float64_kv_cache_stays_float64_after_a_float32_piece():
    q, k, v = (x.detach() for x in _qkv(1, 1, 9, seed=25))

    def rounded(x: torch.Tensor) -> torch.Tensor:  # what the float32 piece holds
        return torch.cat([x[:, :, :3], x[:, :, 3:6].float().double(), x[:, :, 6:]], dim=2)

    reference = softmax_attention(rounded(q), rounded(k), rounded(v), causal=True)
    _, cache = cached_softmax_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], None)
    out32, cache = cached_softmax_attention(q[:, :, 3:6].float(), k[:, :, 3:6].float(), v[:, :, 3:6].float(), cache)
    assert out32.dtype == torch.float32 and cache.keys.dtype == F64
    out, cache = cached_softmax_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], cache)
    torch.testing.assert_close(out, reference[:, :, 6:], atol=1e-14, rtol=1e-14)  # narrowed: 8.5e-9


def test_separable_token_by_token_takes_the_step_path_and_equals_one_call(monkeypatch):
    """One position skips the chunked kernel (0.87 -> 0.30 ms per token at H = 8, D = 64 on this CPU) and gives
    one call's outputs and gradients: padding, a steep rise, a fully padded start."""
    from theorylab.attention import separable as separable_module

    q, k, v = _qkv(2, 2, 30, seed=26)
    with torch.no_grad():
        k[:, :, 15:] += 400.0  # beyond float64's steep limit
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[0, :4] = True
    pad[1, 10:13] = True
    whole = separable_attention(q, k, v, causal=True, key_padding_mask=pad)
    first, state = separable_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=True,
                                       key_padding_mask=pad[:, :1], return_state=True)
    outs = [first]

    def chunked(*args, **kwargs):
        raise AssertionError("one position went through the chunked kernel")

    monkeypatch.setattr(separable_module, "_causal", chunked)
    for t in range(1, 30):
        out, state = separable_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], causal=True,
                                         key_padding_mask=pad[:, t:t + 1], state=state, return_state=True)
        outs.append(out)
    pieces = torch.cat(outs, dim=2)
    torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=1e-12)
    assert (pieces[0, :, :4] == 0).all()
    for g_whole, g_pieces in zip(_grads(whole, [q, k, v]), _grads(pieces, [q, k, v]), strict=True):
        torch.testing.assert_close(g_pieces, g_whole, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear", "favor"])
def test_a_state_passed_without_return_state_gives_the_output_alone(kind):
    """separable_attention(state=...) returned (out, state) although return_state was False, and so did
    MultiheadAttention(kind="separable"), where the other kinds return the tensor alone."""
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 2, kind=kind, causal=True, num_features=8)
    x = torch.randn(1, 4, 16)
    first, state = mha(x[:, :3], return_state=True)
    last = mha(x[:, 3:], state=state)
    assert isinstance(last, torch.Tensor) and last.shape == (1, 1, 16)
    torch.testing.assert_close(torch.cat([first, last], 1), mha(x), rtol=1e-5, atol=1e-6)
    if kind == "separable":
        q = k = v = torch.randn(1, 2, 4, 8)
        _, st = separable_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True, return_state=True)
        assert isinstance(separable_attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], causal=True, state=st),
                          torch.Tensor)


@pytest.mark.parametrize("kind", ["linear", "favor", "separable", "softmax"])
def test_index_select_reorders_and_repeats_sequences_for_beam_search(kind):
    from theorylab.attention import MultiheadAttention

    torch.manual_seed(0)
    module = MultiheadAttention(16, 2, kind=kind, causal=True).double()
    x, token = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 1, 16, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, :2] = True  # a left-padded prompt: the cache carries its padding along
    _, state = module(x, key_padding_mask=pad, return_state=True)
    parents = torch.tensor([1, 0, 1], dtype=torch.int32)
    out = module(token, state=state.index_select(parents))
    expected = module(torch.cat([x[parents.long()], token], 1),
                      key_padding_mask=torch.cat([pad[parents.long()], torch.zeros(3, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(out, expected[:, -1:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"index_select: index holds rows outside 0..2 .* got \[0, 3\]"):
        state.index_select(torch.tensor([0, 3]))
    with pytest.raises(TypeError, match=r"1-D integer tensor of batch rows; got a 1-D torch.float32 tensor"):
        state.index_select(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="got list"):
        state.index_select([0, 1])


@pytest.mark.parametrize("kind", ["linear", "softmax"])
def test_a_saved_state_loads_with_the_safe_globals_its_docstring_names(kind, tmp_path):
    from theorylab.attention import KVCache, MultiheadAttention
    from theorylab.attention.state import MapFingerprint

    module = MultiheadAttention(8, 2, kind=kind, causal=True)
    _, state = module(torch.randn(2, 4, 8), return_state=True)
    torch.save(state, tmp_path / "state.pt")
    allowed = [KVCache] if kind == "softmax" else [LinearAttentionState, MapFingerprint]
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(tmp_path / "state.pt")
    else:  # torch 2.4: the process-wide list, as the docstring says
        torch.serialization.add_safe_globals(allowed)
        loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    token = torch.randn(2, 1, 8)
    torch.testing.assert_close(module(token, state=loaded), module(token, state=state), rtol=0, atol=0)
