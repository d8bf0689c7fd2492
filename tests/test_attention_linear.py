import pytest
import torch
from attention_helpers import assert_same_outputs_and_grads, needs_cxx_compiler, padding_mask, qkv

from theorylab.attention import (
    EluFeatures,
    PositiveRandomFeatures,
    ReluFeatures,
    TrigRandomFeatures,
    linear_attention,
    softmax_attention,
)
from theorylab.attention.linear import linear_attention_log_reference, linear_attention_reference
from theorylab.cost import peak_memory

FEATURE_MAPS = {
    "favor": lambda D: PositiveRandomFeatures(D, 24, seed=0),
    "favor-iid": lambda D: PositiveRandomFeatures(D, 12, orthogonal=False, seed=1),
    "trig": lambda D: TrigRandomFeatures(D, 16, seed=2),
    "elu": lambda D: EluFeatures(D),
    "relu": lambda D: ReluFeatures(D),
}


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_equals_reference_outputs_and_grads(name, causal, masked, chunk_size):
    q, k, v = qkv(Nq=21, Dv=5)
    fm = FEATURE_MAPS[name](8).double()
    mask = padding_mask(2, 21) if masked else None

    def fast(q, k, v):
        return linear_attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk_size)

    def ref(q, k, v):
        return linear_attention_reference(q, k, v, fm, causal=causal, key_padding_mask=mask)

    atol = 1e-8 if name == "trig" else 1e-10  # trig features are not positive: the normaliser can be small
    assert_same_outputs_and_grads(fast, ref, (q, k, v), atol=atol, rtol=1e-7)


class _BiasedFeatures(PositiveRandomFeatures):
    """log φ_r(x) = ωᵣᵀx' + b_r - |x'|²/2 - log(M)/2: overrides log_features_rowwise (still positive, still
    separable in the log domain), so ``project`` alone is not what its queries need."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("bias", torch.linspace(-2.0, 2.0, self.num_features))

    def log_features_rowwise(self, x):
        proj, offset = super().log_features_rowwise(x)
        return proj + self.bias.to(x.dtype), offset


class _DuckFeatures(torch.nn.Module):
    """Not a PositiveRandomFeatures: log_features_rowwise, and an unrelated submodule named ``project``."""

    def __init__(self, D, M):
        super().__init__()
        self.inner, self.num_features = PositiveRandomFeatures(D, M, seed=3), M
        self.project = torch.nn.Linear(D, M)

    def log_features_rowwise(self, x):
        proj, offset = self.inner.log_features_rowwise(x)
        return proj + 0.5 * torch.sin(x.sum(-1, keepdim=True)), offset

    def forward(self, x):
        proj, offset = self.log_features_rowwise(x)
        return torch.exp(proj + offset[..., None])


@pytest.mark.parametrize("fm", [_BiasedFeatures(4, 16, seed=0), _DuckFeatures(4, 16)], ids=["subclass", "duck"])
@pytest.mark.parametrize("causal", [False, True])
def test_custom_log_feature_maps_are_used_for_queries_too(fm, causal):
    """The queries' shortcut (``project``, skipping the offset that cancels) is taken for the stock map only:
    taken for a map that overrides log_features_rowwise, it was 0.12 off (0.15 causal)."""
    q, k, v = qkv(Nq=9, D=4)
    fm = fm.double()
    assert_same_outputs_and_grads(
        lambda q, k, v: linear_attention(q, k, v, fm, causal=causal, chunk_size=4),
        lambda q, k, v: linear_attention_reference(q, k, v, fm, causal=causal), (q, k, v))


@pytest.mark.parametrize("name", ["favor", "elu"])
def test_cross_attention(name):
    q, k, v = qkv(Nq=6, Nk=31)
    fm = FEATURE_MAPS[name](8).double()
    mask = padding_mask(2, 31)
    assert_same_outputs_and_grads(
        lambda q, k, v: linear_attention(q, k, v, fm, key_padding_mask=mask, chunk_size=8),
        lambda q, k, v: linear_attention_reference(q, k, v, fm, key_padding_mask=mask), (q, k, v))


@pytest.mark.parametrize("name", ["favor", "elu"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_equals_truncation_whatever_the_padded_values(name, causal):
    q, k, v = qkv(B=1, Nq=20)
    fm = FEATURE_MAPS[name](8).double()
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 13:] = True
    k2, v2 = k.clone(), v.clone()
    k2[..., 13:, :] = 1e3  # huge padded keys: would set a global stabiliser and underflow every real key
    v2[..., 13:, :] = -1e6
    out = linear_attention(q, k2, v2, fm, causal=causal, key_padding_mask=mask, chunk_size=6)
    if causal:
        trunc = linear_attention(q[..., :13, :], k[..., :13, :], v[..., :13, :], fm, causal=True, chunk_size=6)
        torch.testing.assert_close(out[..., :13, :], trunc, atol=1e-12, rtol=1e-10)
    else:
        trunc = linear_attention(q, k[..., :13, :], v[..., :13, :], fm, chunk_size=6)
        torch.testing.assert_close(out, trunc, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [4, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_never_sees_the_future_even_with_far_larger_future_keys(chunk_size, dtype):
    q, k, v = qkv(Nq=48, dtype=dtype, scale=2.0)
    fm = PositiveRandomFeatures(8, 32, seed=3).to(dtype)
    t = 21
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1:, :] = k[..., t + 1:, :] * 40  # log-features grow ~1600x: a global max underflows the past
    v2[..., t + 1:, :] = torch.randn_like(v[..., t + 1:, :]) * 1e4
    a = linear_attention(q, k, v, fm, causal=True, chunk_size=chunk_size)
    b = linear_attention(q, k2, v2, fm, causal=True, chunk_size=chunk_size)
    assert torch.isfinite(b).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(a[..., : t + 1, :], b[..., : t + 1, :], atol=tol, rtol=tol)
    # and the past is right, not only unchanged
    ref = linear_attention_reference(q.double(), k.double(), v.double(), fm.double(), causal=True)
    torch.testing.assert_close(a[..., : t + 1, :].double(), ref[..., : t + 1, :], atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_the_result():
    q, k, v = qkv(Nq=50)
    fm = PositiveRandomFeatures(8, 16, seed=0).double()
    outs = [linear_attention(q, k, v, fm, causal=True, chunk_size=c) for c in (1, 3, 16, 50, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_finite_and_close_to_float32(dtype, causal):
    q, k, v = qkv(dtype=torch.float32, Nq=70, D=16, scale=2.0)
    fm = PositiveRandomFeatures(16, 64, seed=0)
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), fm, causal=causal, chunk_size=16)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = linear_attention(*(x.to(dtype).float() for x in (q, k, v)), fm, causal=causal, chunk_size=16)
    tol = 3e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_large_norm_inputs_give_finite_outputs_and_grads(causal):
    q, k, v = qkv(dtype=torch.float32, Nq=40, scale=300.0)
    fm = PositiveRandomFeatures(8, 32, seed=0)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = linear_attention(q, k, v, fm, causal=causal, chunk_size=16)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_favor_approximates_softmax_attention():
    q, k, v = qkv(B=1, H=2, Nq=64, D=16, dtype=torch.float64, scale=0.5)  # |q|²/sqrt(D) ≈ 1
    exact = softmax_attention(q, k, v)
    errors = []
    for m in (16, 256, 4096):
        errs = [(linear_attention(q, k, v, PositiveRandomFeatures(16, m, seed=s).double()) - exact).abs().mean()
                for s in range(4)]
        errors.append(torch.stack(errs).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * errors[0]  # 1/sqrt(m) would give 1/16


def test_causal_memory_is_linear_in_n_forward_and_backward():
    fm = PositiveRandomFeatures(16, 32, seed=0)

    def fwd_bwd(n):
        q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=2, Nq=n, D=16, dtype=torch.float32))
        return peak_memory(lambda: linear_attention(q, k, v, fm, causal=True, chunk_size=32).sum().backward())

    def fwd(n):
        q, k, v = qkv(B=1, H=2, Nq=n, D=16, dtype=torch.float32)
        with torch.no_grad():
            return peak_memory(lambda: linear_attention(q, k, v, fm, causal=True, chunk_size=32))

    for measure in (fwd, fwd_bwd):
        small, large = measure(512), measure(2048)
        assert large < 4.6 * small, (measure.__name__, small, large)  # quadratic would be ~16x
        # and far below one (n, n) float32 matrix
        assert large < 2048 * 2048 * 4


@needs_cxx_compiler
@pytest.mark.parametrize("causal", [False, True])
def test_compiles_with_torch_compile(causal):
    """Non-causal compiles to one graph; causal breaks the graph once per block of chunks, where it reads back
    whether a chunk needs the exact per-query path (a check that cannot be skipped without wrong outputs)."""
    q, k, v = qkv(B=1, H=2, Nq=16, D=8, dtype=torch.float32)
    fm = PositiveRandomFeatures(8, 16, seed=0)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 12:] = True

    def fn(q, k, v):  # recompute: torch.compile plans its own recomputation, so it is not traced
        return linear_attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=8, recompute=True)

    compiled = torch.compile(fn, fullgraph=not causal)
    assert_same_outputs_and_grads(compiled, fn, (q, k, v), atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_shapes():
    q, k, v = qkv(Nq=9, Nk=12)
    fm = PositiveRandomFeatures(8, 16)
    with pytest.raises(ValueError, match="causal needs Nq == Nk"):
        linear_attention(q, k, v, fm, causal=True)
    with pytest.raises(ValueError, match="head dims differ"):
        linear_attention(q, k[..., :4], v, fm)
    with pytest.raises(ValueError, match="head_dim is 4"):
        linear_attention(q, k, v, PositiveRandomFeatures(4, 16))
    with pytest.raises(ValueError, match=r"\(B, Nk\) = \(2, 12\)"):
        linear_attention(q, k, v, fm, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_features must be positive"):
        PositiveRandomFeatures(8, 0)
    with pytest.raises(ValueError, match="num_features must be positive"):
        TrigRandomFeatures(8, -2)
    with pytest.raises(ValueError, match="must be even"):
        TrigRandomFeatures(8, 7)


# --- recompute (activation checkpointing, block by block) ----------------------------------------------------


class _LearnedFeatures(torch.nn.Module):
    """φ(x) = elu(W x) + 1 with a trainable W: its gradient must survive the recomputation too."""

    def __init__(self, D, M):
        super().__init__()
        self.proj = torch.nn.Linear(D, M, bias=False, dtype=torch.float64)
        self.num_features = M

    def forward(self, x):
        return torch.nn.functional.elu(self.proj(x)) + 1.0


def _outputs_and_grads(fn, inputs, params=()):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    for p in params:
        p.grad = None
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return [out.detach()] + [x.grad for x in inputs] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", ["favor", "trig", "elu", "learned"])
@pytest.mark.parametrize("causal", [False, True])
def test_recompute_gives_bit_identical_outputs_and_grads(monkeypatch, name, causal):
    """Blocks of one chunk, so the state crosses many checkpointed blocks; padded keys; a steep rise of the
    running maximum in the favor case (the per-query path runs inside the recomputed block too)."""
    from theorylab.attention import linear

    monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1)
    q, k, v = qkv(Nq=21, Dv=5)
    if name == "favor":
        k[:, :, :6] = k[:, :, :6] / k[:, :, :6].norm(dim=-1, keepdim=True) * 40.0
    fm = _LearnedFeatures(8, 12) if name == "learned" else FEATURE_MAPS[name](8).double()
    mask = padding_mask(2, 21)
    params = list(fm.parameters())

    def run(recompute):
        return _outputs_and_grads(lambda q, k, v: linear_attention(
            q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=4, recompute=recompute), (q, k, v), params)

    plain, recomputed = run(False), run(True)
    assert len(plain) == 4 + len(params)
    for a, b in zip(plain, recomputed, strict=True):
        assert torch.equal(a, b)


def test_recompute_runs_the_blocks_again_in_the_backward_pass(monkeypatch):
    from theorylab.attention import linear

    calls = []
    original = linear._causal_block
    monkeypatch.setattr(linear, "_causal_block", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1)  # one chunk per block: 16 blocks
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=2, Nq=256, D=8, dtype=torch.float32))
    fm = PositiveRandomFeatures(8, 16, seed=0)
    for recompute, expected in ((False, 16), (True, 32)):
        calls.clear()
        linear_attention(q, k, v, fm, causal=True, chunk_size=16, recompute=recompute).sum().backward()
        assert len(calls) == expected, recompute
    with torch.no_grad():  # nothing to recompute without autograd
        calls.clear()
        linear_attention(q, k, v, fm, causal=True, chunk_size=16, recompute=True)
        assert len(calls) == 16


@pytest.mark.parametrize("causal", [False, True])
def test_recompute_lowers_the_memory_of_forward_and_backward(monkeypatch, causal):
    from theorylab.attention import linear

    monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1 << 15)  # blocks of 4 chunks, as at full size
    fm = PositiveRandomFeatures(16, 64, seed=0)
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=4, Nq=2048, D=16, dtype=torch.float32))

    def fwd_bwd(recompute):
        return peak_memory(lambda: linear_attention(q, k, v, fm, causal=causal, chunk_size=32,
                                                    recompute=recompute).sum().backward())

    plain, recomputed = fwd_bwd(False), fwd_bwd(True)
    assert recomputed < 0.6 * plain, (plain, recomputed)
    assert recomputed >= 3 * 2048 * 4 * 16 * 4  # what every path must hold: the gradients of q, k, v


def test_recompute_refuses_a_feature_map_changed_between_forward_and_backward(monkeypatch):
    """The plain path keeps the forward's features; a recomputation would read the redrawn ones and give
    gradients 1.3-18 off, silently (found by review), so it raises instead."""
    from theorylab.attention import linear

    monkeypatch.setattr(linear, "CAUSAL_BLOCK_ELEMENTS", 1)
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=2, Nq=21))
    for causal in (False, True):
        fm = PositiveRandomFeatures(8, 12, seed=0).double()
        out = linear_attention(q, k, v, fm, causal=causal, chunk_size=4, recompute=True)
        fm.redraw()
        with pytest.raises(RuntimeError, match="feature map changed between the forward and the backward"):
            out.sum().backward()
        learned = _LearnedFeatures(8, 12)
        out = linear_attention(q, k, v, learned, causal=causal, chunk_size=4, recompute=True)
        with torch.no_grad():  # as an optimizer step does
            learned.proj.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="feature map changed"):
            out.sum().backward()


def test_recompute_is_skipped_under_torch_func():
    """torch.func transforms do not support checkpointing's saved-tensor hooks: recompute steps aside there."""
    q, k, v = qkv(B=1, H=2, Nq=21)
    fm = PositiveRandomFeatures(8, 12, seed=0).double()

    def grad_q(recompute):
        return torch.func.grad(lambda q: linear_attention(q, k, v, fm, chunk_size=4, recompute=recompute).sum())(q)

    assert torch.equal(grad_q(True), grad_q(False))


def test_recompute_saves_memory_with_short_non_causal_chunks():
    """Each checkpointed group of keys keeps its entering (Dv + 1, M) state: with one chunk of 4 keys per group
    that was 1.9x the memory of the plain path (found by review); groups now span >= 4 (Dv + 1) keys."""
    fm = EluFeatures(64)
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=4, Nq=2048, D=64, dtype=torch.float32))

    def fwd_bwd(recompute):
        return peak_memory(lambda: linear_attention(q, k, v, fm, chunk_size=4, recompute=recompute).sum().backward())

    assert fwd_bwd(True) < fwd_bwd(False)


def test_recompute_must_be_a_bool():
    q, k, v = qkv(Nq=5)
    with pytest.raises(TypeError, match="recompute must be a bool; got 'no'"):
        linear_attention(q, k, v, EluFeatures(8), recompute="no")


def test_default_sizes_are_the_cpu_ones_on_cpu_and_meta_and_larger_on_an_accelerator():
    from theorylab.attention import linear

    cpu = (linear.CAUSAL_CHUNK, linear.CAUSAL_BLOCK_ELEMENTS, linear.NONCAUSAL_FEATURE_ELEMENTS)
    assert linear._default_sizes(torch.device("cpu")) == cpu
    assert linear._default_sizes(torch.device("meta")) == cpu  # FLOP counting counts the CPU configuration
    gpu = linear._default_sizes(torch.device("cuda", 0))
    assert gpu == (linear.ACCELERATOR_CAUSAL_CHUNK, linear.ACCELERATOR_FEATURE_ELEMENTS,
                   linear.ACCELERATOR_FEATURE_ELEMENTS)
    assert all(g > c for g, c in zip(gpu, cpu, strict=True))


@pytest.mark.parametrize("name", ["favor", "elu"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_accelerator_sizes_give_the_reference_outputs_and_grads(monkeypatch, name, causal):
    """The GPU defaults (chunks of 256, one block of many chunks) run here on CPU: 700 positions are three chunks,
    the last one cut short, in one block; padded keys. For FAVOR+ the first 300 keys are long (log-features near
    -535), so the running maximum rises by ~500 inside the second chunk and sends it down the per-query path."""
    from theorylab.attention import linear

    sizes = linear._default_sizes(torch.device("cuda"))
    monkeypatch.setattr(linear, "_default_sizes", lambda device: sizes)
    q, k, v = qkv(B=2, H=1, Nq=700, D=8, Dv=5)
    k[:, :, :300] = k[:, :, :300] / k[:, :, :300].norm(dim=-1, keepdim=True) * 55.0
    fm = FEATURE_MAPS[name](8).double()
    mask = padding_mask(2, 700)
    if name == "favor" and causal:
        steep = []
        real = linear._chunk_per_query
        monkeypatch.setattr(linear, "_chunk_per_query", lambda *a: steep.append(1) or real(*a))
    assert_same_outputs_and_grads(
        lambda q, k, v: linear_attention(q, k, v, fm, causal=causal, key_padding_mask=mask),
        # FAVOR+: the log-domain reference, as the plain one underflows on the long keys (e^-535 · e^-535)
        lambda q, k, v: (linear_attention_log_reference if name == "favor" else linear_attention_reference)(
            q, k, v, fm, causal=causal, key_padding_mask=mask), (q, k, v))
    if name == "favor" and causal:
        assert steep  # the per-query path ran


def test_a_block_budget_also_bounds_the_intra_chunk_products_when_chunks_outgrow_the_features(monkeypatch):
    """With few features (M=16) and long chunks (C=256, as on a GPU) the (C, C) products of a block had been left
    out of its budget: 32 chunks per block here, 16 MiB of products against a 1 MiB budget (found by review; on
    a GPU, 1 GiB per intermediate at M=16). The budget now counts max(M, C) per row."""
    from theorylab.attention import linear

    monkeypatch.setattr(linear, "_default_sizes", lambda device: (256, 1 << 18, 1 << 18))
    q, k, v = qkv(B=1, H=2, Nq=8192, D=16, dtype=torch.float32)
    fm = EluFeatures(16)
    with torch.no_grad():
        extra = peak_memory(lambda: linear_attention(q, k, v, fm, causal=True))
    assert extra < 8 * 2**20, extra / 2**20  # the output is 1 MiB; products of 2 chunks ~1 MiB, a few of each


def test_importing_and_eager_causal_calls_do_not_load_dynamo():
    """The data-dependent check is marked for torch.compile lazily: ``@torch.compiler.disable`` at import loaded
    torch._dynamo, about 1 s of the 2.2 s that ``import theorylab.attention`` took (torch alone: 1.1 s)."""
    import subprocess
    import sys

    code = ("import sys, torch; from theorylab.attention import PositiveRandomFeatures, linear_attention; "
            "q = torch.randn(1, 2, 40, 4); "
            "linear_attention(q, q, q, PositiveRandomFeatures(4, 8, seed=0), causal=True, chunk_size=8); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@needs_cxx_compiler
def test_compiling_two_models_in_one_process_hits_no_recompile_limit():
    """Every compiler_disabled function shares one wrapper code object, and dynamo compiled that wrapper once per
    function on its first call: compiling a FAVOR+ model, then a separable one, warned "torch._dynamo hit
    config.recompile_limit (8)" (a user's journey, twenty-fifth session). The wrapper's frames are now skipped."""
    import logging

    from theorylab.attention import MultiheadAttention

    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        torch._dynamo.reset()
        for kind in ("favor", "separable"):
            model = torch.nn.Sequential(*[MultiheadAttention(32, 4, kind=kind, causal=True, seed=i) for i in range(2)])
            x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch.compile(model).eval()(x)
            torch.compile(model).train()(x).sum().backward()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._dynamo.reset()
    assert not [c for c in caught if "recompile_limit" in c]
