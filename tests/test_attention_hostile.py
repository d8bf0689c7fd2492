"""Hostile inputs for the attention package: extreme scales, empty sequences, wrong dtypes and arguments.

Each test pins a reproduced bug: the fast paths are compared with the float64 references of the package
(``linear_attention_log_reference`` where the plain reference would overflow), outputs and gradients."""

import math
from fractions import Fraction

import pytest
import torch
from attention_helpers import assert_same_outputs_and_grads, needs_cxx_compiler, padding_mask, qkv

from theorylab.attention import (
    EluFeatures,
    MultiheadAttention,
    PositiveRandomFeatures,
    ReluFeatures,
    TrigRandomFeatures,
    linear,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.attention.exact import softmax_attention_reference
from theorylab.attention.linear import linear_attention_log_reference, linear_attention_reference
from theorylab.attention.separable import separable_attention_reference
from theorylab.cost import peak_memory

# --- FAVOR+ at any scale -------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e5, 1e12, 1e18, 1e25])
@pytest.mark.parametrize("causal", [False, True])
def test_favor_one_key_of_any_norm_returns_its_value(magnitude, causal):
    """With one key the output is its value, whatever the key's norm (1e5 gave NaN; 1e25 overflows |k|² in
    float32, which is then computed in float64)."""
    fm = PositiveRandomFeatures(2, 8, seed=0)
    q = torch.zeros(1, 1, 1, 2)
    k = torch.tensor([[[[magnitude, 0.3 * magnitude]]]], requires_grad=True)
    v = torch.tensor([[[[1.0, 2.0]]]])
    out = linear_attention(q, k, v, fm, causal=causal)
    torch.testing.assert_close(out, v)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))  # the output does not depend on the key


def test_favor_float32_small_case_matches_the_exact_log_domain_value():
    """float32 gave [0, 0.0017]; the exact value is [2e-120, 1]."""
    fm = PositiveRandomFeatures(2, 8, seed=0)
    q = torch.tensor([[[[31.0, -6.0]]]])
    k = torch.tensor([[[[-44.0, 11.0], [-22.0, -28.0]]]])
    v = torch.eye(2)[None, None]
    exact = linear_attention_log_reference(q.double(), k.double(), v.double(), fm.double())
    for causal_q in (q, torch.cat([q, q], dim=2)):  # non-causal, and causal with the query repeated
        causal = causal_q.shape[2] == 2
        out = linear_attention(causal_q, k, v, fm.float(), causal=causal)
        ref = linear_attention_log_reference(causal_q.double(), k.double(), v.double(), fm.double(), causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    assert exact[0, 0, 0, 1] == pytest.approx(1.0) and exact[0, 0, 0, 0] < 1e-100


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("scale", [30.0, 1000.0])
def test_favor_large_inputs_equal_the_log_domain_reference_outputs_and_grads(causal, chunk_size, scale):
    """One stabiliser per key row cannot serve queries whose dominant (key, feature) pair differs: in float32 at
    scale 100, 69% (78% causal) of the rows were exactly 0; in float64 the same happens at scale 1000.
    float64, so the comparison is tight."""
    q, k, v = qkv(B=1, H=2, Nq=16, D=8, scale=scale)
    fm = PositiveRandomFeatures(8, 32, seed=0).double()
    mask = padding_mask(1, 16)

    def fast(q, k, v):
        return linear_attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk_size)

    def ref(q, k, v):
        return linear_attention_log_reference(q, k, v, fm, causal=causal, key_padding_mask=mask)

    assert_same_outputs_and_grads(fast, ref, (q, k, v), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_large_inputs_float32_no_lost_rows(causal):
    q, k, v = qkv(B=1, H=2, Nq=16, D=8, scale=100.0, dtype=torch.float32)
    fm = PositiveRandomFeatures(8, 32, seed=0)
    out = linear_attention(q, k, v, fm, causal=causal)
    ref = linear_attention_log_reference(q.double(), k.double(), v.double(), fm.double(), causal=causal)
    assert (out.abs().sum(-1) > 0).all()
    # |k'|²/2 ~ 1e4 here, so float32 rounding of the inputs alone moves the log-weights by ~1e-3
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("last", [0, 5, 9])  # the rise in the first chunk (no state yet), the second, the third
@pytest.mark.parametrize("blocks", ["one", "per chunk"])
@pytest.mark.parametrize("num_features", [16, 1])
def test_causal_chunks_with_a_steep_rise_are_redone_per_query(monkeypatch, last, blocks, num_features):
    """Keys 0..last of large norm (log-features ~ -|k'|²/2 = -3000), then ordinary ones: the column maxima rise
    by ~3000 at key last + 1, so the chunk-end reference would underflow the earlier queries' weights; such
    chunks go through the per-query path, and match the reference, wherever the chunk lies in its block. One
    feature (one column, as a row-scaled map has) raised TypeError in that path: it took the row-scaled branch."""
    calls = []
    original = linear._chunk_per_query
    monkeypatch.setattr(linear, "_chunk_per_query", lambda *a: calls.append(1) or original(*a))
    if blocks == "per chunk":  # a block of one chunk: the state crosses blocks between any two chunks
        monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1)
    q, k, v = qkv(B=2, H=2, Nq=12, D=4)
    k[:, :, : last + 1] = k[:, :, : last + 1] / k[:, :, : last + 1].norm(dim=-1, keepdim=True) * 110.0
    fm = PositiveRandomFeatures(4, num_features, seed=0).double()
    assert_same_outputs_and_grads(
        lambda q, k, v: linear_attention(q, k, v, fm, causal=True, chunk_size=4),
        lambda q, k, v: linear_attention_log_reference(q, k, v, fm, causal=True), (q, k, v))
    assert calls


# --- elu + 1 -------------------------------------------------------------------------------------------------


def test_elu_features_do_not_round_to_zero():
    x = torch.tensor([-20.0, -80.0, 0.0, 3.0])
    expected = torch.tensor([math.exp(-20), math.exp(-80), 1.0, 4.0])
    torch.testing.assert_close(EluFeatures(4)(x), expected, atol=0, rtol=1e-6)


def test_elu_features_gradient_is_finite_and_exact_at_extremes():
    x = torch.tensor([-1e4, -20.0, -1.0, 0.0, 1.0, 100.0, 1e4], dtype=torch.float64, requires_grad=True)
    EluFeatures()(x).sum().backward()
    expected = torch.where(x > 0, 1.0, torch.exp(x.detach()))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_elu_features_without_where_are_the_piecewise_formula_bit_for_bit(dtype):
    """relu(x) + exp(x - relu(x)) (6× faster than the two torch.where it replaced): x + 1 above 0, exp(x) below,
    every value and gradient of the old form's (but at NaN, below), gradient 1 at ±0, second derivatives by
    autograd."""
    finfo = torch.finfo(dtype)
    x = torch.cat([torch.linspace(-150, 30, 50001, dtype=torch.float64).to(dtype),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, finfo.max, finfo.min, math.inf, -math.inf], dtype=dtype)])
    positive = x > 0
    expected = torch.where(positive, x + 1.0, torch.exp(torch.where(positive, 0.0, x)))
    assert torch.equal(EluFeatures()(x), expected)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    EluFeatures()(xa).sum().backward()
    torch.where(xb > 0, xb + 1.0, torch.exp(torch.where(xb > 0, 0.0, xb))).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    nan = torch.tensor([math.nan], dtype=dtype, requires_grad=True)
    out = EluFeatures()(nan)
    assert torch.isnan(out).all()
    out.backward(torch.full_like(out, 0.5))
    assert nan.grad.item() == 0.5  # relu's gradient passes; the where form's was NaN (a decision: see forward)
    z = torch.tensor([0.0, -0.0, -3.0, 2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(EluFeatures()(z).sum(), z, create_graph=True)
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.0, math.exp(-3.0), 1.0], dtype=torch.float64))
    assert torch.autograd.gradgradcheck(EluFeatures(), (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("causal", [False, True])
def test_elu_attention_for_very_negative_queries_equals_reference(causal):
    """elu(x) + 1 rounded to 0 for x < -17, and the whole output with it."""
    q, k, v = qkv(B=1, H=1, Nq=3, D=4, dtype=torch.float32)
    q = torch.full_like(q, -20.0)
    out = linear_attention(q, k, v, EluFeatures(4), causal=causal)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), EluFeatures(4), causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# --- trigonometric features --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_trig_features_at_norm_ten_equal_the_float64_reference(causal):
    """exp(|x'|²/2) overflowed float32 at |x| ~ 10 and the output came back as silent zeros."""
    torch.manual_seed(0)
    q, k, v = qkv(B=1, H=1, Nq=6, D=4, dtype=torch.float32, scale=10.0)
    fm = TrigRandomFeatures(4, 64, seed=0)
    out = linear_attention(q, k, v, fm, causal=causal, chunk_size=2)
    ref = linear_attention_reference(q.double(), k.double(), v.double(), fm.double(), causal=causal)
    assert ref.abs().amax() > 0.1  # the reference itself is well away from 0
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_trig_features_gradients_match_the_reference_at_norm_ten(causal):
    """float32 through the fast path, float64 through the reference (which does not overflow at this norm)."""
    q, k, v = qkv(B=1, H=2, Nq=8, D=4, scale=10.0)
    fm = TrigRandomFeatures(4, 32, seed=1)
    fm64 = TrigRandomFeatures(4, 32, seed=1).double()

    def fast(q, k, v):
        return linear_attention(q.float(), k.float(), v.float(), fm, causal=causal, chunk_size=3).double()

    assert_same_outputs_and_grads(
        fast, lambda q, k, v: linear_attention_reference(q, k, v, fm64, causal=causal), (q, k, v),
        atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded_value", [1e30, float("inf"), float("nan")])
def test_padded_keys_of_any_value_do_not_change_the_output(causal, padded_value):
    """Padded keys are removed, so their values (even inf or NaN, or large enough to switch an unpadded call to
    float64) leave the output and its dtype as with zeros there."""
    q, k, v = qkv(B=2, H=2, Nq=8, D=4, dtype=torch.float32)
    mask = padding_mask(2, 8)
    fm = PositiveRandomFeatures(4, 16, seed=0)
    clean = linear_attention(q, k.masked_fill(mask[:, None, :, None], 0.0), v, fm, causal=causal,
                             key_padding_mask=mask)
    hostile = linear_attention(q, k.masked_fill(mask[:, None, :, None], padded_value), v, fm, causal=causal,
                               key_padding_mask=mask)
    assert hostile.dtype == torch.float32
    torch.testing.assert_close(hostile, clean, atol=1e-6, rtol=1e-5)


def test_a_large_unpadded_key_beside_an_inf_padded_one_is_computed_in_float64():
    """The whole-tensor check sees the padded inf; the per-row check that follows must still find the unpadded
    key whose |k|² overflows float32 (it then returns its value, as in the one-key case)."""
    fm = PositiveRandomFeatures(2, 8, seed=0)
    q = torch.zeros(1, 1, 1, 2)
    k = torch.tensor([[[[1e25, 3e24], [float("inf"), 0.0]]]])
    v = torch.tensor([[[[1.0, 2.0], [5.0, 5.0]]]])
    out = linear_attention(q, k, v, fm, key_padding_mask=torch.tensor([[False, True]]))
    torch.testing.assert_close(out, v[:, :, :1])


@pytest.mark.parametrize("fm", [TrigRandomFeatures(2, 8, seed=0), PositiveRandomFeatures(2, 8, seed=0)],
                         ids=["trig", "favor"])
def test_inputs_whose_log_scale_overflows_float64_raise(fm):
    q = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    k = torch.tensor([[[[1e160, 0.0]]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="overflows even float64"):
        linear_attention(q, k, torch.ones(1, 1, 1, 2, dtype=torch.float64), fm.double())


# --- empty sequences ---------------------------------------------------------------------------------------

KINDS = {
    "softmax": lambda q, k, v, **kw: softmax_attention(q, k, v, **kw),
    "separable": lambda q, k, v, **kw: separable_attention(q, k, v, **kw),
    "favor": lambda q, k, v, **kw: linear_attention(q, k, v, PositiveRandomFeatures(4, 8, seed=0), **kw),
    "trig": lambda q, k, v, **kw: linear_attention(q, k, v, TrigRandomFeatures(4, 8, seed=0), **kw),
    "elu": lambda q, k, v, **kw: linear_attention(q, k, v, EluFeatures(4), **kw),
    "relu": lambda q, k, v, **kw: linear_attention(q, k, v, ReluFeatures(4), **kw),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("B, Nq, Nk, causal", [(2, 5, 0, False), (2, 0, 0, True), (0, 5, 5, True),
                                               (0, 5, 5, False), (2, 0, 3, False)])
def test_empty_inputs_give_zeros_of_the_right_shape_and_zero_grads(kind, B, Nq, Nk, causal):
    q = torch.randn(B, 2, Nq, 4, requires_grad=True)
    k = torch.randn(B, 2, Nk, 4, requires_grad=True)
    v = torch.randn(B, 2, Nk, 3, requires_grad=True)
    out = KINDS[kind](q, k, v, causal=causal)
    assert out.shape == (B, 2, Nq, 3) and out.dtype == q.dtype
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_empty_sequence(kind, causal):
    mha = MultiheadAttention(8, 2, kind=kind, causal=causal, num_features=8, seed=0)
    assert mha(torch.randn(2, 0, 8)).shape == (2, 0, 8)
    if not causal:  # cross attention to an empty memory: zeros through the output projection (its bias)
        out = mha(torch.randn(2, 3, 8), torch.randn(2, 0, 8))
        torch.testing.assert_close(out, mha.out_proj.bias.expand(2, 3, 8))


# --- separable attention: keys below the old floor of -1e30 --------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 32])
@pytest.mark.parametrize("level", [-1e31, -1e37, -3e38])
def test_separable_causal_keys_far_below_minus_1e30(chunk_size, level):
    q, k, v = qkv(B=1, H=2, Nq=7, D=3, dtype=torch.float32)
    k = torch.full_like(k, level) + k.abs() * (-level * 1e-3)  # every key huge and negative, distinct
    out = separable_attention(q, k, v, causal=True, chunk_size=chunk_size)
    ref = separable_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert (out.abs().sum(-1) > 0).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, separable_attention(q, k, v, causal=True, chunk_size=7), atol=1e-6, rtol=0)


# --- dtypes and arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_inputs_raise_a_type_error_naming_the_dtype(kind, dtype):
    q = torch.ones(1, 1, 3, 4).to(dtype)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        KINDS[kind](q, q, q)
    with pytest.raises(TypeError, match="must be floating point"):  # one integer tensor among floats
        KINDS[kind](torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), q)


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan"), float("inf")])
def test_random_features_reject_a_bad_scale(cls, scale):
    with pytest.raises(ValueError, match=f"scale must be a positive finite number; got {scale!r}"):
        cls(4, 8, scale=scale)


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
@pytest.mark.parametrize("scale", [Fraction(1, 10**400), 10**400, -(10**400)],
                         ids=["tiny-fraction", "huge-int", "huge-negative-int"])
def test_random_features_check_the_scale_they_will_use(cls, scale):
    """A Fraction that is > 0 but rounds to 0.0 was accepted as scale 0.0; an int beyond float's range raised
    OverflowError."""
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        cls(4, 8, scale=scale)
    assert cls(4, 8, scale=Fraction(1, 4)).scale == 0.25


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
def test_random_features_reject_non_integer_sizes(cls):
    with pytest.raises(TypeError, match="num_features must be a positive integer; got 16.0"):
        cls(4, 16.0)
    with pytest.raises(TypeError, match="head_dim must be a positive integer; got 4.5"):
        cls(4.5, 16)
    with pytest.raises(TypeError, match="scale must be a positive finite number; got '1'"):
        cls(4, 16, scale="1")
    with pytest.raises(TypeError, match="seed"):
        cls(4, 16, seed=1.5)
    assert cls(4, 16, scale=2).scale == 2.0


@pytest.mark.parametrize("fn", [
    lambda q, chunk: linear_attention(q, q, q, EluFeatures(4), causal=True, chunk_size=chunk),
    lambda q, chunk: linear_attention(q, q, q, PositiveRandomFeatures(4, 8, seed=0), chunk_size=chunk),
    lambda q, chunk: separable_attention(q, q, q, causal=True, chunk_size=chunk),
    lambda q, chunk: MultiheadAttention(4, 1, kind="linear", chunk_size=chunk)(q[0]),
], ids=["linear-causal", "linear", "separable", "multihead"])
def test_chunk_size_must_be_a_positive_integer(fn):
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer; got 2.5"):
        fn(q, 2.5)
    with pytest.raises(ValueError, match="chunk_size must be positive; got 0"):
        fn(q, 0)


def test_multihead_rejects_non_integer_sizes():
    with pytest.raises(TypeError, match="embed_dim must be a positive integer; got 8.0"):
        MultiheadAttention(8.0, 2)
    with pytest.raises(TypeError, match="num_features must be a positive integer; got 16.0"):
        MultiheadAttention(8, 2, kind="favor", num_features=16.0)


@needs_cxx_compiler
def test_compiled_causal_favor_is_exact_where_the_running_maximum_rises_steeply():
    """Under torch.compile the check for a steep rise still runs (a graph break, not a skipped check); when it was
    skipped, compiled output was 0.88 off on this input while eager was exact."""
    torch.manual_seed(0)
    fm = PositiveRandomFeatures(16, 32, seed=0)
    q, k, v = 2 * torch.randn(1, 1, 64, 16), 2 * torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 4)
    k[..., :3, :] *= 6  # large-norm keys first: the running key maximum then falls behind inside the chunk

    def fn(q, k, v):
        return linear_attention(q, k, v, fm, causal=True)

    ref = linear_attention_log_reference(q.double(), k.double(), v.double(), fm.double(), causal=True).float()
    fm.float()
    compiled = torch.compile(fn)(q, k, v)
    torch.testing.assert_close(compiled, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fn(q, k, v), ref, atol=1e-4, rtol=1e-4)


@needs_cxx_compiler
def test_compiled_causal_separable_never_sees_later_keys():
    """The separable kernel's steep-rise check was skipped under torch.compile: a key 100 above the earlier ones at
    position 5 zeroed the compiled outputs at positions 0-4 (eager and the reference were unchanged)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 2, generator=gen) for _ in range(3))
    later = k.clone()
    later[:, :, 5] += 100.0
    compiled = torch.compile(lambda q, k, v: separable_attention(q, k, v, causal=True))
    before, after = compiled(q, k, v), compiled(q, later, v)
    torch.testing.assert_close(after[:, :, :5], before[:, :, :5], atol=1e-6, rtol=1e-6)
    ref = separable_attention_reference(q.double(), later.double(), v.double(), causal=True).float()
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.compiler.is_exporting: torch >= 2.5")
@pytest.mark.parametrize("strict", [False, True])
def test_causal_separable_exports_and_stays_exact_for_keys_it_was_not_traced_with(strict):
    """The steep-rise check reads a value back, which torch.export can neither do nor break the graph for: the
    exported program takes the per-query path, which is right for any keys (a later key 100 higher here)."""

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return separable_attention(q, k, v, causal=True)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
    program = torch.export.export(Causal(), (q, k, v), strict=strict).module()
    steep = k.clone()
    steep[:, :, 40] += 100.0
    ref = separable_attention_reference(q.double(), steep.double(), v.double(), causal=True).float()
    torch.testing.assert_close(program(q, steep, v), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norm", [1e2, 1e6, 1e12, 1e18])
def test_favor_float32_keys_of_one_large_norm_match_the_log_domain_reference(seed, norm):
    """Keys of one norm differ only in ωᵀk (~|k|), which float32's rounding of -|k|²/2 (~|k|²) swamped: at norm
    1e6 the output was 3.2 off. Such inputs now run in float64 (FLOAT32_LOG_SCALE_ERROR)."""
    fm = PositiveRandomFeatures(8, 32, seed=0)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 16, d, generator=gen) for d in (8, 8, 3))
    q, k = (norm * x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    out = linear_attention(q, k, v, fm)
    ref = linear_attention_log_reference(q.double(), k.double(), v.double(), fm.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiny", [1e-9, 1e-10, 1e-15])
def test_relu_features_of_tiny_inputs_are_scale_free_in_float32(tiny, causal):
    """Relu attention does not change when q and k are scaled; at 1e-10 in float32 φ(q)ᵀΣφ(k) (~1e-20) fell under
    safe_divide's threshold and the output was 0. Each query's features are now scaled to max-abs 1 first."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=gen) for _ in range(3))
    fm = ReluFeatures()
    ref = linear_attention_reference(q.double(), k.double(), v.double(), fm, causal=causal)
    out = linear_attention(q * tiny, k * tiny, v, fm, causal=causal)
    visible = ref.abs().sum(-1) > 0  # a query whose relu features miss every key's gives 0 in both
    torch.testing.assert_close(out.double()[visible], ref[visible], atol=1e-5, rtol=1e-5)


def test_a_custom_map_that_returns_its_input_as_the_projection_leaves_q_and_k_alone():
    """The kernel added the offset in place to what log_features_rowwise returned: q and k were overwritten."""

    class IdentityLog(PositiveRandomFeatures):
        def log_features_rowwise(self, x):
            return x, -0.5 * (x * x).sum(-1) - 0.5 * math.log(self.num_features)

    fm = IdentityLog(3, 3, scale=1.0).double()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, d, dtype=torch.float64, generator=gen) for d in (3, 3, 2))
    q0, k0 = q.clone(), k.clone()
    for causal in (False, True):
        out = linear_attention(q, k, v, fm, causal=causal)
        assert torch.equal(q, q0) and torch.equal(k, k0)
        ref = linear_attention_reference(q, k, v, fm, causal=causal)
        torch.testing.assert_close(out, ref)
    q.requires_grad_()
    linear_attention(q, k, v, fm).sum().backward()  # had raised: "a view ... is being modified inplace"
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("fn", [softmax_attention, softmax_attention_reference])
def test_softmax_scale_of_any_real_type_is_a_float_or_a_value_error(fn):
    q = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fn(q, q, q, scale=Fraction(1, 3)), fn(q, q, q, scale=1 / 3))  # SDPA: TypeError
    for bad in (10**400, Fraction(10**400, 3), math.nan, True):  # 10**400 had raised OverflowError
        with pytest.raises(ValueError, match="scale must be a finite number or None"):
            fn(q, q, q, scale=bad)


_KINDS = {
    "softmax": lambda q, k, v, causal, mask: softmax_attention(q, k, v, causal=causal, key_padding_mask=mask),
    "separable": lambda q, k, v, causal, mask: separable_attention(q, k, v, causal=causal, key_padding_mask=mask,
                                                                   chunk_size=3),
    "favor": lambda q, k, v, causal, mask: linear_attention(q, k, v, PositiveRandomFeatures(4, 16, seed=0).double(),
                                                            causal=causal, key_padding_mask=mask, chunk_size=3),
    "elu": lambda q, k, v, causal, mask: linear_attention(q, k, v, EluFeatures(4), causal=causal,
                                                          key_padding_mask=mask, chunk_size=3),
    "trig": lambda q, k, v, causal, mask: linear_attention(q, k, v, TrigRandomFeatures(4, 16, seed=0).double(),
                                                           causal=causal, key_padding_mask=mask, chunk_size=3),
}


@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded_value", [float("inf"), float("-inf"), float("nan"), 1e308])
def test_padded_keys_and_values_of_any_value_change_neither_outputs_nor_gradients(kind, causal, padded_value):
    """Whatever sits in the padded keys and values: the outputs and the gradients of q, k and v are those with zeros
    there, and the gradient of a padded key or value is 0 (a weight of 0 times inf or NaN is NaN: before the fix,
    NaN padded values made every output NaN, in every kind; later, the random-feature maps still gave NaN in the
    padded keys' own gradient, because the mask came after the map)."""
    q, k, v = qkv(B=2, H=2, Nq=8, D=4)
    mask = padding_mask(2, 8)
    padded = mask[:, None, :, None]

    def run(fill):
        inputs = [q.clone(), k.masked_fill(padded, fill), v.masked_fill(padded, fill)]
        inputs = [x.requires_grad_(True) for x in inputs]
        out = _KINDS[kind](*inputs, causal, mask)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [out.detach()] + [x.grad for x in inputs]

    clean, hostile = run(0.0), run(padded_value)
    for a, b in zip(clean, hostile, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    for grad in hostile[2:]:
        assert not grad.masked_select(padded).any()


@pytest.mark.parametrize("kind", ["separable", "favor", "elu", "trig"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_kernels_keep_their_precision_under_autocast(kind, causal):
    """Under CPU bfloat16 autocast the kernels' own projections had run in bfloat16: trigonometric features were
    thousands off, non-causal FAVOR+ raised ("cannot be converted to BFloat16"), FAVOR+ causal was 0.06 off. They
    now turn autocast off inside and equal the float32 result; the gradients flow as without autocast."""
    q, k, v = (x * 2 for x in qkv(B=1, H=2, Nq=300, D=8, dtype=torch.float32))
    mask = torch.zeros(1, 300, dtype=torch.bool)
    mask[0, 250:] = True
    maps = {"favor": PositiveRandomFeatures(8, 12, seed=0), "elu": EluFeatures(8),
            "trig": TrigRandomFeatures(8, 12, seed=0)}

    def fn(q, k, v):
        if kind == "separable":
            return separable_attention(q, k, v, causal=causal, key_padding_mask=mask)
        return linear_attention(q, k, v, maps[kind], causal=causal, key_padding_mask=mask)

    plain, autocast = _output_and_grads(fn, q, k, v, False), _output_and_grads(fn, q, k, v, True)
    for a, b in zip(plain, autocast, strict=True):
        assert torch.equal(a, b)


def _output_and_grads(fn, q, k, v, autocast):
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*inputs)
    out.sum().backward()  # outside autocast, as torch recommends
    return [out.detach()] + [x.grad for x in inputs]


@pytest.mark.parametrize("kind", ["separable", "linear", "favor"])
def test_a_chunk_size_beyond_the_sequence_costs_nothing_extra(kind):
    """chunk_size=16384 on a 5-token input allocated (chunk, chunk) masks and padded chunks: 0.5-4.4 GiB, 11 s."""
    x = torch.randn(1, 5, 64)
    mha = MultiheadAttention(64, 4, kind=kind, causal=True, chunk_size=16384, num_features=32, seed=0)
    small = MultiheadAttention(64, 4, kind=kind, causal=True, chunk_size=5, num_features=32, seed=0)
    small.load_state_dict(mha.state_dict())
    with torch.no_grad():
        assert peak_memory(mha, x) < 1 << 20
        torch.testing.assert_close(mha(x), small(x), atol=1e-6, rtol=1e-6)


def test_causal_separable_attention_runs_on_meta_tensors_for_flop_counting():
    from theorylab.cost import count_flops

    real = [torch.randn(1, 2, 64, 8) for _ in range(3)]
    meta = [t.to("meta") for t in real]
    fn = lambda q, k, v: separable_attention(q, k, v, causal=True)  # noqa: E731
    assert count_flops(fn, *meta) == count_flops(fn, *real) > 0


def test_small_argument_slips_are_named():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="scale must be a finite number or None; got nan"):
        softmax_attention(q, q, q, scale=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool; got 'False'"):
        MultiheadAttention(8, 2, causal="False")
    assert "chunk_size=16" in repr(MultiheadAttention(8, 2, kind="linear", chunk_size=16))
    # zero head dim (causal separable raised in amax) and no keys in the separable reference (IndexError)
    assert separable_attention(q[..., :0], q[..., :0], q, causal=True).shape == (1, 1, 3, 4)
    empty = separable_attention_reference(q, q[:, :, :0], q[:, :, :0])
    assert empty.shape == (1, 1, 3, 4) and not empty.any()
