"""What session 28's journeys found in theorylab.optim, and the documented numbers they checked."""

import math
import warnings

import pytest
import torch

from theorylab.optim import Adam


def test_fused_float16_adam_steps_are_too_long_by_the_documented_factor():
    """The docs said 1.4×, 9.8× and 31× at steps 2, 100 and 1000 for fused float16 Adam, whose stored second
    moment stays 0; 31× was float16 rounding of an accumulated parameter (2⁻⁵/1e-3). Each step alone is
    √((1 − β₂ᵗ)/(1 − β₂)) too long: 1.41, 9.76, 25.1."""
    g, eps, lr, beta2 = 1e-3, 1e-7, 1e-3, 0.999
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Adam([p], lr=lr, eps=eps, fused=True)
        factors = {}
        for t in range(1, 1001):
            with torch.no_grad():
                p.zero_()  # p then holds exactly this step's update
            p.grad = torch.full((1,), g, dtype=torch.float16)
            opt.step()
            factors[t] = -float(p.detach()) / (lr * g / (g + eps))
    assert float(opt.state[p]["exp_avg_sq"]) == 0.0
    for t, documented in ((2, 1.4), (100, 9.8), (1000, 25.0)):
        expected = math.sqrt((1 - beta2**t) / (1 - beta2))
        assert factors[t] == pytest.approx(expected, rel=1e-2)  # the first moment, kept in float16, rounds too
        assert round(expected, 1) == pytest.approx(documented, abs=0.15)
