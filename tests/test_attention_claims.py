"""The Q3 claims run (quick sizes) and are confirmed; the closed forms they compare with are right."""

import math

import pytest
import torch

from theorylab.claims import q3_attention as q3


@pytest.mark.parametrize("fn", [q3.cost_of_standard_attention, q3.separable_attention_claim,
                                q3.kernelised_attention_claim, q3.positive_random_features_claim,
                                q3.choice_of_m_claim])
def test_q3_claim_confirmed_quick(fn):
    evidence = fn(0, True)
    assert evidence.confirmed, evidence.numbers
    assert evidence.figures and evidence.method


def test_closed_form_mse_against_direct_integration():
    """Check the Performer closed forms by integrating over ω's projection directly (d = 1, quadrature)."""
    x, y = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    w = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    pdf = torch.exp(-w * w / 2) / math.sqrt(2 * math.pi)
    dw = w[1] - w[0]
    sm = math.exp(float(x @ y))
    positive = torch.exp(w * (x + y) - (x * x + y * y) / 2)
    trig = torch.exp((x * x + y * y) / 2) * torch.cos(w * (x - y))
    for est, closed in ((positive, q3.mse_positive(x, y, 1)), (trig, q3.mse_trig(x, y, 1))):
        mean = float((est * pdf).sum() * dw)
        var = float(((est - sm) ** 2 * pdf).sum() * dw)
        assert mean == pytest.approx(sm, rel=1e-8)
        assert var == pytest.approx(closed, rel=1e-6)


def test_taylor_features_factorise_the_exponential_kernel():
    f = q3.TaylorFeatures(3, 10)
    assert f.num_features == math.comb(13, 3)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x, y = 0.7 * x / x.norm(dim=-1, keepdim=True), 0.7 * y / y.norm(dim=-1, keepdim=True)  # |xᵀy| <= 0.49
    torch.testing.assert_close(f(x) @ f(y).mT, torch.exp(x @ y.mT), atol=1e-10, rtol=1e-10)
