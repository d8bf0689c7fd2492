"""Optimizer state after the model is cast or moved mid-run, and a state buffer of the wrong shape.

A model cast after the optimizer stepped (``model.double()``) had crashed ``RunningAverageSGD``, ``Adam`` and
``AdamW`` in a foreach op ("expected dtype float for `end` but got dtype double"), with the step count advanced;
torch.optim.SGD ran on. The state now follows its parameter, as torch's ``load_state_dict`` casts a loaded state.
"""

import copy

import pytest
import torch

from theorylab.optim import SGD, Adam, AdamW, RunningAverageSGD, SGDMomentum

OPTIMIZERS = [
    (RunningAverageSGD, {"lr": 0.1, "beta": 0.9, "debias": True}),
    (SGDMomentum, {"lr": 0.1, "momentum": 0.9}),
    (SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (Adam, {"lr": 0.1, "weight_decay": 0.01}),
    (AdamW, {"lr": 0.1, "fused": True}),
    (AdamW, {"lr": 0.1, "amsgrad": True}),
]


def _steps(model, opt, dtype, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=gen).to(dtype)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_state_follows_a_model_cast_mid_run(cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters(), **kwargs)
    _steps(model, opt, torch.float32, 2, seed=1)
    twin = copy.deepcopy(model).double()  # the documented workaround: a state loaded after the cast is cast
    twin_opt = cls(twin.parameters(), **kwargs)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: torch aliases the step counts
    model.double()
    _steps(model, opt, torch.float64, 3, seed=2)
    _steps(twin, twin_opt, torch.float64, 3, seed=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        state = opt.state[p]
        assert state["step"].item() == 5
        assert all(v.dtype == torch.float64 for k, v in state.items() if k != "step")


def test_a_buffer_of_another_shape_is_named():
    model = torch.nn.Linear(3, 2)
    opt = RunningAverageSGD(model.parameters(), lr=0.1, beta=0.9)
    _steps(model, opt, torch.float32, 1, seed=1)
    saved = opt.state_dict()
    saved["state"][0]["running_average"] = torch.zeros(3)  # the weight is (2, 3)
    opt.load_state_dict(saved)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"optimizer state 'running_average' has shape \(3,\) where its parameter "
                                         r"has \(2, 3\)"):
        opt.step()
