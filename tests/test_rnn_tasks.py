"""RNN tasks (adding, copy memory, digits), the training loop, the Q1 claims and the rnn bench (smoke)."""

import math

import pytest
import torch

from theorylab.rnn.tasks import (
    ADDING_BASELINE,
    COPY_LENGTH,
    SequenceModel,
    adding_problem,
    copy_baseline,
    copy_memory,
    digits_sequences,
    train,
)


def test_adding_problem_layout_and_baseline():
    gen = torch.Generator().manual_seed(0)
    x, y = adding_problem(20000, 30, gen)
    assert x.shape == (20000, 30, 2) and y.shape == (20000, 1)
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((20000,), 2.0))
    assert (markers[:, :15].sum(1) == 1).all() and (markers[:, 15:].sum(1) == 1).all()
    torch.testing.assert_close(y[:, 0], (x[..., 0] * markers).sum(1))
    mse_of_predicting_one = ((y - 1.0) ** 2).mean().item()
    assert mse_of_predicting_one == pytest.approx(ADDING_BASELINE, rel=0.03)


def test_copy_memory_layout_and_baseline():
    gen = torch.Generator().manual_seed(1)
    steps = 7
    x, y = copy_memory(50, steps, gen)
    assert x.shape == (50, steps + 20, 10) and y.shape == (50, steps + 20)
    tokens = x.argmax(-1)
    assert torch.equal(y[:, -COPY_LENGTH:], tokens[:, :COPY_LENGTH])
    assert (tokens[:, COPY_LENGTH + steps - 1] == 9).all() and (y[:, :-COPY_LENGTH] == 0).all()
    # the baseline: blank with certainty, then uniform over 8 symbols
    logits = torch.full((50, steps + 20, 9), -1e9)
    logits[:, :-COPY_LENGTH, 0] = 0.0
    logits[:, -COPY_LENGTH:, 1:] = 0.0
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1)).item()
    assert ce == pytest.approx(copy_baseline(steps), rel=1e-6)
    assert copy_baseline(steps) == pytest.approx(10 * math.log(8) / (steps + 20))


def test_digits_sequences():
    x_tr, y_tr, x_te, y_te = digits_sequences()
    assert x_tr.shape[1:] == (64, 1) and x_te.shape[1:] == (64, 1)
    assert len(y_tr) + len(y_te) == 1797 and 0 <= x_tr.min() and x_tr.max() <= 1
    assert set(y_tr.tolist()) == set(range(10))


def test_orthogonal_init_and_bad_task():
    model = SequenceModel(2, 8, 1, orthogonal=True)
    w = model.rnn.W.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'sorting'"):
        train("sorting", 5)
    with pytest.raises(ValueError, match="T >= 2"):
        adding_problem(3, 1, torch.Generator())


def test_training_learns_a_short_adding_problem():
    r = train("adding", 5, clip=1.0, orthogonal=True, hidden=16, iterations=150, lr=1e-2)
    assert r.metric < 0.7  # well below the predict-1 baseline
    assert r.reach_init > -3 and math.isfinite(r.max_grad_norm)


def test_q1_claims_confirmed_quick():
    from theorylab.claims.q1_rnn import equivalent_recurrences, exploding_gradients, vanishing_gradients

    for fn in (equivalent_recurrences, vanishing_gradients, exploding_gradients):
        ev = fn(0, True)
        assert ev.confirmed, (fn.__name__, ev.notes, ev.numbers)
        assert ev.figures


def test_vanishing_claim_accepts_an_exactly_zero_jacobian():
    """Seed 2 (full size) has a unit whose Jacobian product becomes exactly 0 (log-norm −inf): the bound holds."""
    from theorylab.claims.q1_rnn import vanishing_gradients

    ev = vanishing_gradients(2, False)
    assert ev.numbers["min_log10_norm"] == float("-inf")  # the case this test is about
    assert ev.confirmed, ev.numbers


def test_bench_rnn_quick_runs():
    from theorylab.bench import rnn as bench

    result = bench.run(quick=True)
    assert all(r["max_rel_err_vs_svd"] < 1e-8 for r in result["log_jacobian_norms"])
    assert all(r["max_rel_err_vs_autograd"] < 1e-8 for r in result["vs_autograd"])
    assert "lyapunov_spectrum" in bench.format_table(result)
