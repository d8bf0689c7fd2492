import pytest
import torch

from theorylab.attention import MultiheadAttention

KINDS = ["softmax", "separable", "linear", "favor"]


@pytest.mark.parametrize("kind", KINDS)
def test_causal_outputs_ignore_the_future(kind):
    torch.manual_seed(0)
    mha = MultiheadAttention(16, 4, kind=kind, causal=True, num_features=32, seed=0, chunk_size=4).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 8:] = torch.randn(2, 5, 16, dtype=torch.float64) * 10
    out_x, out_y = mha(x), mha(y)
    assert out_x.shape == (2, 13, 16)
    torch.testing.assert_close(out_x[:, :8], out_y[:, :8])
    assert not torch.allclose(out_x[:, 8:], out_y[:, 8:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_equals_truncation(kind, causal):
    torch.manual_seed(0)
    mha = MultiheadAttention(12, 3, kind=kind, causal=causal, num_features=16, seed=0).double()
    x = torch.randn(1, 10, 12, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(1, 4, 12, dtype=torch.float64) * 50], dim=1)
    mask = torch.zeros(1, 14, dtype=torch.bool)
    mask[0, 10:] = True
    if causal:
        torch.testing.assert_close(mha(padded, key_padding_mask=mask)[:, :10], mha(x))
    else:
        torch.testing.assert_close(mha(x, padded, padded, key_padding_mask=mask), mha(x, x, x))


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_and_gradients(kind):
    torch.manual_seed(0)
    mha = MultiheadAttention(8, 2, kind=kind, num_features=16, seed=0)
    query, memory = torch.randn(3, 5, 8), torch.randn(3, 9, 8)
    out = mha(query, memory)
    assert out.shape == (3, 5, 8)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mha.parameters())


def test_softmax_kind_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4, kind="softmax").double()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    q, kv = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    expected, _ = ref(q, kv, kv, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(q, kv, key_padding_mask=mask), expected)


def test_favor_features_are_fixed_until_redrawn_and_eval_is_deterministic():
    mha = MultiheadAttention(16, 2, kind="favor", num_features=8, seed=1).eval()
    x = torch.randn(1, 7, 16)
    a = mha(x)
    torch.testing.assert_close(mha(x), a)
    mha.redraw_features()
    assert not torch.allclose(mha(x), a)


def test_dropout_only_in_training():
    mha = MultiheadAttention(8, 2, kind="linear", dropout=0.5)
    x = torch.randn(2, 5, 8)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        MultiheadAttention(8, 2, kind="flash")
    with pytest.raises(ValueError, match="divide embed_dim"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="embed_dim must be positive; got 0"):
        MultiheadAttention(0, 4)  # had blamed num_heads, which divides 0
    with pytest.raises(ValueError, match="num_features"):
        MultiheadAttention(8, 2, kind="favor", num_features=0)
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        MultiheadAttention(8, 2)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="causal needs Nq == Nk"):
        MultiheadAttention(8, 2, kind="linear", causal=True)(torch.randn(1, 3, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="recompute applies to kinds 'linear' and 'favor'; got kind='softmax'"):
        MultiheadAttention(8, 2, recompute=True)
    with pytest.raises(TypeError, match="dropout must be a number in \\[0, 1\\); got '0.1'"):
        MultiheadAttention(8, 2, dropout="0.1")  # had failed inside a comparison: '<=' not supported


@pytest.mark.parametrize("kind", ["linear", "favor"])
def test_recompute_changes_neither_outputs_nor_parameter_gradients(monkeypatch, kind):
    from theorylab.attention import linear

    monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1)  # a block per chunk: 75 checkpointed blocks
    x = torch.randn(2, 300, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        mha = MultiheadAttention(16, 2, kind=kind, causal=True, num_features=8, seed=0, chunk_size=4,
                                 recompute=recompute)
        out = mha(x)
        out.square().sum().backward()
        grads.append([out.detach()] + [p.grad for p in mha.parameters()])
    assert "recompute=True" in repr(mha)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_device_and_dtype_keywords_as_torch_modules_take_them():
    """nn.MultiheadAttention(..., device=, dtype=) had no counterpart here (a user's journey): the module built with
    them equals the one built and then moved, and a non-floating dtype is a TypeError naming it."""
    torch.manual_seed(0)
    built = MultiheadAttention(8, 2, kind="favor", seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    moved = MultiheadAttention(8, 2, kind="favor", seed=0).double()
    assert built.q_proj.weight.dtype == torch.float64
    for (name, a), b in zip(built.state_dict().items(), moved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert MultiheadAttention(8, 2, kind="linear", device="meta").k_proj.weight.is_meta
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype.*torch.int64"):
        MultiheadAttention(8, 2, dtype=torch.int64)
