"""Tests written from mutation testing of the attention package (features, exact, multihead, _checks): each pins
a documented behaviour that a small plausible change of the code left unchecked by the rest of the suite."""

import math

import pytest
import torch
from attention_helpers import qkv

from theorylab.attention import (
    MultiheadAttention,
    PositiveRandomFeatures,
    ReluFeatures,
    TrigRandomFeatures,
    linear_attention,
    softmax_attention,
)
from theorylab.attention._checks import (
    ChunkOutputs,
    accumulation_dtype,
    check_qkv,
    positive_int,
    safe_divide,
)
from theorylab.attention.exact import softmax_attention_reference
from theorylab.attention.features import gaussian_orthogonal_random_matrix, gaussian_random_matrix

# --- _checks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [True, False])
def test_positive_int_refuses_a_bool(flag):
    """A bool is not an integer argument: chunk_size=True must be a TypeError, not a chunk of 1."""
    with pytest.raises(TypeError, match="positive integer"):
        positive_int(flag, what="chunk_size", name="f")
    q, k, v = qkv(B=1, H=1, Nq=4, D=2)
    with pytest.raises(TypeError, match="chunk_size"):
        linear_attention(q, k, v, ReluFeatures(2), chunk_size=flag)


def test_values_with_another_batch_or_head_count_are_refused():
    """v must share q's (B, H): a v of batch 1 (or one head) is a ValueError, not broadcast silently."""
    q, k, v = qkv(B=2, H=3, Nq=5, D=4)
    for bad in (v[:1], v[:, :1]):
        with pytest.raises(ValueError, match="batch and head dimensions differ"):
            softmax_attention(q, k, bad)


def test_check_qkv_returns_the_value_head_dim():
    """check_qkv returns (B, H, Nq, Nk, D, Dv) with Dv the last dimension of v, not D."""
    q, k, v = qkv(B=2, H=3, Nq=5, Nk=7, D=4, Dv=6)
    assert check_qkv(q, k, v, None, name="t") == (2, 3, 5, 7, 4, 6)


def test_safe_divide_threshold_is_the_square_root_of_the_smallest_normal():
    """safe_divide gives 0 for |den| <= sqrt(tiny) (~1.1e-19 in float32), divides above it, negative den too."""
    tiny_sqrt = torch.finfo(torch.float32).tiny ** 0.5  # ~1.08e-19
    num = torch.ones(4)
    den = torch.tensor([1e-30, -1e-30, 4 * tiny_sqrt, -2.0])
    out = safe_divide(num, den)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1 / (4 * tiny_sqrt), -0.5]))


def test_safe_divide_gradients_stay_finite_near_zero():
    """The gradient of safe_divide is finite (and 0) for a denominator below sqrt(tiny): den² does not underflow."""
    num = torch.tensor([1.0], requires_grad=True)
    den = torch.tensor([1e-25], requires_grad=True)
    safe_divide(num, den).sum().backward()
    assert num.grad.item() == 0.0 and den.grad.item() == 0.0


def test_trig_attention_divides_by_a_negative_normaliser():
    """Trigonometric features can make a normaliser negative: the output is still num / den, not zero."""
    torch.manual_seed(0)
    fm = TrigRandomFeatures(2, 2, seed=3, scale=1.0).double()
    q, k, v = qkv(B=1, H=1, Nq=6, D=2, Dv=3, seed=4, scale=2.0)
    qf, kf = fm(q), fm(k)
    den = (qf @ kf.mT).sum(-1, keepdim=True)
    assert (den < 0).any()  # the case under test happens for these inputs
    expected = (qf @ kf.mT) @ v / den
    torch.testing.assert_close(linear_attention(q, k, v, fm), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulation_dtype_is_float32_for_half_inputs(dtype):
    """Half-precision inputs accumulate in float32; float64 anywhere makes it float64."""
    assert accumulation_dtype(dtype) == torch.float32
    assert accumulation_dtype(dtype, dtype) == torch.float32
    assert accumulation_dtype(dtype, torch.float64) == torch.float64


def test_chunk_outputs_write_in_place_without_autograd_and_concatenate_with_it():
    """ChunkOutputs preallocates one output under no_grad (written in place), and concatenates under autograd."""
    like = torch.zeros(1, 1, 4, 2)
    with torch.no_grad():
        co = ChunkOutputs(like, (1, 1, 4, 2))
        assert co.out is not None
        ptr = co.out.data_ptr()
        co.write(0, 2, torch.ones(1, 1, 2, 2))
        co.write(2, 4, 2 * torch.ones(1, 1, 2, 2))
        res = co.result()
        assert res.data_ptr() == ptr
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    co = ChunkOutputs(like, (1, 1, 4, 2))
    assert co.out is None
    co.write(0, 2, x)
    co.write(2, 4, 2 * x)
    res2 = co.result()
    assert type(res2.grad_fn).__name__.startswith("Cat")
    torch.testing.assert_close(res, res2.detach())


def test_chunk_outputs_without_parts_are_zeros():
    """ChunkOutputs.result() with no chunk written (autograd on) is zeros of the shape, not a torch.cat error."""
    co = ChunkOutputs(torch.ones(1), (2, 1, 0, 3))
    assert co.result().shape == (2, 1, 0, 3)


# --- features --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
def test_random_features_refuse_a_bool_seed(cls):
    """seed=True is a TypeError (a bool is not a seed), as documented."""
    with pytest.raises(TypeError, match="seed"):
        cls(4, 8, seed=True)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_relu_features_validate_head_dim(bad, error):
    """ReluFeatures(head_dim) refuses a non-positive or non-integer head_dim, as EluFeatures does."""
    with pytest.raises(error, match="ReluFeatures"):
        ReluFeatures(bad)


def test_random_features_default_orthogonality():
    """PositiveRandomFeatures default to orthogonal ω, TrigRandomFeatures to i.i.d. Gaussian ω (the documented
    defaults): the seeded projections are exactly those of the matching draw."""
    pos = PositiveRandomFeatures(4, 8, seed=5)
    assert pos.orthogonal is True
    expected = gaussian_orthogonal_random_matrix(8, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(pos.projection, expected, atol=0, rtol=0)
    trig = TrigRandomFeatures(4, 8, seed=5)
    assert trig.orthogonal is False
    expected = gaussian_random_matrix(4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(trig.projection, expected, atol=0, rtol=0)


@pytest.mark.parametrize("make, width", [(lambda: PositiveRandomFeatures(4, 8, seed=0), 8),
                                         (lambda: TrigRandomFeatures(4, 8, seed=0), 8),
                                         (lambda: ReluFeatures(4), 4)])
def test_num_features_is_the_width_of_the_features(make, width):
    """num_features is M, the last dimension of φ(x) (for trigonometric maps: sin and cos, twice the frequencies)."""
    fm = make()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert fm.num_features == fm(x).shape[-1] == width


def test_orthogonal_flag_is_stored_as_a_bool():
    """orthogonal is stored as a bool whatever truthy value was passed (repr and attribute say True/False)."""
    fm = PositiveRandomFeatures(4, 8, orthogonal=1, seed=0)
    assert fm.orthogonal is True and "orthogonal=True" in repr(fm)
    assert TrigRandomFeatures(4, 8, orthogonal=0, seed=0).orthogonal is False


def test_gaussian_random_matrix_draws_the_same_numbers_in_every_dtype():
    """gaussian_random_matrix draws in float64 then casts: the float32 matrix is the float64 one rounded."""
    a = gaussian_random_matrix(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    b = gaussian_random_matrix(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(a, b.float(), atol=0, rtol=0)


# --- exact -----------------------------------------------------------------------------------------------------


def test_reference_with_scale_zero_is_uniform_attention():
    """scale=0.0 is a valid finite scale: uniform weights (the mean of v), in the reference as in the SDPA path."""
    q, k, v = qkv(B=1, H=2, Nq=5, Nk=7, D=4)
    expected = v.mean(dim=2, keepdim=True).expand(1, 2, 5, 4)
    torch.testing.assert_close(softmax_attention_reference(q, k, v, scale=0.0), expected)
    torch.testing.assert_close(softmax_attention(q, k, v, scale=0.0), expected)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_reference_ignores_nonfinite_padded_keys_and_values(bad):
    """The naive reference ignores padded keys whatever they hold (inf/NaN): it equals attention over the rest."""
    q, k, v = qkv(B=1, H=2, Nq=5, Nk=7, D=4)
    k, v = k.clone(), v.clone()
    k[:, :, 5:], v[:, :, 5:] = bad, bad
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, 5:] = True
    out = softmax_attention_reference(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, softmax_attention_reference(q, k[:, :, :5], v[:, :, :5]))


@pytest.mark.parametrize("scale", [math.inf, -math.inf])
def test_an_infinite_scale_is_a_value_error(scale):
    """scale must be finite: ±inf is a ValueError in softmax_attention and its reference, not NaN outputs."""
    q, k, v = qkv(B=1, H=1, Nq=3, D=2)
    for fn in (softmax_attention, softmax_attention_reference):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fn(q, k, v, scale=scale)


# --- multihead -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear"])
def test_num_features_is_validated_for_every_kind(kind):
    """num_features <= 0 is a ValueError whatever the kind (not only for "favor", which uses it)."""
    with pytest.raises(ValueError, match="num_features must be positive"):
        MultiheadAttention(8, 2, kind=kind, num_features=0)


def test_dropout_of_one_is_refused():
    """dropout must lie in [0, 1): 1.0 (which would zero every output) is a ValueError."""
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MultiheadAttention(8, 2, dropout=1.0)


def test_bias_false_removes_every_bias_and_biases_start_at_zero():
    """bias=False leaves no bias in any of the four projections; with bias=True they all start at zero."""
    mha = MultiheadAttention(8, 2, bias=False)
    assert all(p.bias is None for p in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj))
    assert len(list(mha.parameters())) == 4
    torch.manual_seed(0)
    mha = MultiheadAttention(8, 2)
    for p in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj):
        assert torch.count_nonzero(p.bias) == 0


def _sdpa_nan_on_fully_masked_rows(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Plain SDPA as torch < 2.5 (and some backends) computed it: NaN in a row whose keys are all masked out."""
    assert not is_causal
    s = (q @ k.mT) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_are_zeros_even_where_sdpa_gives_nan(monkeypatch, causal):
    """softmax_attention never hands SDPA a row with no key (it would be NaN there), and zeros such rows."""
    from types import SimpleNamespace

    from theorylab.attention import exact

    monkeypatch.setattr(exact, "F", SimpleNamespace(scaled_dot_product_attention=_sdpa_nan_on_fully_masked_rows))
    q, k, v = (x.requires_grad_(True) for x in qkv(B=2, H=2, Nq=4, Nk=5, D=3))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0] = True  # batch 0 sees no key at all
    mask[1, :2] = True  # batch 1, causal: queries 0 and 1 see no key
    out = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    expected = softmax_attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, expected)
    assert (out[0] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("kind", ["separable", "linear", "favor"])
def test_chunk_size_and_recompute_reach_the_attention_function(monkeypatch, kind):
    """MultiheadAttention passes its chunk_size (and recompute, for the linear kinds) on to the kernel it calls."""
    from theorylab.attention import multihead

    seen = {}
    fn = "separable_attention" if kind == "separable" else "linear_attention"
    real = getattr(multihead, fn)

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(multihead, fn, spy)
    recompute = kind != "separable"
    mha = MultiheadAttention(8, 2, kind=kind, causal=True, num_features=8, seed=0, chunk_size=3,
                             recompute=recompute)
    mha(torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(0)))
    assert seen["chunk_size"] == 3
    if recompute:
        assert seen["recompute"] is True


def test_favor_seed_fixes_the_features_whatever_the_global_rng():
    """kind="favor" with a seed draws the same random features whatever torch's global generator holds."""
    torch.manual_seed(0)
    a = MultiheadAttention(8, 2, kind="favor", num_features=8, seed=3)
    torch.manual_seed(1)
    b = MultiheadAttention(8, 2, kind="favor", num_features=8, seed=3)
    assert a.feature_map.seed == 3
    torch.testing.assert_close(a.feature_map.projection, b.feature_map.projection, atol=0, rtol=0)


def test_linear_kind_feature_map_knows_the_head_dim():
    """kind="linear" builds EluFeatures for the head dim D = E / H (head_dim and num_features = D)."""
    fm = MultiheadAttention(12, 3, kind="linear").feature_map
    assert fm.head_dim == 4 and fm.num_features == 4
