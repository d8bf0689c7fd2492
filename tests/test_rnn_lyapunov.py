"""lyapunov_spectrum (Benettin QR) and the vanishing-gradient certificate."""

import math

import pytest
import torch

from theorylab.rnn import RNN, certificate, derivative_bound, log_jacobian_norms, lyapunov_spectrum

F64 = torch.float64


def fixed_rnn(W, act="tanh", inputs=1):
    rnn = RNN(inputs, W.shape[0], activation=act).double()
    with torch.no_grad():
        rnn.W.copy_(W)
        rnn.U.zero_()
        rnn.b.zero_()
    return rnn


def test_linear_regime_exponents_are_log_singular_values_of_symmetric_w():
    """At h ≡ 0 (tanh, no input) J_t = W; for symmetric W the exponents are log|eigenvalues|, sorted."""
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))[0]
    s = torch.tensor([1.7, -1.2, 0.9, 0.5, -0.3, 0.1], dtype=F64)
    rnn = fixed_rnn(q @ torch.diag(s) @ q.T)
    lam = lyapunov_spectrum(rnn, torch.zeros(1, 3000, 1, dtype=F64), None, 4)
    expected = torch.log(s.abs().sort(descending=True).values[:4])
    torch.testing.assert_close(lam[0], expected, rtol=0, atol=5e-3)


def test_two_identity_tanh_matches_the_fixed_point():
    h = 2.0
    for _ in range(60):
        h -= (h - 2 * math.tanh(h)) / (1 - 2 / math.cosh(h) ** 2)
    theory = math.log(2 / math.cosh(h) ** 2)
    rnn = fixed_rnn(2 * torch.eye(5, dtype=F64))
    lam = lyapunov_spectrum(rnn, torch.zeros(2, 3000, 1, dtype=F64), torch.randn(2, 5, dtype=F64), 2)
    assert theory == pytest.approx(-1.79, abs=0.01)
    assert (lam - theory).abs().max() < 0.01


def test_top_exponent_matches_log_norm_slope_in_a_chaotic_regime():
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=F64))[0]
    rnn = fixed_rnn(3 * q)
    x, h0 = torch.zeros(2, 2000, 1, dtype=F64), torch.randn(2, 32, generator=gen, dtype=F64)
    lam1 = lyapunov_spectrum(rnn, x, h0, 1)[:, 0]
    slope = log_jacobian_norms(rnn, x, h0)[:, -1] / 2000
    assert (lam1 > 0.1).all()
    assert (lam1 - slope).abs().max() < 0.01


def test_reorthonormalisation_interval_changes_little_when_it_is_safe():
    gen = torch.Generator().manual_seed(2)
    rnn = RNN(2, 8).double()
    x = torch.randn(1, 600, 2, generator=gen, dtype=F64)
    every = lyapunov_spectrum(rnn, x, None, 3, reorthonormalize_every=1)
    sparse = lyapunov_spectrum(rnn, x, None, 3, reorthonormalize_every=4)
    torch.testing.assert_close(every, sparse, rtol=0, atol=1e-8)


@pytest.mark.parametrize("act,scale", [("sigmoid", 8.0), ("tanh", 2.0)])
def test_a_long_interval_keeps_the_lower_exponents(act, scale):
    """Over 50 steps the bottom direction falls ~100 nats behind the top one: one QR per interval lost it to
    rounding (sigmoid: −0.80 instead of −4.73, silently). Such intervals are now redone a QR per step. The sum of
    all H exponents is the mean log|det J_t|, exactly."""
    gen = torch.Generator().manual_seed(2)
    H, T = 8, 600
    rnn = RNN(2, H, activation=act).double()
    with torch.no_grad():
        rnn.W.copy_(scale * torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=F64))[0])
    x, h0 = torch.randn(2, T, 2, generator=gen, dtype=F64), torch.randn(2, H, generator=gen, dtype=F64)
    with torch.no_grad():
        states, _ = rnn(x, h0)
    prev = torch.cat([h0[:, None], states[:, :-1]], 1)
    d = torch.sigmoid(prev) * (1 - torch.sigmoid(prev)) if act == "sigmoid" else 1 - torch.tanh(prev) ** 2
    log_det = torch.linalg.slogdet(rnn.W.detach())[1] + d.log().sum(-1).mean(-1)
    each = lyapunov_spectrum(rnn, x, h0, H)
    for every in (10, 50, T):
        sparse = lyapunov_spectrum(rnn, x, h0, H, reorthonormalize_every=every)
        torch.testing.assert_close(sparse, each, rtol=0, atol=1e-9)
        torch.testing.assert_close(sparse.sum(-1), log_det, rtol=0, atol=1e-9)


def test_nilpotent_w_gives_minus_inf():
    gen = torch.Generator().manual_seed(3)
    rnn = fixed_rnn(torch.triu(3 * torch.randn(6, 6, generator=gen, dtype=F64), 1))
    lam = lyapunov_spectrum(rnn, torch.zeros(1, 20, 1, dtype=F64), torch.randn(1, 6, dtype=F64), 3)
    assert torch.isneginf(lam).all()


def test_certificate():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 5, generator=gen, dtype=F64)
    for act in ("tanh", "sigmoid", "relu", "gelu", "silu"):
        rnn = fixed_rnn(w, act)
        cert = certificate(rnn)
        assert cert.sigma_max == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-12)
        assert cert.gamma == derivative_bound(act)
        assert cert.delta == pytest.approx(cert.sigma_max * cert.gamma)
        assert cert.vanishing_guaranteed == (cert.delta < 1)
        assert cert.log_bound(100) == pytest.approx(100 * math.log(cert.delta))
    small = certificate(fixed_rnn(0.5 * torch.eye(3, dtype=F64)))
    assert small.vanishing_guaranteed and small.bound(3) == pytest.approx(0.125)


def test_bad_k_and_interval():
    rnn = RNN(1, 4).double()
    x = torch.zeros(1, 5, 1, dtype=F64)
    for k in (0, 5):
        with pytest.raises(ValueError, match=f"got {k}"):
            lyapunov_spectrum(rnn, x, None, k)
    with pytest.raises(ValueError, match="reorthonormalize_every"):
        lyapunov_spectrum(rnn, x, None, 2, reorthonormalize_every=0)
    with pytest.raises(ValueError, match="h0"):
        lyapunov_spectrum(rnn, x, torch.zeros(2, 4, dtype=F64), 2)


def test_exponents_beyond_a_dead_units_rank_are_minus_inf():
    """A relu unit with σ' exactly 0 makes J_t = W diag(σ'_t) exactly rank-deficient: the bottom exponent is −inf.
    The QR's rounding had given a finite ≈ −36 per step (log of eps)."""
    rnn = RNN(1, 2, activation="relu").double()
    with torch.no_grad():
        rnn.W.copy_(torch.tensor([[0.5, 2.0], [1.0, 1.0]]))
        rnn.U.zero_()
        rnn.b.zero_()
    h0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # unit 2 dead at step 1: J_1 = W diag(1, 0)
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    both = lyapunov_spectrum(rnn, x, h0, k=2)
    assert both[0, 1] == -math.inf and math.isfinite(float(both[0, 0]))
    assert torch.equal(lyapunov_spectrum(rnn, x, h0, k=1), both[:, :1])
    # H = 3 with one unit dead at the first step only: the product keeps rank 2, its third exponent is −inf
    gen = torch.Generator().manual_seed(0)
    rnn3 = RNN(1, 3, activation="relu").double()
    with torch.no_grad():
        rnn3.W.copy_(0.4 * torch.rand(3, 3, generator=gen, dtype=torch.float64))  # W > 0, b > 0: every state
        rnn3.U.zero_()                                                           # after the first is positive,
        rnn3.b.fill_(1.0)                                                        # every unit alive
    h0 = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    three = lyapunov_spectrum(rnn3, torch.zeros(1, 20, 1, dtype=torch.float64), h0, k=3)
    assert three[0, 2] == -math.inf and bool(torch.isfinite(three[0, :2]).all())


def test_an_ill_conditioned_full_rank_w_keeps_its_small_exponent():
    """W = diag(0.9, 1e-16) is full rank: its second exponent is log 1e-16 (plus tanh's σ' at 0, 1). Counting W's
    numerical rank, as numpy's matrix_rank measures it, had made it −inf (a review): a singular W cannot be told
    from this one in floating point, so W's own rank is not counted."""
    rnn = RNN(2, 2, activation="tanh").double()
    with torch.no_grad():
        rnn.W.copy_(torch.diag(torch.tensor([0.9, 1e-16], dtype=torch.float64)))
        rnn.U.zero_()
        rnn.b.zero_()
    spectrum = lyapunov_spectrum(rnn, torch.zeros(1, 200, 2, dtype=torch.float64), torch.zeros(1, 2,
                                 dtype=torch.float64), 2)[0].tolist()
    assert spectrum == pytest.approx([math.log(0.9), math.log(1e-16)], abs=0.02)  # a transient of 1/T


def test_a_direction_beyond_a_steps_rank_does_not_outgrow_the_top_one():
    """relu, W = diag(1, 1e-20): the strong unit is off at step 4 of 5, where the product has rank 1. The second
    QR direction's |R_22| there was rounding (2.6e-36), and when the unit came back it outgrew the true one: the
    top exponent read −43.69, above (1/T) log σ₁(P_T) = −46.05, which no direction can exceed (a user's journey)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rnn = RNN(2, 2, activation="relu")
        with torch.no_grad():
            rnn.W.copy_(torch.diag(torch.tensor([1.0, 1e-20])))
            rnn.U.copy_(torch.eye(2))
            rnn.b.zero_()
        x = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [-10.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
        h0 = torch.ones(1, 2)
        bound = math.log(1e-100) / 5  # P_5 = diag(0, 1e-100): (1/5) log σ₁
        for every in (1, 5):
            top, second = lyapunov_spectrum(rnn, x, h0, 2, reorthonormalize_every=every)[0].tolist()
            assert top <= bound + 1e-12 and top == pytest.approx(bound, abs=0.01) and second == -math.inf
    finally:
        torch.set_default_dtype(previous)
