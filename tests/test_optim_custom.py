"""Optimizers written by users from the public parts: the Lion example of ``Transform``'s docstring, state that a
part replaces rather than updates in place (complex parameters too), and the base class's checks of ``lr``."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch

from theorylab.optim import SGD, Adam, AdamW, ChainOptimizer, ScaleByLearningRate, Transform, scaled, with_decay

F64 = torch.float64


def docstring_lion() -> type[ChainOptimizer]:
    """The Lion optimizer exactly as ``Transform``'s docstring writes it."""
    doc = Transform.__doc__ or ""
    lines = doc[doc.rindex("\n", 0, doc.index("class LionDirection")) + 1:].splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    end = next((i for i, line in enumerate(lines) if line.strip() and len(line) - len(line.lstrip()) < indent),
               len(lines))  # the example ends where the docstring's text resumes
    code = textwrap.dedent("\n".join(lines[:end]))
    namespace = {"torch": torch, "scaled": scaled, "ChainOptimizer": ChainOptimizer, "with_decay": with_decay}
    exec(code, namespace)
    return namespace["Lion"]


def lion_reference(p0, grads, lr, b1, b2, wd):
    p, m = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        c = (b1 * m + (1 - b1) * g).sign()
        m = b2 * m + (1 - b2) * g
        p = p - lr * (c + wd * p)
    return p


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
def test_the_docstring_lion_equals_a_reference_loop(dtype):
    """Complex parameters: Lion's sign acts on the real and imaginary parts, as on a real view of the tensor."""
    lion = docstring_lion()
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=gen, dtype=dtype)
    grads = [torch.randn(5, 3, generator=gen, dtype=dtype) for _ in range(20)]
    p = torch.nn.Parameter(p0.clone())
    opt = lion([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    real = torch.view_as_real if dtype.is_complex else (lambda t: t)
    expected = lion_reference(real(p0), [real(g) for g in grads], 1e-2, 0.9, 0.99, 0.1)
    torch.testing.assert_close(real(p.detach()), expected, rtol=0, atol=1e-14)
    assert opt.state[p]["exp_avg"].dtype == dtype and opt.state[p]["exp_avg"].shape == p.shape


def test_the_docstring_lion_resumes_from_its_state_dict():
    lion = docstring_lion()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, generator=gen, dtype=F64) for _ in range(6)]
    a = torch.nn.Parameter(torch.ones(4, dtype=F64))
    opt = lion([a], lr=0.1)
    for g in grads[:3]:
        a.grad = g.clone()
        opt.step()
    b = torch.nn.Parameter(a.detach().clone())
    resumed = lion([b], lr=0.1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(a, b)


class HeavyBall:
    """buf ← μ·buf + g, stored as a new tensor every step (not in place); drops a key it no longer needs."""

    def update(self, updates, ctx):
        mu, out = ctx.group["momentum"], []
        for state, g in zip(ctx.states, scaled(updates, ctx), strict=True):
            state["buf"] = mu * state["buf"] + g if "buf" in state else g.clone()
            if ctx.step == 1:
                state["stale"] = True  # deleted at the next step
            else:
                state.pop("stale", None)
            out.append(state["buf"])
        ctx.owned = False  # the state buffers themselves
        return out


class HeavyBallSGD(ChainOptimizer):
    def __init__(self, params, lr, momentum):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    def transforms(self, group):
        return [HeavyBall(), ScaleByLearningRate()]


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
def test_state_a_part_replaces_reaches_the_optimizer(dtype):
    """For complex parameters the chain sees real views of a copy of each state dict: a replaced buffer, and a
    deleted key, were dropped (the buffer stayed at its first step's value: −0.67 where torch.optim.SGD gives
    −0.90)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    q = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    ours, ref = HeavyBallSGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(5):
        g = torch.randn(3, generator=gen, dtype=dtype)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(ours.state[p]["buf"], ref.state[q]["momentum_buffer"], rtol=0, atol=1e-15)
    assert ours.state[p]["buf"].dtype == dtype and "stale" not in ours.state[p]


class PlainSGD(ChainOptimizer):
    """A subclass that validates nothing itself: the base class checks lr."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def transforms(self, group):
        return [ScaleByLearningRate()]


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf")])
def test_the_base_class_checks_the_lr_of_a_subclass(lr):
    """It had accepted them: a negative lr was refused only at the first step under an internal key's name
    ("Invalid lr_at_construction value"), and one written into param_groups climbed the gradient."""
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        PlainSGD([p], lr=lr)
    opt = PlainSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr})
    opt.param_groups[0]["lr"] = lr
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"PlainSGD: parameter group 0: Invalid learning rate"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(2))


def test_a_group_without_an_lr_is_refused_clearly():
    class NoLr(ChainOptimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def transforms(self, group):
            return []

    with pytest.raises(ValueError, match="needs a learning rate 'lr'"):
        NoLr([torch.nn.Parameter(torch.ones(1))])


def test_a_bad_value_written_into_param_groups_names_its_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match=r"Adam: parameter group 1: .*beta"):
        opt.step()


@pytest.mark.parametrize("lr", ["0.1", None, torch.tensor([0.1, 0.2]), 1 + 0j])
@pytest.mark.parametrize("make", [
    lambda lr: AdamW([torch.nn.Parameter(torch.ones(1))], lr=lr),
    lambda lr: Adam([torch.nn.Parameter(torch.ones(1))], lr=lr, weight_decay=0.1, decay="decoupled"),
    lambda lr: SGD([torch.nn.Parameter(torch.ones(1))], lr=lr, weight_decay=0.1),
])
def test_a_wrongly_typed_lr_is_named_at_construction(make, lr):
    """The decay checks computed with the lr before it was checked: "can't multiply sequence by non-int"."""
    with pytest.raises(TypeError, match="Invalid learning rate"):
        make(lr)


class RangeError(ValueError):
    def __init__(self, what, value):
        super().__init__(f"{what} out of range: {value}")


class Strict(PlainSGD):
    def check_group(self, group):
        if group.get("tau", 0) > 1:
            raise RangeError("tau", group["tau"])


def test_a_step_time_error_keeps_its_message_and_says_its_group_once():
    """A ValueError subclass whose constructor takes other arguments became an unrelated TypeError; a torch switch's
    error named the optimizer twice ("Adam: parameter group 0: Adam: capturable=True ...")."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = Strict([p], lr=0.1)
    opt.param_groups[0]["tau"] = 2
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"^Strict: parameter group 0: tau out of range: 2$"):
        opt.step()
    adam = Adam([p], lr=0.1)
    adam.param_groups[0]["capturable"] = True
    with pytest.raises(ValueError, match=r"^Adam: parameter group 0: capturable=True") as info:
        adam.step()
    assert str(info.value).count("Adam:") == 1
