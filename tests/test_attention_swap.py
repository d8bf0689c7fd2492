"""swap_attention / DropInMultiheadAttention: the package's attention inside torch's Transformer layers.

Kind "softmax" must reproduce torch's layers (outputs and gradients, float64), with every mask form torch's layers
pass; the kernelised kinds must run there, respect causality and equal the package's own module; anything the
kinds cannot do is a clear error."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from theorylab.attention import DropInMultiheadAttention, MultiheadAttention, swap_attention, unswap_attention

F64 = torch.float64
E, H, N, B = 32, 4, 10, 3


def _encoder(batch_first=True, norm_first=False, nested=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, dtype=F64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)


def _x(batch_first=True, n=N):
    x = torch.randn(B, n, E, dtype=F64, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1)


def _pad(n=N):
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[1, 7:] = True
    pad[2, 1:] = True  # every key but one
    return pad


CAUSAL_F = nn.Transformer.generate_square_subsequent_mask(N, dtype=F64)
CAUSAL_B = torch.ones(N, N, dtype=torch.bool).triu(1)
CALLS = {
    "plain": {},
    "causal float mask + hint": {"mask": CAUSAL_F, "is_causal": True},
    "causal float mask": {"mask": CAUSAL_F},
    "causal bool mask": {"mask": CAUSAL_B},
    "bool padding": {"src_key_padding_mask": _pad()},
    "causal + padding": {"mask": CAUSAL_B, "src_key_padding_mask": _pad()},  # torch wants one mask type
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("call", list(CALLS))
def test_softmax_kind_reproduces_torch_encoder(batch_first, norm_first, mode, call):
    torch_enc = _encoder(batch_first, norm_first)
    ours = swap_attention(copy.deepcopy(torch_enc), "softmax")
    getattr(torch_enc, mode)()
    getattr(ours, mode)()
    x = _x(batch_first)
    torch.testing.assert_close(ours(x, **CALLS[call]), torch_enc(x, **CALLS[call]), rtol=1e-12, atol=1e-12)


def test_gradients_match_torch():
    torch_enc = _encoder()
    ours = swap_attention(copy.deepcopy(torch_enc), "softmax")
    x1, x2 = _x().requires_grad_(), _x().requires_grad_()
    (torch_enc(x1, mask=CAUSAL_F, is_causal=True) ** 2).sum().backward()
    (ours(x2, mask=CAUSAL_F, is_causal=True) ** 2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-11, atol=1e-12)
    w_torch = torch_enc.layers[0].self_attn.in_proj_weight.grad
    attention = ours.layers[0].self_attn.attention
    w_ours = torch.cat([attention.q_proj.weight.grad, attention.k_proj.weight.grad, attention.v_proj.weight.grad])
    torch.testing.assert_close(w_ours, w_torch, rtol=1e-11, atol=1e-12)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_tensor_fast_path_is_switched_off():
    """nn.TransformerEncoder's nested-tensor path (eval, padding mask) cannot run through the drop-in (it fails on
    the nested input before our forward): it must be off, and the padded positions' outputs equal torch's."""
    torch_enc = _encoder(nested=True).eval()
    ours = swap_attention(copy.deepcopy(torch_enc), "softmax")
    assert torch_enc.use_nested_tensor and not ours.use_nested_tensor
    x, pad = _x(), _pad()
    with torch.no_grad():
        got, want = ours(x, src_key_padding_mask=pad), torch_enc(x, src_key_padding_mask=pad)
    kept = ~pad  # torch's nested path writes zeros at padded positions; the unpadded ones must agree
    torch.testing.assert_close(got[kept], want[kept], rtol=1e-12, atol=1e-12)


def test_full_transformer_with_decoder_and_memory_padding():
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                           batch_first=True, dtype=F64)
    ours = swap_attention(copy.deepcopy(model), "softmax")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in ours.modules())
    src, tgt = _x(n=12), _x(n=N)
    kw = {"tgt_mask": CAUSAL_F, "tgt_is_causal": True, "src_key_padding_mask": _pad(12),
          "memory_key_padding_mask": _pad(12)}
    torch.testing.assert_close(ours(src, tgt, **kw), model(src, tgt, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["separable", "linear", "favor"])
def test_kernelised_kinds_equal_the_package_module_and_are_causal(kind):
    torch_enc = _encoder()
    ours = swap_attention(copy.deepcopy(torch_enc), kind, seed=0) if kind == "favor" else \
        swap_attention(copy.deepcopy(torch_enc), kind)
    x = _x()
    y = ours(x, mask=CAUSAL_F, is_causal=True)
    assert torch.isfinite(y).all()
    x_later = x.clone()
    x_later[:, 6:] = 5 * torch.randn_like(x_later[:, 6:])
    torch.testing.assert_close(ours(x_later, mask=CAUSAL_F, is_causal=True)[:, :6], y[:, :6], rtol=1e-10,
                               atol=1e-12)  # the future does not reach the past
    # the wrapped module is the package's own: calling it directly gives the same attention
    layer = ours.layers[0]
    inner = layer.self_attn.attention
    assert isinstance(inner, MultiheadAttention) and inner.kind == kind
    h = torch.randn(B, N, E, dtype=F64)
    torch.testing.assert_close(layer.self_attn(h, h, h, attn_mask=CAUSAL_F)[0], inner(h, causal=True))


def test_drop_in_keeps_weights_device_dtype_and_dropout():
    mha = nn.MultiheadAttention(E, H, dropout=0.25, bias=False, batch_first=False, dtype=F64)
    drop_in = swap_attention(mha, "favor", num_features=16)
    assert isinstance(drop_in, DropInMultiheadAttention) and drop_in.batch_first is False
    inner = drop_in.attention
    assert inner.q_proj.weight.dtype == F64 and inner.q_proj.bias is None
    assert inner.dropout.p == 0.25 and drop_in.embed_dim == E and drop_in.num_heads == H
    torch.testing.assert_close(torch.cat([inner.q_proj.weight, inner.k_proj.weight, inner.v_proj.weight]),
                               mha.in_proj_weight, rtol=0, atol=0)
    torch.testing.assert_close(inner.out_proj.weight, mha.out_proj.weight, rtol=0, atol=0)


def test_unbatched_and_sequence_first_calls_match_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dtype=F64)  # sequence first, torch's default
    ours = swap_attention(copy.deepcopy(mha), "softmax")
    x = torch.randn(N, B, E, dtype=F64)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
    u = torch.randn(N, E, dtype=F64)  # unbatched
    pad = torch.zeros(N, dtype=torch.bool)
    pad[8:] = True
    got, weights = ours(u, u, u, key_padding_mask=pad)
    assert weights is None
    torch.testing.assert_close(got, mha(u, u, u, key_padding_mask=pad, need_weights=False)[0])


def test_state_dict_moves_between_swapped_models():
    a = swap_attention(_encoder(), "favor", seed=0)
    b = swap_attention(_encoder(), "favor", seed=1)
    b.load_state_dict(a.state_dict())
    x = _x()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_what_kernelised_attention_cannot_do_is_refused():
    drop_in = swap_attention(nn.MultiheadAttention(E, H, batch_first=True, dtype=F64), "linear")
    x = _x()
    with pytest.raises(ValueError, match="need_weights=True"):
        drop_in(x, x, x, need_weights=True)
    band = torch.ones(N, N, dtype=torch.bool).tril(-3)  # a sliding-window style mask: not causal
    with pytest.raises(ValueError, match="causal mask or none"):
        drop_in(x, x, x, attn_mask=band)
    with pytest.raises(ValueError, match=r"attn_mask must be \(10, 10\)"):
        drop_in(x, x, x, attn_mask=torch.zeros(B * H, N, N, dtype=torch.bool))
    bias = torch.zeros(B, N, dtype=F64)
    bias[0, 0] = -1.0
    with pytest.raises(ValueError, match="additive bias"):
        drop_in(x, x, x, key_padding_mask=bias)
    with pytest.raises(TypeError, match="bool or floating point"):
        drop_in(x, x, x, key_padding_mask=torch.zeros(B, N, dtype=torch.int64))
    # an all-zero attn_mask blocks nothing: the same as none
    torch.testing.assert_close(drop_in(x, x, x, attn_mask=torch.zeros(N, N, dtype=F64))[0], drop_in(x, x, x)[0])


@pytest.mark.parametrize("kwargs, what", [({"kdim": 16, "vdim": 16}, "kdim/vdim"),
                                          ({"add_bias_kv": True}, "add_bias_kv"),
                                          ({"add_zero_attn": True}, "add_zero_attn")])
def test_unsupported_torch_options_are_named(kwargs, what):
    with pytest.raises(ValueError, match=what):
        swap_attention(nn.MultiheadAttention(E, H, **kwargs), "favor")


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        swap_attention(_encoder(), "sparse")
    with pytest.raises(TypeError, match="theorylab MultiheadAttention"):
        DropInMultiheadAttention(nn.MultiheadAttention(E, H))
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        DropInMultiheadAttention(MultiheadAttention(E, H), batch_first="yes")
    with pytest.raises(TypeError, match="expected nn.MultiheadAttention or DropInMultiheadAttention; got Linear"):
        DropInMultiheadAttention.from_torch(nn.Linear(E, E), "favor")
    with pytest.raises(TypeError, match="causal must be a bool or None"):
        MultiheadAttention(E, H)(torch.randn(1, 3, E), causal="yes")


def test_per_call_causal_overrides_the_constructor():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, kind="linear")
    x = torch.randn(2, N, E)
    causal_twin = MultiheadAttention(E, H, kind="linear", causal=True)
    causal_twin.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, causal=True), causal_twin(x))
    torch.testing.assert_close(causal_twin(x, causal=False), m(x))


def test_a_single_layer_reads_the_causal_mask_itself():
    """nn.TransformerEncoderLayer passes attn_mask with is_causal=False unless told: the mask alone must do."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True, dtype=F64)
    ours = swap_attention(copy.deepcopy(layer), "softmax")
    x = _x()
    for mask in (CAUSAL_F, CAUSAL_B):
        torch.testing.assert_close(ours(x, src_mask=mask), layer(x, src_mask=mask), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours(x, src_mask=CAUSAL_F), ours(x))  # the mask mattered


def test_a_model_swapped_in_eval_mode_stays_in_eval_mode():
    """Torch's layers give their attention dropout 0.1 by default: a swap at inference must not switch it on."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True, dtype=F64)  # dropout 0.1
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ours = swap_attention(copy.deepcopy(model), "softmax")
    assert not any(m.training for m in ours.modules())
    x = _x()
    torch.testing.assert_close(ours(x), model(x), rtol=1e-12, atol=1e-12)
    train_model = swap_attention(nn.TransformerEncoder(copy.deepcopy(layer), 1, enable_nested_tensor=False), "favor")
    assert all(m.training for m in train_model.modules())


def test_frozen_attention_stays_frozen():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    mha.in_proj_weight.requires_grad_(False)
    mha.in_proj_bias.requires_grad_(False)
    drop_in = swap_attention(mha, "linear")
    inner = drop_in.attention
    for proj in (inner.q_proj, inner.k_proj, inner.v_proj):
        assert not any(p.requires_grad for p in proj.parameters())
    assert all(p.requires_grad for p in inner.out_proj.parameters())  # out_proj was left trainable


def test_a_shared_attention_is_replaced_everywhere_by_one_module():
    shared = nn.MultiheadAttention(E, H, batch_first=True)
    model = nn.ModuleDict({"a": nn.ModuleList([shared]), "b": nn.Sequential(shared)})
    swap_attention(model, "favor", seed=0)
    assert not any(isinstance(m, nn.MultiheadAttention) for _, m in model.named_modules(remove_duplicate=False))
    assert model["a"][0] is model["b"][0]  # still tied


def test_a_swapped_model_changes_kind_and_keeps_its_weights():
    torch_enc = _encoder()
    first = swap_attention(copy.deepcopy(torch_enc), "softmax")
    again = swap_attention(copy.deepcopy(first), "favor", seed=0)
    inner = again.layers[0].self_attn.attention
    assert inner.kind == "favor"
    torch.testing.assert_close(inner.q_proj.weight, first.layers[0].self_attn.attention.q_proj.weight, rtol=0,
                               atol=0)
    back = swap_attention(copy.deepcopy(again), "softmax")  # and back: torch's outputs again
    x = _x()
    torch.testing.assert_close(back(x), torch_enc(x), rtol=1e-12, atol=1e-12)


def test_weights_and_biases_keep_their_own_requires_grad():
    """BitFit-style fine-tuning freezes weights and trains biases: the swap keeps each as it was."""
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    for name, p in mha.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    drop_in = swap_attention(mha, "softmax")
    assert {n: p.requires_grad for n, p in drop_in.attention.named_parameters()} == {
        f"{proj}.{part}": part == "bias" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for part in ("weight", "bias")}
    again = swap_attention(drop_in, "favor")  # and through a change of kind
    assert {n: p.requires_grad for n, p in again.attention.named_parameters() if "_proj." in n} == {
        n: p.requires_grad for n, p in drop_in.attention.named_parameters()}


def test_a_change_of_kind_keeps_causality_and_settings():
    first = swap_attention(nn.MultiheadAttention(E, H, batch_first=True), "favor", causal=True, num_features=16,
                           chunk_size=4, recompute=True)
    inner = swap_attention(first, "linear").attention
    assert inner.causal and inner.chunk_size == 4 and inner.recompute
    favor = swap_attention(first, "favor").attention
    assert favor.feature_map.num_features == 16 and favor.causal
    softmax = swap_attention(first, "softmax").attention  # recompute does not apply to softmax: not carried
    assert softmax.causal and not softmax.recompute
    assert not swap_attention(first, "linear", causal=False).attention.causal  # an explicit setting wins


@pytest.mark.parametrize("seed", [0, None])
@pytest.mark.parametrize("change", [{"recompute": True}, {"chunk_size": 3}, {}, {"num_features": 16}])
def test_a_favor_model_swapped_again_keeps_its_features(seed, change):
    """Re-swapping to set recompute or chunk_size had redrawn the random features from torch's global generator
    and dropped the seed: the outputs moved by ~0.2. They are kept now (after a redraw too), and a later redraw
    continues the same sequence; another seed or number of features draws anew."""
    model = swap_attention(_encoder(), "favor", seed=seed, num_features=16, causal=True)
    model.layers[0].self_attn.attention.redraw_features()  # a map that has moved on from its first draw
    again = swap_attention(copy.deepcopy(model), "favor", **change)
    x = _x()
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-12)
    for old, new in zip(model.layers, again.layers, strict=True):
        old_map, new_map = old.self_attn.attention.feature_map, new.self_attn.attention.feature_map
        assert new_map.seed == old_map.seed
        old_map.redraw()
        new_map.redraw()
        if seed is not None:  # a seeded map's redraws continue its own sequence
            assert torch.equal(new_map.projection, old_map.projection)
    state = torch.random.get_rng_state()
    swap_attention(copy.deepcopy(model), "favor", **change)
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw from torch's generator that is thrown away
    other = swap_attention(copy.deepcopy(model), "favor", seed=1)
    assert not torch.equal(other.layers[0].self_attn.attention.feature_map.projection,
                           model.layers[0].self_attn.attention.feature_map.projection)
    assert swap_attention(copy.deepcopy(model), "favor", num_features=8).layers[0].self_attn.attention.feature_map\
        .projection.shape[0] == 8


def test_causal_true_is_refused_where_a_decoder_has_cross_attention():
    """It made the cross-attention causal: softmax ran as another model (1.38 off torch's), linear and favor failed
    deep inside with "causal needs Nq == Nk". Nothing is replaced when it is refused."""
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                           batch_first=True, dtype=F64)
    for kind in ("softmax", "linear"):
        with pytest.raises(ValueError, match=r"cross-attention of decoder\.layers\.0\.multihead_attn.*tgt_is_causal"):
            swap_attention(model, kind, causal=True)
    assert isinstance(model.decoder.layers[0].self_attn, nn.MultiheadAttention)
    assert swap_attention(copy.deepcopy(model), "linear", causal=False) is not None
    encoder_only = swap_attention(_encoder(), "linear", causal=True)  # self-attention only: causal as asked
    assert encoder_only.layers[0].self_attn.attention.causal


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_softmax_kind_reproduces_torch_decoder_layers_with_gradients(mode):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True, dtype=F64)
    model = nn.TransformerDecoder(layer, 2)
    ours = swap_attention(copy.deepcopy(model), "softmax")
    getattr(model, mode)()
    getattr(ours, mode)()
    memory_causal = torch.ones(N, 12, dtype=torch.bool).triu(1)  # top-left aligned, n_q != n_k
    kw = {"tgt_mask": CAUSAL_B, "memory_mask": memory_causal, "tgt_key_padding_mask": _pad(),
          "memory_key_padding_mask": _pad(12)}
    outputs = []
    for net in (model, ours):
        tgt, memory = _x().requires_grad_(), _x(n=12).requires_grad_()
        out = net(tgt, memory, **kw)
        out.pow(2).sum().backward()
        outputs.append((out, tgt.grad, memory.grad))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 3), head_dim=st.integers(1, 4), n=st.integers(1, 9), batch=st.integers(1, 3),
       batch_first=st.booleans(), causal=st.booleans(), data=st.data())
def test_softmax_swap_equals_torch_for_any_shape_and_padding(heads, head_dim, n, batch, batch_first, causal, data):
    embed = heads * head_dim
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    layer = nn.TransformerEncoderLayer(embed, heads, dim_feedforward=8, dropout=0.0, batch_first=batch_first,
                                       dtype=F64)
    ours = swap_attention(copy.deepcopy(layer), "softmax")
    # every row keeps its first key (a row with no visible key is NaN in torch, zeros here: see the README)
    kept = [data.draw(st.integers(1, n), label="kept") for _ in range(batch)]
    pad = torch.tensor([[j >= k for j in range(n)] for k in kept])
    x = torch.randn(batch, n, embed, dtype=F64)
    x = x if batch_first else x.transpose(0, 1)
    mask = nn.Transformer.generate_square_subsequent_mask(n, dtype=F64) if causal else None
    pad_f = torch.zeros(batch, n, dtype=F64).masked_fill(pad, float("-inf"))  # one mask type, as torch asks
    got = ours(x, src_mask=mask, src_key_padding_mask=pad_f, is_causal=causal)
    want = layer(x, src_mask=mask, src_key_padding_mask=pad_f, is_causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("kind", ["softmax", "separable", "favor"])
def test_per_example_gradients_through_a_swapped_encoder_by_vmap(kind):
    """vmap(grad(...)) over functional_call of a swapped encoder, with the causal mask and a per-example float
    padding mask (the masks' checks read every example's values): equal to one grad per example; for "softmax",
    also to torch's own encoder's per-example gradients."""
    torch.manual_seed(0)
    model = _encoder()
    swapped = swap_attention(copy.deepcopy(model), kind, **({"seed": 0, "num_features": 16} if kind == "favor" else {}))
    pad = torch.zeros(B, N, dtype=F64)
    pad[1, 7:] = float("-inf")

    def per_example(m):
        params = {name: p.detach() for name, p in m.named_parameters()}

        def loss(params, x, kp):
            return torch.func.functional_call(m, params, (x[None],), {
                "mask": CAUSAL_F, "src_key_padding_mask": kp[None], "is_causal": True}).pow(2).sum()

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, _x(), pad)
        for i, (x, kp) in enumerate(zip(_x(), pad, strict=True)):
            for name, g in torch.func.grad(loss)(params, x, kp).items():
                torch.testing.assert_close(grads[name][i], g, rtol=1e-10, atol=1e-12)
        return grads

    ours = per_example(swapped)
    if kind == "softmax":
        theirs = per_example(model)
        ours = _in_torch_names(ours)
        assert ours.keys() == theirs.keys()
        for name, g in theirs.items():
            torch.testing.assert_close(ours[name], g, rtol=1e-10, atol=1e-12)


def _in_torch_names(grads):
    """Per-example gradients (leading example dim) of a swapped model, named and packed as torch's
    MultiheadAttention holds its parameters (in_proj_* = the q, k, v projections stacked)."""
    out = {name: g for name, g in grads.items() if ".attention." not in name}
    for prefix in {name.split("attention.")[0] for name in grads if ".attention." in name}:
        ours = prefix + "attention."
        for kind in ("weight", "bias"):
            out[f"{prefix}in_proj_{kind}"] = torch.cat([grads[f"{ours}{p}_proj.{kind}"] for p in "qkv"], dim=1)
            out[f"{prefix}out_proj.{kind}"] = grads[f"{ours}out_proj.{kind}"]
    return out


class _TwoAttentions(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.first = nn.MultiheadAttention(E, H)
        self.blocks = nn.ModuleList([nn.Identity(), second])


def test_a_refused_module_is_named_and_nothing_is_swapped():
    """The first module had been replaced before the second was refused, and the error did not say which."""
    model = _TwoAttentions(nn.MultiheadAttention(E, H, kdim=16, vdim=16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="swap_attention: the module at 'blocks.1': .*kdim/vdim"):
        swap_attention(model, "favor")
    assert type(model.first) is nn.MultiheadAttention
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(TypeError, match="the module at 'first': .*num_feature"):
        swap_attention(_TwoAttentions(nn.MultiheadAttention(E, H)), "favor", num_features="many")


def test_a_swapped_module_reads_like_torchs():
    torch_mha = nn.MultiheadAttention(E, H, dropout=0.25, batch_first=True)
    drop_in = swap_attention(copy.deepcopy(torch_mha), "linear")
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "dropout", "batch_first", "bias_k",
                 "bias_v", "add_zero_attn", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "_qkv_same_embed_dim"):
        assert getattr(drop_in, name) == getattr(torch_mha, name), name


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unswap_gives_torchs_model_back_with_the_weights_trained_since(batch_first, mode):
    model = _encoder(batch_first)
    original = copy.deepcopy(model)
    swap_attention(model, "softmax")
    with torch.no_grad():  # "training" after the swap
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    getattr(model, mode)()
    x = _x(batch_first)
    expected = model(x, src_key_padding_mask=_pad())
    unswapped = unswap_attention(copy.deepcopy(model))
    attention = unswapped.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention and attention.batch_first is batch_first
    assert attention.training is (mode == "train")
    torch.testing.assert_close(unswapped(x, src_key_padding_mask=_pad()), expected, rtol=0, atol=1e-12)
    original.load_state_dict(unswapped.state_dict(), strict=True)  # torch's names: the unswapped model's format
    original.use_nested_tensor = False
    original.train(mode == "train")
    torch.testing.assert_close(original(x, src_key_padding_mask=_pad()), expected, rtol=0, atol=1e-12)


def test_unswap_keeps_frozen_bias_free_shared_and_refuses_causal_by_name():
    shared = nn.MultiheadAttention(E, H, bias=False, dtype=F64)
    shared.out_proj.weight.requires_grad_(False)
    model = nn.ModuleDict({"a": shared, "b": shared})
    swap_attention(model, "favor")
    unswap_attention(model)
    assert model["a"] is model["b"] and type(model["a"]) is nn.MultiheadAttention
    assert model["a"].in_proj_bias is None and model["a"].in_proj_weight.dtype == F64
    assert not model["a"].out_proj.weight.requires_grad and model["a"].in_proj_weight.requires_grad
    single = unswap_attention(swap_attention(nn.MultiheadAttention(E, H), "linear"))
    assert type(single) is nn.MultiheadAttention
    causal = nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "b": nn.MultiheadAttention(E, H)})
    swap_attention(causal, "linear", causal=True)
    with pytest.raises(ValueError, match="unswap_attention: the module at 'a': .*causal=False"):
        unswap_attention(causal)
    assert all(type(m) is DropInMultiheadAttention for m in causal.values())


def test_the_packages_own_attention_modules_change_kind_too():
    """swap_attention(CharTransformer, "favor") had returned the model unchanged, silently."""
    from theorylab.experiments import CharLMConfig, CharTransformer

    torch.manual_seed(0)
    config = CharLMConfig(seq_len=16, layers=2, width=16, heads=2, batch_size=4, num_features=8, warmup=1)
    model = CharTransformer(20, config).double()
    model.blocks[1].attn.q_proj.weight.requires_grad_(False)
    x = torch.randint(0, 20, (2, 16))
    expected = model(x)
    swap_attention(model, "favor", seed=3)
    assert [type(b.attn) for b in model.blocks] == [MultiheadAttention] * 2
    assert [b.attn.kind for b in model.blocks] == ["favor", "favor"] and model.blocks[0].attn.causal
    assert not model.blocks[1].attn.q_proj.weight.requires_grad and model.blocks[0].attn.q_proj.weight.dtype == F64
    assert (model(x) - expected).abs().max() > 1e-3  # another attention
    swap_attention(model, "softmax")  # the projections went along: back to the same model
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    single = MultiheadAttention(E, H, kind="softmax", causal=True).eval()
    swapped = swap_attention(single, "linear")
    assert type(swapped) is MultiheadAttention and swapped.kind == "linear" and not swapped.training
