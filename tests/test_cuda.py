"""The public API on a CUDA device, checked against the float64 CPU references and against torch.optim there.

The device is ``cuda`` where torch sees one, else the CPU (``THEORYLAB_TEST_DEVICE`` overrides). CI has no GPU, so
there they check the CPU's float32 paths against the same references, and a session lent a GPU runs them on it
(``benchmarks/gpu_check.sh``; README, "On a GPU").

What differs on a GPU and is checked here: the attention kernels' larger default chunks and blocks (a sequence of
1000 spans several GPU chunks), their read-backs (FAVOR+'s float64 switch, separable attention's steep-chunk
check), autocast and half precision, torch.optim's CUDA kernels (foreach and fused) as the parity baseline, the
RNN diagnostics (computed in float64 from a GPU model), and a checkpoint written on the GPU resumed on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from attention_helpers import padding_mask, qkv
from optim_helpers import make_problem

from theorylab.attention import (
    EluFeatures,
    MultiheadAttention,
    PositiveRandomFeatures,
    linear_attention,
    separable_attention,
    softmax_attention,
)
from theorylab.attention.exact import softmax_attention_reference
from theorylab.attention.linear import linear_attention_reference
from theorylab.attention.separable import separable_attention_reference
from theorylab.optim import SGD, Adam, AdamW, NonFiniteGradientError
from theorylab.rnn import RNN, certificate, log_jacobian_norms, lyapunov_spectrum

DEVICE = torch.device(os.environ.get("THEORYLAB_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))

FAVOR = PositiveRandomFeatures(16, 64, seed=0)
ELU = EluFeatures(16)
KINDS = {
    "softmax": (softmax_attention, softmax_attention_reference, None),
    "separable": (separable_attention, separable_attention_reference, None),
    "linear-elu": (linear_attention, linear_attention_reference, ELU),
    "favor": (linear_attention, linear_attention_reference, FAVOR),
}


def _call(kind: str, fn, q, k, v, **kw):
    fm = KINDS[kind][2]
    if fm is None:
        return fn(q, k, v, **kw)
    return fn(q, k, v, fm.to(device=q.device, dtype=torch.float32 if q.dtype != torch.float64 else torch.float64),
              **kw)


def _out_and_grads(kind: str, fn, inputs, w, **kw):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = _call(kind, fn, *xs, **kw)
    (out * w.to(out)).sum().backward()
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["plain", "causal", "masked"])
@pytest.mark.parametrize("n", [37, 1000])
def test_attention_matches_the_float64_cpu_reference(kind, mode, n):
    """float32 on the device (its default chunk sizes) against the naive float64 reference on the CPU: outputs and
    the gradients of q, k and v."""
    fast, reference, _ = KINDS[kind]
    kw = {"causal": mode == "causal"}
    if mode == "masked":
        kw["key_padding_mask"] = padding_mask(2, n, seed=3)
    inputs = qkv(2, 3, n, D=16, Dv=8, seed=n, scale=0.5)
    w = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dev_kw = {**kw, **({"key_padding_mask": kw["key_padding_mask"].to(DEVICE)} if mode == "masked" else {})}
    out, grads = _out_and_grads(kind, fast, [x.float().to(DEVICE) for x in inputs], w.float().to(DEVICE), **dev_kw)
    ref, ref_grads = _out_and_grads(kind, reference, inputs, w, **kw)
    assert out.device.type == DEVICE.type and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.cpu().double(), r, atol=5e-5, rtol=1e-3)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_close_outputs(kind, dtype):
    """Half-precision q, k, v (causal, 300 positions): outputs in that dtype, finite, close to the float64 result."""
    fast, reference, _ = KINDS[kind]
    inputs = qkv(2, 3, 300, D=16, Dv=8, seed=5, scale=0.5)
    out = _call(kind, fast, *[x.to(DEVICE, dtype) for x in inputs], causal=True)
    ref = _call(kind, reference, *inputs, causal=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.cpu().double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["separable", "linear-elu", "favor"])
def test_autocast_leaves_the_kernels_in_float32(kind):
    """Under autocast the kernels keep float32 (their sums of exponentials do not survive bfloat16): the result is
    the float32 one, not a bfloat16 approximation of it."""
    fast, _, _ = KINDS[kind]
    q, k, v = (x.float().to(DEVICE) for x in qkv(1, 2, 500, D=16, seed=7, scale=0.5))
    plain = _call(kind, fast, q, k, v, causal=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        auto = _call(kind, fast, q, k, v, causal=True)
    torch.testing.assert_close(auto.float(), plain, atol=1e-5, rtol=1e-5)


def test_favor_switches_to_float64_for_large_inputs():
    """Keys of one large norm (|x| = 30): float32 would round the features' log-scale by more than 2**-10, so the
    kernel works in float64 and agrees with the log-domain reference; the read-back that decides it works on the
    device."""
    from theorylab.attention.linear import linear_attention_log_reference

    q, k, v = qkv(1, 2, 64, D=16, seed=9)
    q, k = 30 * q / q.norm(dim=-1, keepdim=True), 30 * k / k.norm(dim=-1, keepdim=True)
    out = linear_attention(q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE),
                           FAVOR.to(DEVICE, torch.float32), causal=True)
    ref = linear_attention_log_reference(q, k, v, FAVOR.to("cpu", torch.float64), causal=True)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "separable", "linear", "favor"])
def test_multihead_module_on_the_device_matches_the_cpu(kind):
    """The same weights on the device and on the CPU (float64 there): outputs and parameter gradients."""
    torch.manual_seed(0)
    cpu = MultiheadAttention(32, 4, kind=kind, causal=True, num_features=32, seed=0).double()
    dev = MultiheadAttention(32, 4, kind=kind, causal=True, num_features=32, seed=0).to(DEVICE)
    dev.load_state_dict({n: t.float() for n, t in cpu.state_dict().items()})
    x = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_cpu, out_dev = cpu(x), dev(x.float().to(DEVICE))
    out_cpu.square().sum().backward()
    out_dev.square().sum().backward()
    torch.testing.assert_close(out_dev.cpu().double(), out_cpu, atol=1e-5, rtol=1e-4)
    for (name, p_cpu), p_dev in zip(cpu.named_parameters(), dev.parameters(), strict=True):
        torch.testing.assert_close(p_dev.grad.cpu().double(), p_cpu.grad, atol=1e-4, rtol=1e-3, msg=name)


def _trajectory(factory, steps: int = 100, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    params = [p.detach().to(DEVICE).requires_grad_() for p in make_problem(dtype)[0]]
    opt = factory(params)
    for _ in range(steps):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in params]).cpu()


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    """make_problem's objective, with its data on the parameters' device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 12, generator=gen, dtype=torch.float64).to(params[0])
    y = torch.randint(0, 3, (128,), generator=gen).to(params[0].device)
    w1, b1, w2, b2 = params
    return torch.nn.functional.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y)


PARITY = {
    "sgd-momentum-l2": (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, decay="l2"),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov-l2": (lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, decay="l2"),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam-l2": (lambda p: Adam(p, lr=3e-3, weight_decay=0.05, decay="l2"),
                lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.05)),
    "adamw": (lambda p: AdamW(p, lr=3e-3, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1)),
    "adam-decoupled_lr": (lambda p: Adam(p, lr=3e-3, weight_decay=0.1, decay="decoupled_lr"),
                          lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1)),
    "adamw-fused": (lambda p: AdamW(p, lr=3e-3, weight_decay=0.1, fused=True),
                    lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, fused=True)),
    "adam-l2-fused": (lambda p: Adam(p, lr=3e-3, weight_decay=0.05, decay="l2", fused=True),
                      lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.05, fused=True)),
    "sgd-momentum-maximize": (lambda p: SGD(p, lr=0.02, momentum=0.9, weight_decay=0.01, maximize=True),
                              lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=0.01, maximize=True)),
    "adam-amsgrad-maximize": (lambda p: Adam(p, lr=3e-3, weight_decay=0.05, amsgrad=True, maximize=True),
                              lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.05, amsgrad=True, maximize=True)),
    "adamw-amsgrad-maximize-fused": (
        lambda p: AdamW(p, lr=3e-3, weight_decay=0.1, amsgrad=True, maximize=True, fused=True),
        lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, amsgrad=True, maximize=True, fused=True)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_optimizer_parity_with_torch_optim_on_the_device(case):
    """100 float32 steps on the device, against torch.optim's kernels there (foreach, or fused): max |Δθ| <= 1e-5."""
    ours, theirs = PARITY[case]
    a, b = _trajectory(ours), _trajectory(theirs)
    start = torch.cat([p.detach().flatten() for p in make_problem()[0]])
    assert float((a - start).abs().max()) > 1e-2  # it moved: the comparison is not vacuous
    assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.parametrize(("case", "dtype"), [("sgd-momentum-l2", torch.float16), ("sgd-momentum-l2", torch.bfloat16),
                                           ("adam-l2", torch.bfloat16), ("adamw", torch.bfloat16)])
def test_half_precision_parameters_track_torch_optim(case, dtype):
    """Half-precision parameters on the device, 30 steps: finite, and within a few of their ulps of torch.optim.
    (Not Adam in float16: eps = 1e-8 rounds to 0 there, and torch.optim's Adam itself overflows to inf in one step
    on this problem, where a gradient entry's square underflows.) AdamW is compared with torch's fused kernel:
    like ours, it rounds decay and step once together, where torch's foreach step loses a decay below half an ulp."""
    ours, theirs = PARITY[case]
    if case == "adamw":
        theirs = PARITY["adamw-fused"][1]
    a, b = _trajectory(ours, 30, dtype), _trajectory(theirs, 30, dtype)
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a.float(), b.float(), atol=4 * torch.finfo(dtype).eps, rtol=4 * torch.finfo(dtype).eps)


def test_resumed_optimizer_continues_bit_identically():
    """state_dict after 5 steps, loaded into a fresh optimizer: the next 5 steps equal the uninterrupted run's."""
    def run(split: bool) -> torch.Tensor:
        params = [p.detach().to(DEVICE).requires_grad_() for p in make_problem()[0]]
        opt = Adam(params, lr=3e-3, weight_decay=0.1, decay="decoupled")
        for i in range(10):
            if split and i == 5:
                state = opt.state_dict()
                opt = Adam(params, lr=3e-3, weight_decay=0.1, decay="decoupled")
                opt.load_state_dict(state)
            opt.zero_grad()
            _loss(params).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in params]).cpu()

    assert torch.equal(run(True), run(False))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["adamw", "sgd-nesterov-l2"])
def test_compiled_step_on_the_device_equals_the_eager_step(case):
    """``torch.compile(opt.step)`` with inductor (Triton on a GPU), 8 steps under StepLR: the compiled chain takes
    its lr, decay and bias-correction factors as 0-dim float64 CPU tensors, which the device's kernels must read."""
    if DEVICE.type == "cpu":
        from attention_helpers import _CXX
        if shutil.which(_CXX) is None:
            pytest.skip(f"torch.compile's CPU backend needs a C++ compiler ({_CXX})")
    torch._dynamo.reset()

    def run(compiled: bool) -> torch.Tensor:
        params = [p.detach().to(DEVICE).requires_grad_() for p in make_problem()[0]]
        opt = PARITY[case][0](params)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(8):
            opt.zero_grad()
            _loss(params).backward()
            step()
            sched.step()
        return torch.cat([p.detach().flatten() for p in params]).cpu()

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_nonfinite_gradient_on_the_device_raises_and_leaves_parameters():
    params = [p.detach().to(DEVICE).requires_grad_() for p in make_problem()[0]]
    opt = AdamW(params, lr=1e-2)
    _loss(params).backward()
    params[2].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("form", ["h", "g"])
def test_rnn_diagnostics_of_a_device_model_match_the_cpu(form):
    """A model on the device: its forward pass matches the CPU's, and its Jacobian norms and Lyapunov exponents
    (float64 inside) equal the CPU model's."""
    torch.manual_seed(0)
    cpu = RNN(3, 16, activation="tanh", form=form).double()
    dev = RNN(3, 16, activation="tanh", form=form).to(DEVICE, torch.float64)
    dev.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 60, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    states_cpu, _ = cpu(x)
    states_dev, _ = dev(x.to(DEVICE))
    torch.testing.assert_close(states_dev.cpu(), states_cpu, atol=1e-10, rtol=1e-10)
    norms_cpu, norms_dev = log_jacobian_norms(cpu, x), log_jacobian_norms(dev, x.to(DEVICE))
    assert float(norms_cpu[:, -1].abs().min()) > 1  # far from the identity's 0: a non-trivial comparison
    torch.testing.assert_close(norms_dev.cpu(), norms_cpu, atol=1e-8, rtol=1e-9)
    lyap_cpu, lyap_dev = lyapunov_spectrum(cpu, x, k=3), lyapunov_spectrum(dev, x.to(DEVICE), k=3)
    torch.testing.assert_close(lyap_dev.cpu(), lyap_cpu, atol=1e-8, rtol=1e-8)
    assert certificate(dev).sigma_max == pytest.approx(certificate(cpu).sigma_max, rel=1e-12)


def _train(out, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "theorylab", "train", "charlm", "--attention", "favor", "--out", str(out),
           "--seq-len", "64", "--batch-size", "8", "--layers", "1", "--width", "32", "--heads", "2",
           "--num-features", "16", "--eval-chars", "2000", "--checkpoint-every", "0", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_charlm_trains_on_the_device_and_resumes_on_the_cpu(tmp_path):
    """Training on the device lowers bits/char; its checkpoint (written on the device) resumes on the CPU."""
    first = _train(tmp_path, "--steps", "40", "--device", DEVICE.type)
    assert first["train_bpc"][-1] < first["train_bpc"][0] - 0.5
    resumed = _train(tmp_path, "--steps", "50", "--resume", "--device", "cpu")
    assert resumed["steps"] == 50 and resumed["final_bpc"] < first["train_bpc"][0]


def test_claim_grids_train_in_worker_processes_after_a_backward_pass_on_the_device():
    """`verify` runs backward passes before claim 4.4 trains its grids in worker processes. Where torch sees a GPU,
    a backward pass starts autograd's device threads, and a worker forked after it failed ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"): 4.4 ended in an error there."""
    import numpy as np

    from theorylab.claims import q4_weight_decay as q4

    x = torch.randn(3, device=DEVICE, requires_grad=True)
    (2 * x).sum().backward()
    cfg = q4.GridConfig(n_lr=2, n_wd=2, seeds=2, steps=3, hidden=4, n_train=40)
    grids = q4.run_grids(cfg, data_seed=0, workers=2)
    assert all(bool(np.isfinite(e).all()) for e in grids.errors.values())


def test_read_backs_are_counted_on_the_device():
    """theorylab.cost.cuda_read_backs (the read-back counts of benchmarks/gpu_attention.py): a value read back is
    one, a kernel alone none; off CUDA there is nothing to count."""
    from theorylab.cost import cuda_read_backs

    x = torch.ones(64, device=DEVICE)
    if DEVICE.type != "cuda":
        assert torch.cuda.is_available() or cuda_read_backs(lambda: (x * 2).sum().item()) is None
        return
    assert cuda_read_backs(lambda: x * 2) == 0
    assert cuda_read_backs(lambda: (x * 2).sum().item()) == 1
    assert cuda_read_backs(lambda: [bool(x.sum() > 0), float(x.max())]) == 2


def test_steps_read_back_only_for_the_nan_check():
    """The default nonfinite="raise" reads one value back per step (whether a gradient is NaN or inf), and nothing
    else does: on an H200 the first fused step had read back once per parameter, copying each new step counter from
    the host. Off CUDA there are no read-backs; the counters are made on the parameter's device all the same."""
    from theorylab.cost import cuda_read_backs

    counts = {}
    for name, kw in {"chain": {}, "chain, propagate": {"nonfinite": "propagate"}, "fused": {"fused": True},
                     "fused, propagate": {"fused": True, "nonfinite": "propagate"}}.items():
        params = [torch.randn(5, 3, device=DEVICE, requires_grad=True) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = AdamW(params, **kw)
        counts[name] = [cuda_read_backs(opt.step) for _ in range(2)]
        if DEVICE.type != "cuda":
            opt.step()  # cuda_read_backs calls nothing without CUDA
        if kw.get("fused"):
            assert all(opt.state[p]["step"].device == p.device for p in params)
    if DEVICE.type != "cuda":
        assert all(c == [None, None] for c in counts.values()) or torch.cuda.is_available()
        return
    assert counts == {"chain": [1, 1], "chain, propagate": [0, 0], "fused": [1, 1], "fused, propagate": [0, 0]}


def test_a_group_on_the_cpu_and_the_device_steps_and_catches_a_nan():
    """The finite check stacked every gradient's sum into one tensor, which fails across devices (an embedding
    kept on the CPU beside a model on the GPU); it reads each device apart (on a CPU-only machine: both CPU)."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, device=DEVICE, requires_grad=True)
    opt = SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3, device=DEVICE)
    opt.step()
    assert float(a[0]) == float(b[0]) == pytest.approx(0.9)
    b.grad = torch.full((3,), float("nan"), device=DEVICE)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert float(b[0]) == pytest.approx(0.9)
