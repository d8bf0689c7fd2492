"""Each claim's verdict can fail: a plausible bug in the component it is about turns it to refuted. The sixth
session's audit found four that stayed confirmed (1.2: an underestimated Jacobian or a wrong γ; 3.1: a wrong
attention scale; 3.2: a wrong operator behind the measured cost; 4.3a: a decay of the wrong sign); these tests keep
them failing."""

from __future__ import annotations

import torch

import theorylab.attention as attention
from theorylab.claims import q1_rnn, q3_attention, q4_weight_decay
from theorylab.optim import Adam


def test_1_2_refutes_a_wrong_gamma_and_an_underestimated_norm(monkeypatch):
    real_bound, real_norms = q1_rnn.derivative_bound, q1_rnn.log_norms_of_products
    assert q1_rnn.vanishing_gradients(0, True).confirmed
    monkeypatch.setattr(q1_rnn, "derivative_bound", lambda a: 1.0 if a == "gelu" else real_bound(a))
    assert not q1_rnn.vanishing_gradients(0, True).confirmed  # gelu's γ is 1.1289, not 1
    monkeypatch.setattr(q1_rnn, "derivative_bound", real_bound)
    monkeypatch.setattr(q1_rnn, "log_norms_of_products", lambda f, **kw: real_norms(f, **kw) - 1.0)
    assert not q1_rnn.vanishing_gradients(0, True).confirmed  # below the bound, but not the exact norm


def test_1_2_refutes_factors_one_step_late_in_the_wrong_order_or_the_wrong_norm(monkeypatch):
    """The ninth session's review: these passed the bound and the tight cases (0.03-0.6 nats off at T = 40)."""
    real_derivs, real_factors = q1_rnn.trajectory_derivatives, q1_rnn.JacobianFactors
    late = lambda *a, **k: (lambda d: torch.cat([d[:, 1:], d[:, -1:]], 1))(real_derivs(*a, **k))  # noqa: E731
    monkeypatch.setattr(q1_rnn, "trajectory_derivatives", late)  # σ'(h_t) where σ'(h_{t-1}) belongs
    assert not q1_rnn.vanishing_gradients(0, True).confirmed
    monkeypatch.setattr(q1_rnn, "trajectory_derivatives", real_derivs)
    monkeypatch.setattr(q1_rnn, "JacobianFactors", lambda A, d, right, *rest: real_factors(A, d, False, *rest))
    assert not q1_rnn.vanishing_gradients(0, True).confirmed  # diag(σ')W instead of W diag(σ')


def test_3_1_refutes_attention_with_the_wrong_scale(monkeypatch):
    def wrong_scale(x, w_q, w_k, w_v, w_o):
        heads = [torch.softmax((x @ w_q[i]) @ (x @ w_k[i]).mT / w_q.shape[-1], -1) @ (x @ w_v[i])
                 for i in range(w_q.shape[0])]
        return torch.cat(heads, -1) @ w_o

    monkeypatch.setattr(q3_attention, "sequential_heads_attention", wrong_scale)
    ev = q3_attention.cost_of_standard_attention(0, True)
    assert not ev.confirmed and ev.numbers["max_abs_diff_vs_sdpa"] > 1e-3
    # a criterion that the summary line does not show: the failed check names it (the report's reason line)
    assert [k for k, ok in ev.checks.items() if not ok] == [
        f"output vs SDPA per head {ev.numbers['max_abs_diff_vs_sdpa']:.1e} (needs < 1e-12)"]


def test_3_2_refutes_a_wrong_operator_behind_the_measured_cost(monkeypatch):
    def row_softmax_keys(q, k, v, **kwargs):  # linear cost, but not softmax_col(K)
        return torch.softmax(q, -1) @ (torch.softmax(k, -1).mT @ v)

    monkeypatch.setattr(attention, "separable_attention", row_softmax_keys)
    ev = q3_attention.separable_attention_claim(0, True)
    assert not ev.confirmed and ev.numbers["max_abs_diff_fast_vs_matrix"] > 1
    assert any(k.startswith("separable_attention vs the implied matrix") for k, ok in ev.checks.items() if not ok)


def test_4_3a_refutes_weights_that_grow(monkeypatch):
    class SignSlip(Adam):  # L − γ‖θ‖² instead of L + γ‖θ‖²: both groups grow
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(p.detach(), alpha=-2 * group["weight_decay"])
            return super().step(closure)

    monkeypatch.setattr(q4_weight_decay, "Adam", SignSlip)
    ev = q4_weight_decay.adam_l2_is_uneven(0, True)
    assert ev.numbers["rate_ratio_small_over_large"] > 3 and ev.numbers["final_ratio_large_grad"] > 1
    assert not ev.confirmed


def test_3_5_refutes_orthogonal_features_that_are_not_orthogonal(monkeypatch):
    """The ninth session's review: rows mixed across blocks kept the MSE ratio below 1 by noise (0.96-0.99)."""
    from theorylab.attention import features

    real = features.gaussian_orthogonal_random_matrix

    def mixed_blocks(num_rows, dim, **kw):
        rows = real(num_rows, dim, **kw)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(0))
        return rows[perm]  # the same rows, each block now holding directions from different blocks

    assert q3_attention.choice_of_m_claim(0, True).confirmed
    monkeypatch.setattr(features, "gaussian_orthogonal_random_matrix", mixed_blocks)
    assert not q3_attention.choice_of_m_claim(0, True).confirmed
