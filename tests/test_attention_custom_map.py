"""A feature map of one's own (docs/attention.md): a trainable softmax-of-linear map, and one given through
``log_features_rowwise``, against a float64 reference that forms φ(Q)φ(K)ᵀ; in linear_attention,
MultiheadAttention(feature_map=...) and swap_attention."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from theorylab.attention import MultiheadAttention, linear_attention, swap_attention

F64 = torch.float64
D, M = 8, 12


class SoftmaxMap(nn.Module):
    """φ(x) = softmax(W x): positive, trainable, not positively homogeneous."""

    def __init__(self, head_dim: int = D, num_features: int = M, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_features, head_dim, generator=gen) / head_dim**0.5)

    def forward(self, x):
        return torch.softmax(x @ self.weight.T, dim=-1)  # in the dtype of its weight, as modules are


def reference(q, k, v, fm, causal=False, pad=None):
    a = fm(q) @ fm(k).mT  # (B, H, Nq, Nk): the whole matrix
    if pad is not None:
        a = a.masked_fill(pad[:, None, None, :], 0.0)
    if causal:
        a = a.tril()
    return (a @ v) / a.sum(-1, keepdim=True)


def qkv(n=37, b=2, h=3, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_the_reference(causal, padded):
    fm = SoftmaxMap().double()
    q, k, v = qkv()
    pad = None
    if padded:
        pad = torch.zeros(2, 37, dtype=torch.bool)
        pad[1, 30:] = True
    out = linear_attention(q, k, v, fm, causal=causal, key_padding_mask=pad, chunk_size=8)  # 8 does not divide 37
    ref = reference(q, k, v, fm, causal, pad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, fm.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, k, v, fm.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


class LogSoftmaxMap(SoftmaxMap):
    """The same φ through the hook: log φ = proj + offset, offset the per-row -logsumexp (docs/attention.md)."""

    num_features = np.int64(M)  # any integer type

    def log_features_rowwise(self, x):
        proj = x @ self.weight.T
        return proj, -torch.logsumexp(proj, dim=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_a_map_given_by_its_log_features_equals_the_reference(causal):
    """docs/attention.md had described the hook the wrong way round ((bounded, log-scale)): a map written to that
    description gave outputs 0.4-0.7 off."""
    fm = LogSoftmaxMap().double()
    q, k, v = qkv()
    out = linear_attention(100 * q, 100 * k, v, fm, causal=causal, chunk_size=8)  # exp(proj) would overflow
    torch.testing.assert_close(out, reference(100 * q, 100 * k, v, SoftmaxMap().double(), causal), rtol=0,
                               atol=1e-10)


def test_in_multihead_attention_it_trains_and_decodes_one_token_at_a_time():
    fm = SoftmaxMap(head_dim=4, num_features=6)
    mha = MultiheadAttention(16, 4, kind="linear", causal=True, feature_map=fm).double()
    assert mha.feature_map is fm and "feature_map.weight" in dict(mha.named_parameters())
    x = torch.randn(2, 20, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    whole = mha(x)
    mha(x).sum().backward()
    assert fm.weight.grad is not None and bool(fm.weight.grad.abs().sum() > 0)
    with torch.no_grad():
        out, state = mha(x[:, :7], return_state=True)
        pieces = [out]
        for t in range(7, 20):
            out, state = mha(x[:, t:t + 1], state=state, return_state=True)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole.detach(), rtol=0, atol=1e-12)


def test_bad_feature_maps_are_refused_clearly():
    with pytest.raises(ValueError, match="feature_map is for kind='linear'"):
        MultiheadAttention(16, 4, kind="favor", feature_map=SoftmaxMap(head_dim=4))
    with pytest.raises(TypeError, match="feature_map must be an nn.Module"):
        MultiheadAttention(16, 4, kind="linear", feature_map=torch.relu)
    q, k, v = qkv(n=5)
    with pytest.raises(TypeError, match="feature_map must be an nn.Module"):  # it had been an AttributeError
        linear_attention(q, k, v, lambda x: torch.relu(x) ** 2)

    class Rowwise(nn.Module):
        def log_features_rowwise(self, x):
            return torch.ones_like(x), x.sum(-1)

    with pytest.raises(TypeError, match="int attribute num_features"):  # a bare AttributeError before
        linear_attention(q, k, v, Rowwise())

    class Sized(SoftmaxMap):
        head_dim = 5

    with pytest.raises(ValueError, match="head_dim is 5"):
        MultiheadAttention(16, 2, kind="linear", feature_map=Sized(head_dim=8))


def test_swap_attention_gives_each_layer_its_own_copy_and_keeps_it_on_a_re_swap():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    fm = SoftmaxMap(head_dim=4, num_features=6)
    model = swap_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), "linear", feature_map=fm)
    maps = [m.self_attn.attention.feature_map for m in model.layers]
    assert maps[0] is not maps[1] and all(m is not fm for m in maps)
    assert all(torch.equal(m.weight, fm.weight) for m in maps)
    again = swap_attention(model, "linear", recompute=True)
    assert [m.self_attn.attention.feature_map for m in again.layers] == maps  # the same (trained) maps
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(again(x)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_a_map_kept_in_bfloat16_works(causal):
    """Its parameters in bfloat16 (model.to(torch.bfloat16)): the kernels had called it on float32 inputs, and
    its matmul failed ("expected m1 and m2 to have the same dtype")."""
    fm = SoftmaxMap()
    q, k, v = (t.detach() for t in qkv(dtype=torch.float32))
    expected = linear_attention(q, k, v, fm, causal=causal)
    fm_bf16 = copy.deepcopy(fm).to(torch.bfloat16)
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), fm_bf16, causal=causal)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2)


def test_a_re_swap_keeps_a_map_in_its_own_dtype():
    """The kept map went through the new module's .to(dtype): a float32 map in a bfloat16 model became bfloat16,
    and an optimizer holding its parameters failed."""
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    drop_in = swap_attention(mha, "linear", feature_map=SoftmaxMap(head_dim=4, num_features=6))
    drop_in.attention.q_proj.to(torch.bfloat16)  # projections in bfloat16, the map kept in float32
    again = swap_attention(drop_in, "linear", recompute=True)
    assert again.attention.feature_map is drop_in.attention.feature_map
    assert again.attention.feature_map.weight.dtype == torch.float32
    assert again.attention.q_proj.weight.dtype == torch.bfloat16


def test_float64_inputs_are_not_narrowed_for_a_half_precision_map():
    q, k, v = qkv(n=6)
    with pytest.raises(RuntimeError):  # the map's own dtype error, as torch's layers give
        linear_attention(q, k, v, SoftmaxMap().to(torch.bfloat16))


class Malformed(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


@pytest.mark.parametrize("make, what", [
    (lambda x: torch.relu(x).sum(-1), r"features \(\.\.\., n, M\); for inputs \(\.\.\., 7, 8\) its output is "
                                       r"\(\.\.\., \d, 7\)"),  # the feature dimension dropped
    (lambda x: torch.relu(x)[..., :-1, :], r"its output is \(\.\.\., 6, 8\)"),  # a position short
    (lambda x: (x > 0), "floating-point"),
])
@pytest.mark.parametrize("causal", [False, True])
def test_a_map_of_the_wrong_shape_is_named(make, what, causal):
    """It failed deep inside the kernels (a bmm's shapes, amax over an empty dimension), naming nothing of the map."""
    q, k, v = (t.detach() for t in qkv(n=7, dtype=torch.float32))
    with pytest.raises(ValueError, match=f"feature map Malformed must map .*{what}"):
        linear_attention(q, k, v, Malformed(make), causal=causal)


def test_a_log_features_rowwise_map_of_the_wrong_shape_is_named():
    class Offset4d(LogSoftmaxMap):
        def log_features_rowwise(self, x):
            proj, offset = super().log_features_rowwise(x)
            return proj, offset[..., None]

    q, k, v = qkv(n=7)
    with pytest.raises(ValueError, match=r"log_features_rowwise must return a second tensor of one value per row"):
        linear_attention(q, k, v, Offset4d().double())


@pytest.mark.parametrize("causal", [False, True])
def test_a_log_features_rowwise_map_kept_in_bfloat16_works(causal):
    """Its hook was given float32 inputs while its weight was bfloat16 (the other two kinds of map were cast)."""
    fm = LogSoftmaxMap()
    q, k, v = (t.detach() for t in qkv(dtype=torch.float32))
    expected = linear_attention(q, k, v, fm, causal=causal)
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), copy.deepcopy(fm).bfloat16(), causal=causal)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_a_map_that_gives_no_features_gives_zeros(causal):
    """M = 0 (as heads of width 0 give): every normaliser is 0, so zeros, as for a query with no visible key; it
    had raised IndexError from an amax over no features."""
    q, k, v = (t.detach() for t in qkv(n=7))
    out = linear_attention(q, k, v, Malformed(lambda x: x[..., :0]), causal=causal)
    assert torch.equal(out, torch.zeros_like(v))
