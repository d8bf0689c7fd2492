"""Twenty-first session: feature maps called directly refuse non-float input and compute half precision in float32."""

from __future__ import annotations

import pytest
import torch

from theorylab.attention import EluFeatures, PositiveRandomFeatures, ReluFeatures, TrigRandomFeatures

MAPS = {
    "favor": lambda: PositiveRandomFeatures(4, 4, seed=0),
    "trig": lambda: TrigRandomFeatures(4, 4, seed=0),
    "elu": lambda: EluFeatures(4),
    "relu": lambda: ReluFeatures(4),
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("name", list(MAPS))
def test_feature_maps_refuse_non_float_input_naming_the_dtype(name, dtype):
    """They had raised torch's matmul error, returned integer features (relu), cast silently (elu) or accepted
    complex input (the random maps), where linear_attention refuses all of these."""
    x = torch.tensor([[1, 2, 0, -1]]).to(dtype)
    with pytest.raises(TypeError, match=rf"must be floating point.*{str(dtype).removeprefix('torch.')}"):
        MAPS[name]()(x)


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_random_maps_compute_half_precision_in_float32(cls, dtype):
    """φ(x) exponentiates the row's log-scale |x'|²/2 (≈ 4 here), whose bfloat16 rounding had given a 9.8% error in
    the FAVOR+ kernel estimate (0.65% if only the features are rounded). Now the float32 features, rounded."""
    fm = cls(64, 256, seed=0)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = fm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, fm(x.float()).to(dtype), atol=0, rtol=0)
    ref = fm.double()(x.double())
    fm.float()
    kernel, got = ref @ ref.mT, out.double() @ out.double().mT
    assert float((got - kernel).norm() / kernel.norm()) < 0.02


def test_random_maps_under_autocast_give_the_float32_features():
    """As linear_attention does: autocast's bfloat16 matmul would round ωᵀx' before the exponential."""
    fm = PositiveRandomFeatures(16, 32, seed=0)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fm(x)
    torch.testing.assert_close(out, fm(x), atol=0, rtol=0)


def _favor_encoder(seed: int) -> torch.nn.Module:
    from torch import nn

    from theorylab.attention import swap_attention

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    return swap_attention(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), "favor", num_features=8,
                          seed=seed)


def test_swap_attention_with_a_seed_gives_each_layer_its_own_features():
    """One seed for every layer had given all layers the same random features, redrawn in lockstep."""
    maps = [layer.self_attn.attention.feature_map for layer in _favor_encoder(0).layers]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(maps[a].projection, maps[b].projection)
    again = [layer.self_attn.attention.feature_map for layer in _favor_encoder(0).layers]
    other = [layer.self_attn.attention.feature_map for layer in _favor_encoder(1).layers]
    assert all(torch.equal(x.projection, y.projection) for x, y in zip(maps, again, strict=True))
    assert not any(torch.equal(x.projection, y.projection) for x, y in zip(maps, other, strict=True))
    for m in maps + again:
        m.redraw()
    assert all(torch.equal(x.projection, y.projection) for x, y in zip(maps, again, strict=True))
    assert not torch.equal(maps[0].projection, maps[1].projection)


def test_swap_attention_refuses_an_unknown_kind_even_with_nothing_to_swap():
    """swap_attention(nn.Linear(2, 2), "bogus") returned the model without a word."""
    from torch import nn

    from theorylab.attention import swap_attention

    with pytest.raises(ValueError, match="kind must be one of.*'bogus'"):
        swap_attention(nn.Linear(2, 2), "bogus")
    model = nn.Linear(2, 2)
    assert swap_attention(model, "favor") is model  # a valid kind and nothing to swap: the model as it was
