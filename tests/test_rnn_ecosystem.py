"""The RNN module with ordinary PyTorch: autocast, parametrizations, torch.compile'd modules, torch.func."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from theorylab.rnn import RNN, certificate, log_jacobian_norms, log_jacobian_profile, lyapunov_spectrum


def _model_and_batch(seed=0, hidden=16):
    torch.manual_seed(seed)
    return RNN(3, hidden), nn.Linear(hidden, 5), torch.randn(4, 12, 3), torch.randint(0, 5, (4,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_training_step_under_autocast_runs_in_its_dtype_like_the_reference(dtype):
    """Under autocast the hand-written backward got a float32 W and half gradients (a dtype error); now the node
    runs in autocast's dtype, as torch.nn.RNN does, and agrees with the plain autograd loop."""
    rnn, head, x, y = _model_and_batch()
    grads = []
    for run in (rnn.forward, rnn.forward_reference):
        rnn.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            states, last = run(x)
            loss = nn.functional.cross_entropy(head(last), y)
        loss.backward()
        assert states.dtype == dtype
        grads.append([p.grad.clone() for p in rnn.parameters()])
    for fast, reference in zip(*grads, strict=True):
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, reference, atol=3e-2, rtol=5e-2)


def test_float64_under_autocast_is_float64_and_unchanged():
    rnn, _, x, _ = _model_and_batch()
    rnn.double()
    expected = rnn(x.double())[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = rnn(x.double())[0]
    assert states.dtype == torch.float64
    assert torch.equal(states, expected)


class _Counting(nn.Module):
    calls = 0

    def forward(self, w):
        _Counting.calls += 1
        return w


@pytest.mark.parametrize("call", ["forward", "forward_reference", "norms", "profile", "lyapunov", "certificate"])
def test_a_parametrized_w_is_computed_once_per_call(call):
    """Each read of a parametrized weight computes it anew: check, dtype and cast had made three per forward."""
    rnn, _, x, _ = _model_and_batch()
    parametrize.register_parametrization(rnn, "W", _Counting())
    run = {"forward": lambda: rnn(x), "forward_reference": lambda: rnn.forward_reference(x),
           "norms": lambda: log_jacobian_norms(rnn, x), "profile": lambda: log_jacobian_profile(rnn, x),
           "lyapunov": lambda: lyapunov_spectrum(rnn, x, k=2), "certificate": lambda: certificate(rnn)}[call]
    _Counting.calls = 0
    run()
    assert _Counting.calls == 1


def _train(with_diagnostics):
    rnn, head, x, y = _model_and_batch(seed=1)
    parametrizations.spectral_norm(rnn, "W")
    opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-2)
    for step in range(6):
        if with_diagnostics and step % 2 == 0:
            log_jacobian_norms(rnn, x)
            lyapunov_spectrum(rnn, x, k=2)
            certificate(rnn)
        opt.zero_grad()
        nn.functional.cross_entropy(head(rnn(x)[1]), y).backward()
        opt.step()
    return [p.detach().clone() for p in rnn.parameters()], [b.clone() for b in rnn.buffers()]


def test_diagnostics_leave_a_spectral_norm_model_and_its_training_as_they_were():
    """spectral_norm advances its power iteration at every read in training mode: a diagnostic had changed the
    training that followed it (1.6e-4 after 50 steps). They now read in eval mode, and restore each module's mode."""
    plain, with_diagnostics = _train(False), _train(True)
    for a, b in zip(plain[0] + plain[1], with_diagnostics[0] + with_diagnostics[1], strict=True):
        assert torch.equal(a, b)


def test_diagnostics_restore_every_module_mode_even_when_they_raise():
    rnn, _, x, _ = _model_and_batch()
    parametrizations.spectral_norm(rnn, "W")
    rnn.train()
    rnn.parametrizations.W[0].eval()  # modes that differ between modules are kept as they were
    modes = [m.training for m in rnn.modules()]
    log_jacobian_norms(rnn, x)
    assert [m.training for m in rnn.modules()] == modes
    with pytest.raises(ValueError, match="x must have shape"):
        log_jacobian_norms(rnn, x[..., :2])
    assert [m.training for m in rnn.modules()] == modes


def test_diagnostics_take_a_compiled_module():
    rnn, _, x, _ = _model_and_batch()
    compiled = torch.compile(rnn)  # the wrapper: nothing is compiled until it is called
    assert torch.equal(log_jacobian_norms(compiled, x), log_jacobian_norms(rnn, x))
    assert certificate(compiled) == certificate(rnn)
    assert torch.equal(lyapunov_spectrum(compiled, x, k=2), lyapunov_spectrum(rnn, x, k=2))
    with pytest.raises(ValueError, match=r"theorylab.rnn.RNN \(or torch.compile of one\), got OptimizedModule"):
        certificate(torch.compile(nn.Linear(2, 2)))


def test_torch_func_transforms_name_the_reference_loop():
    rnn, _, x, _ = _model_and_batch()
    with pytest.raises(RuntimeError, match="forward_reference"):
        torch.func.vmap(lambda xi: rnn(xi[None])[1])(x)
    params = dict(rnn.named_parameters())
    with pytest.raises(RuntimeError, match="forward_reference"):
        torch.func.grad(lambda p: torch.func.functional_call(rnn, p, (x,))[1].sum())(params)


def test_a_diagnostic_inside_the_callers_cached_block_leaves_its_reads_alone():
    """The eval-mode W a diagnostic computed had stayed in the caller's parametrize.cached() cache: the training
    read after it in the block reused it, and spectral_norm's power iteration did not advance."""

    def run(with_diagnostic):
        rnn, _, x, _ = _model_and_batch(seed=2)
        parametrizations.spectral_norm(rnn, "W")
        with parametrize.cached():
            if with_diagnostic:
                certificate(rnn)
            out = rnn(x)[0].sum()
        return out, [b.clone() for b in rnn.buffers()]

    (a, buffers_a), (b, buffers_b) = run(False), run(True)
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(buffers_a, buffers_b, strict=True))


def test_forward_reference_returns_autocasts_dtype_for_an_empty_sequence_too():
    rnn, _, x, _ = _model_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for run in (rnn.forward, rnn.forward_reference):
            states, last = run(x[:, :0])
            assert states.dtype == last.dtype == torch.bfloat16, run
