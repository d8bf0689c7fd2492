"""What session 28's attention journey found: a drop-in placed by hand in an encoder that takes torch's
nested-tensor path, and swaps that drew from torch's global generator."""

import pytest
import torch
from torch import nn

from theorylab.attention import DropInMultiheadAttention, MultiheadAttention, swap_attention, unswap_attention


def _encoder(nested: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


def _padded_batch():
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 3:] = True
    return x, pad


@pytest.mark.parametrize("kind", ["softmax", "favor", "linear"])
def test_a_drop_in_put_in_by_hand_runs_torchs_nested_path(kind):
    """Layers given a drop-in one by one (not swap_attention on the whole encoder) kept the encoder's
    nested-tensor path, which failed in eval without autograd: "NestedTensorImpl doesn't support sizes"."""
    enc, x, pad = _encoder(nested=True), *_padded_batch()
    torch_out = None
    if kind == "softmax":
        with torch.no_grad():
            torch_out = enc(x, src_key_padding_mask=pad)
    for layer in enc.layers:
        layer.self_attn = swap_attention(layer.self_attn, kind, seed=0)
    assert enc.use_nested_tensor
    with torch.no_grad():
        nested = enc(x, src_key_padding_mask=pad)
        enc.use_nested_tensor = False
        padded = enc(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(nested[keep], padded[keep], atol=1e-5, rtol=1e-5)
    assert (nested[pad] == 0).all()  # torch's nested path gives zeros at padded positions
    if torch_out is not None:
        torch.testing.assert_close(nested, torch_out, atol=1e-5, rtol=1e-5)


def test_nested_inputs_are_taken_batch_first_only():
    drop_in = DropInMultiheadAttention(MultiheadAttention(8, 2), batch_first=False)
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="nested tensors are taken batch first"):
        drop_in(x, x, x)
    drop_in.batch_first = True
    out, _ = drop_in(x, x, x)
    assert [t.shape[0] for t in out.unbind()] == [3, 2]
    alone = drop_in.attention(x.unbind()[1][None], x.unbind()[1][None], x.unbind()[1][None])[0]
    torch.testing.assert_close(out.unbind()[1], alone)


def _next_draw_after(change) -> float:
    model = _encoder(nested=False)
    torch.manual_seed(0)
    change(model)
    return torch.rand(()).item()


@pytest.mark.parametrize("change", [lambda m: swap_attention(m, "softmax"),
                                    lambda m: unswap_attention(swap_attention(m, "softmax")),
                                    lambda m: swap_attention(m, "favor", seed=1),
                                    lambda m: swap_attention(swap_attention(m, "favor", seed=1), "linear"),
                                    lambda m: swap_attention(m.layers[0].self_attn, "separable")])
def test_swapping_leaves_torchs_generator_alone(change):
    """Each replacement's initialisation (overwritten at once by the copied weights) drew from torch's global
    generator, so a seeded run that swapped got other data orders and dropout masks than the run it copies."""
    assert _next_draw_after(change) == _next_draw_after(lambda m: None)


def test_unseeded_random_features_still_come_from_the_global_generator():
    """Without a seed, FAVOR+'s features are torch's global generator's draws, as at construction: reproducible
    under torch.manual_seed, and different from layer to layer."""
    features = []
    for _ in range(2):
        model = _encoder(nested=False)
        torch.manual_seed(5)
        swap_attention(model, "favor")
        features.append([layer.self_attn.attention.feature_map.projection for layer in model.layers])
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
    assert not torch.equal(*features[0])


@pytest.mark.parametrize("frozen", [False, True])
def test_a_drop_in_put_in_by_hand_runs_in_eval_with_autograd_on(frozen):
    """nn.TransformerEncoder reads in_proj_weight.requires_grad to pick its nested path: None failed there
    ("'NoneType' object has no attribute 'requires_grad'"), in eval with autograd on (a validation loss, input
    gradients), frozen or not (the review). With autograd on the encoder now takes its padded path."""
    enc, x, pad = _encoder(nested=True), *_padded_batch()
    for layer in enc.layers:
        layer.self_attn = swap_attention(layer.self_attn, "favor", seed=0)
    enc.requires_grad_(not frozen)
    x.requires_grad_(not frozen)
    out = enc(x, src_key_padding_mask=pad)
    enc.use_nested_tensor = False
    expected = enc(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    if not frozen:
        out.sum().backward()
        assert x.grad is not None and enc.layers[0].self_attn.attention.q_proj.weight.grad is not None
    drop_in = enc.layers[0].self_attn
    assert drop_in.in_proj_weight.numel() == 0 and drop_in.in_proj_bias is None and drop_in._qkv_same_embed_dim


def test_nested_inputs_take_no_key_padding_mask():
    """The mask was dropped without a word; torch's module refuses the two together, and so does this one."""
    drop_in = DropInMultiheadAttention(MultiheadAttention(8, 2), batch_first=True)
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(3, 8)])
    with pytest.raises(ValueError, match="nested inputs take no key_padding_mask"):
        drop_in(x, x, x, key_padding_mask=torch.tensor([[False, False, True], [False, False, False]]))


# ---------------------------------------------------------------------------------- a model's life cycle


def test_a_seeded_swap_runs_inside_a_meta_device_context():
    """The layers' seeds were drawn with a CPU generator into a tensor the context put on meta:
    "Tensor.item() cannot be called on meta tensors"."""
    with torch.device("meta"):
        model = swap_attention(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2),
                               "favor", seed=0)
    seeds = [layer.self_attn.attention.feature_map.seed for layer in model.layers]
    assert seeds[0] != seeds[1] and model.layers[0].self_attn.attention.q_proj.weight.is_meta


def test_an_explicit_device_wins_over_a_device_context():
    """MultiheadAttention(device="cpu") inside torch.device("meta") was built on meta and then failed to copy
    ("Cannot copy out of meta tensor"); torch's modules take the explicit device."""
    with torch.device("meta"):
        mha = MultiheadAttention(16, 2, kind="favor", seed=0, device="cpu")
        on_meta = MultiheadAttention(16, 2, kind="favor", seed=0)
    reference = MultiheadAttention(16, 2, kind="favor", seed=0)
    assert not mha.q_proj.weight.is_meta and on_meta.q_proj.weight.is_meta
    torch.testing.assert_close(mha.feature_map.projection, reference.feature_map.projection, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["softmax", "linear", "favor"])
def test_reset_parameters_after_to_empty_gives_the_constructed_module(kind):
    """docs/attention.md says to call reset_parameters() after to_empty(), as for torch's modules; the module had
    none (its _reset_parameters left FAVOR+'s features uninitialised). A seeded one is then the module as
    constructed: the features exactly, the projections' initialisation (Xavier weights, zero biases)."""
    reference = MultiheadAttention(16, 2, kind=kind, seed=0)
    with torch.device("meta"):
        mha = MultiheadAttention(16, 2, kind=kind, seed=0)
    mha.to_empty(device="cpu")
    mha.reset_parameters()
    if kind == "favor":
        torch.testing.assert_close(mha.feature_map.projection, reference.feature_map.projection, rtol=0, atol=0)
    bound = (6 / (16 + 16)) ** 0.5  # Xavier-uniform
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        proj = getattr(mha, name)
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3 and (proj.bias == 0).all()
    assert MultiheadAttention._reset_parameters is MultiheadAttention.reset_parameters  # torch's name too


def test_parametrized_attention_weights_are_refused_not_dropped():
    """swap_attention, unswap_attention and a change of kind copied a spectral_norm'd weight's current value into a
    plain parameter: the constraint was gone (σ_max 2.4e5 after three SGD steps at lr 1) without a word."""
    from torch.nn.utils.parametrizations import spectral_norm

    enc = _encoder(nested=False)
    spectral_norm(enc.layers[1].self_attn.out_proj)
    with pytest.raises(ValueError, match=r"'layers.1.self_attn': the attention module's out_proj.weight is "
                                         r"parametrized .*remove_parametrizations"):
        swap_attention(enc, "softmax")
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention  # nothing swapped
    mha = nn.MultiheadAttention(16, 2)
    spectral_norm(mha, "in_proj_weight")
    with pytest.raises(ValueError, match="in_proj_weight is parametrized"):
        swap_attention(mha, "favor")
    swapped = swap_attention(nn.MultiheadAttention(16, 2), "linear")
    spectral_norm(swapped.attention.q_proj)
    for change in (lambda: swap_attention(swapped, "favor"), lambda: unswap_attention(swapped),
                   lambda: swap_attention(swapped.attention, "softmax")):
        with pytest.raises(ValueError, match=r"q_proj.weight is parametrized"):
            change()


def test_a_drop_in_with_quantized_projections_runs_the_encoders_nested_path():
    """in_proj_weight was made from q_proj.weight, which a dynamically quantized Linear has as a method: the
    encoder's read failed, reported as "no attribute 'in_proj_weight'" (the second review)."""
    import warnings

    enc, x, pad = _encoder(nested=True), *_padded_batch()
    for layer in enc.layers:
        layer.self_attn = swap_attention(layer.self_attn, "favor", seed=0)
    names = {n for n, _ in enc.named_modules() if n.endswith("_proj") and ".attention." in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(enc, names, dtype=torch.qint8)
        with torch.no_grad():
            out = quantized(x, src_key_padding_mask=pad)
    assert out.shape == x.shape and bool(torch.isfinite(out).all()) and (out[pad] == 0).all()


class _LearnedMap(nn.Module):
    """A feature map of one's own, elu(Px) + 1, with no reset_parameters of its own."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return nn.functional.elu(self.proj(x)) + 1


def test_a_parametrized_feature_map_of_ones_own_is_kept_not_refused():
    """The refusal walked into the feature map, which a re-swap keeps as it is and an unswap drops anyway: both were
    refused (the second review). Only the copied projections are refused."""
    from torch.nn.utils.parametrizations import orthogonal

    learned = _LearnedMap(8)
    orthogonal(learned.proj)
    enc = swap_attention(_encoder(nested=False), "linear", feature_map=learned)
    kept = enc.layers[0].self_attn.attention.feature_map
    swap_attention(enc, "linear", recompute=True)
    assert enc.layers[0].self_attn.attention.feature_map is kept
    unswap_attention(enc)
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention


def test_device_meta_builds_on_meta_and_draws_nothing():
    """device="meta" inside a meta context was built on the CPU (the full module, and draws from the global
    generator) before moving to meta (the second review); torch's modules draw nothing there."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with torch.device("meta"):
        mha = MultiheadAttention(64, 4, kind="favor", device="meta")
    assert mha.q_proj.weight.is_meta and mha.feature_map.projection.is_meta
    assert torch.equal(before, torch.get_rng_state())


def test_reset_parameters_initialises_a_feature_map_without_its_own():
    """A map of one's own with an nn.Linear but no reset_parameters kept to_empty()'s uninitialised memory (NaN)."""
    with torch.device("meta"):
        mha = MultiheadAttention(16, 2, kind="linear", feature_map=_LearnedMap(8))
    mha.to_empty(device="cpu")
    with torch.no_grad():
        mha.feature_map.proj.weight.fill_(float("nan"))
    mha.reset_parameters()
    assert bool(torch.isfinite(mha.feature_map.proj.weight).all())
