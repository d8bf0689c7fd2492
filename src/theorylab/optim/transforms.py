r"""Composable gradient transforms, in the manner of optax, over torch tensors.

A transform maps the list of *updates* of one parameter group (initially the gradients) to a new list of
updates. A chain of transforms runs left to right and the optimizer then applies :math:`p \leftarrow p - u`.
Every named optimizer in :mod:`theorylab.optim` is such a chain; what distinguishes, say, Adam + L2 from
decoupled decay is only *where* :class:`AddDecayedWeights` sits relative to :class:`ScaleByAdam`::

    Adam + L2            [AddDecayedWeights, ScaleByAdam, ScaleByLearningRate]
    AdamW (torch)        [ScaleByAdam, AddDecayedWeights, ScaleByLearningRate]          λ·lr·θ
    Adam, decoupled      [ScaleByAdam, ScaleByLearningRate, AddDecayedWeights(sched.)]  λ·(lr/lr₀)·θ

torch.optim's ``maximize=True`` is a :class:`Negate` in front of any of these, and its ``amsgrad=True`` is
``ScaleByAdam(amsgrad=True)``.

Each transform keeps its per-parameter state under its own keys in ``optimizer.state[p]`` (so ``state_dict``
works unchanged) and works on whole lists with ``torch._foreach_*`` kernels, which is what torch.optim's
``foreach`` implementations do.

Two cheap tricks keep a chain as fast as torch's hand-written foreach loops (``theorylab bench optim``):

* **Deferred arithmetic.** The true update is ``ctx.scale * updates / ctx.denom + ctx.decay * params``: a
  transform that multiplies by a number (the learning rate, a bias correction) only multiplies ``ctx.scale``
  and ``ctx.decay``, :class:`AddDecayedWeights` only adds to ``ctx.decay``, and :class:`ScaleByAdam` leaves its
  division pending in ``ctx.denom``. The optimizer applies them at the end as ``p.mul_(1 - decay)`` then
  ``p.addcdiv_(u, denom, value=-scale)``, the operations of torch.optim.AdamW's foreach step. A transform
  that needs the true values calls :func:`scaled`.
* **Copy on write.** The chain starts from the gradients themselves, not copies; ``ctx.owned`` says whether the
  current list belongs to the chain. A transform that writes into its input calls :func:`writable` first, which
  copies only when needed. Transforms that return their state buffers set ``ctx.owned = False``.

Transforms receive a :class:`StepContext`: the parameters, their per-parameter state dicts, the parameter
group (so hyperparameters read from the group, and lr schedulers are honoured), and the step count ``t``
(1 on the first step). All of them read ``p`` before the step is applied: decay uses the old parameter value,
as torch.optim does.

Under ``torch.compile(opt.step)`` the chain is traced into one graph, which inductor fuses into one pass over
memory per tensor (as fast as torch's fused AdamW kernel on the CPU). There ``ctx.scale`` and ``ctx.decay`` are
0-dim tensors and the powers of the step count are made before the graph (:meth:`StepContext.power`), for
reasons given at :meth:`~theorylab.optim.ChainOptimizer.step`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, cast

import torch
from torch import Tensor

#: half-precision dtypes, where deferring a small factor to a separate multiply can round it away
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: the updates passed along a chain: the gradients (a list) or the output of a ``torch._foreach_*`` op (a tuple)
TensorList: TypeAlias = list[Tensor] | tuple[Tensor, ...]


@dataclass
class StepContext:
    """What a transform may read during one optimizer step of one parameter group.

    ``scale``, ``denom``, ``decay`` and ``owned`` describe the current updates: the true update is
    ``scale * updates / denom + decay * params`` (no division when ``denom`` is None), and ``owned`` is False
    while ``updates`` may alias tensors that are not the chain's (the gradients, a state buffer), which must then
    not be modified in place.
    """

    params: list[Tensor]
    states: list[dict[str, Any]]
    group: dict[str, Any]
    step: int
    scale: float | Tensor = 1.0
    decay: float | Tensor = 0.0
    denom: TensorList | None = None
    owned: bool = False
    #: ``scratch(params) -> list[Tensor]``: reusable per-parameter work tensors (uninitialised), or None
    scratch: Callable[[list[Tensor]], list[Tensor]] | None = None
    #: the powers of the step count made before the step, by key (see :meth:`power`), or None
    powers: dict[str, Tensor] | None = None
    #: traced by torch.compile (see :meth:`~theorylab.optim.ChainOptimizer.step`): ``scale`` and ``decay`` are 0-dim
    #: float64 tensors, and the ops that take a number run per tensor, not as foreach ops
    compiling: bool = False

    #: under torch.compile, where ``scale`` and ``decay`` are tensors whose values are not read back: whether a
    #: part added a non-zero decay, and whether a zero lr zeroed the scale (so that 0·inf makes no NaN that the
    #: eager step, which tests the values, does not make)
    decay_added: bool = False
    scale_zeroed: bool = False

    def has_decay(self) -> bool:
        """Whether ``decay`` may be non-zero."""
        return self.decay_added if self.compiling else bool(self.decay != 0.0)

    def has_scale(self) -> bool:
        """Whether ``scale`` may be non-zero."""
        return not self.scale_zeroed if self.compiling else bool(self.scale != 0.0)

    def number(self, value: float) -> float | Tensor:
        """``value`` in the form of ``scale`` and ``decay``: a float, or a 0-dim float64 tensor."""
        return torch.tensor(value, dtype=torch.float64) if self.compiling else value

    def complement(self, x: float) -> float | Tensor:
        """``1 - x`` (a weight ``1 - β`` or ``1 - dampening``); under torch.compile a 0-dim float64 tensor. A float
        of the group that a schedule changes (OneCycleLR's β₁) is symbolic there, and torch 2.11 specialised
        ``1.0 - β`` fed to a tensor op: one recompile per value until dynamo's limit of 8."""
        return self.number(1.0) - x if self.compiling else 1.0 - x

    def power(self, base: float, key: str) -> float | Tensor:
        """``base ** step``, for bias corrections: ``powers[key]`` when it was made before the step (``key`` is the
        state key of the average it debiases, as the part's ``power_bases(group)`` names it), else computed."""
        if self.powers is not None and key in self.powers:
            return self.powers[key]
        return base**self.step


class Transform(Protocol):
    r"""``update(updates, ctx) -> updates``; see :func:`scaled` and :func:`writable` for the two conventions.

    **Writing one.** ``ctx.states[i]`` is ``optimizer.state[p]`` of parameter ``ctx.params[i]``: what a part
    stores there (tensors shaped like the parameter, made on the first step) is saved and loaded by
    ``state_dict``. It may update a buffer in place or store a new one; complex parameters come as real
    ``(..., 2)`` views and their buffers are stored back complex, either way. A part that is not linear in its
    input reads the true values with :func:`scaled` (the chain defers multiplications), and one that returns new
    tensors sets ``ctx.owned = True``. Hyperparameters come from ``ctx.group``; a subclass of
    :class:`~theorylab.optim.ChainOptimizer` validates its own in ``check_group`` (the base class checks ``lr``).
    Lion (Chen et al. 2023), :math:`p \leftarrow p - \text{lr}\,(\operatorname{sign}(\beta_1 m + (1-\beta_1) g)
    + \lambda p)`, then :math:`m \leftarrow \beta_2 m + (1-\beta_2) g`::

        class LionDirection:
            def update(self, updates, ctx):
                b1, b2 = ctx.group["betas"]
                out = []
                for g, state in zip(scaled(updates, ctx), ctx.states):
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(g)
                    m = state["exp_avg"]
                    out.append(torch.lerp(g, m, b1).sign())  # sign(β1·m + (1 − β1)·g)
                    m.lerp_(g, 1 - b2)
                ctx.owned = True
                return out

        class Lion(ChainOptimizer):  # (a check_group for betas and lr·λ < 1 is left out here)
            def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
                super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

            def transforms(self, group):  # the direction, then λ·p, then the lr (torch's AdamW convention)
                return with_decay([LionDirection()], "decoupled_lr")

    A part whose update depends on the step count through powers :math:`\beta^t` (bias corrections) takes them
    from :meth:`StepContext.power` and names the bases in an optional ``power_bases(group) -> dict[str, float]``
    (by the state key of the average each power debiases):
    under ``torch.compile`` they are then made before the graph (see
    :meth:`~theorylab.optim.ChainOptimizer.step`). ``ctx.scale`` and ``ctx.decay`` may then be 0-dim tensors.
    """

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Transform one bucket's updates (one tensor per parameter of ``ctx.params``), reading and writing the
        per-parameter state in ``ctx.states`` and the hyperparameters in ``ctx.group``; return the new updates."""
        ...


def _sqrt(x: float | Tensor) -> float | Tensor:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


# The ops that take a number. Under torch.compile (``each``, from ``ctx.compiling``) they run one op per tensor, which
# compiles to the same fused kernel: a foreach op would read a 0-dim tensor back (a graph break), and would make a
# float of the group (a momentum or beta that a schedule changes) a constant of the graph, one recompile per value.
def _mul_(xs: TensorList, s: float | Tensor, each: bool) -> None:
    if each:
        for x in xs:
            x.mul_(s)
    else:
        torch._foreach_mul_(xs, s)


def _mul(xs: TensorList, s: float | Tensor, each: bool) -> TensorList:
    return [x * s for x in xs] if each else torch._foreach_mul(xs, s)


def _add_(xs: TensorList, s: float | Tensor, each: bool) -> None:
    if each:
        for x in xs:
            x.add_(s)
    else:
        torch._foreach_add_(xs, s)


def _div_(xs: TensorList, s: float | Tensor, each: bool) -> None:
    if each:
        for x in xs:
            x.div_(s)
    else:
        torch._foreach_div_(xs, s)


def _axpy_(ys: TensorList, xs: TensorList, a: float | Tensor, each: bool) -> None:
    """``y += a * x`` for every pair."""
    if each:
        for y, x in zip(ys, xs, strict=True):
            y.add_(x * a)
    else:
        torch._foreach_add_(ys, xs, alpha=cast(float, a))  # a number whenever not ``each``


def _axpy(ys: TensorList, xs: TensorList, a: float | Tensor, each: bool) -> TensorList:
    if each:
        return [y + x * a for y, x in zip(ys, xs, strict=True)]
    return torch._foreach_add(ys, xs, alpha=cast(float, a))


def _lerp_(xs: TensorList, ys: TensorList, w: float | Tensor, each: bool) -> None:
    """``x += w * (y - x)`` for every pair."""
    if each:  # not lerp_, whose weight (a Scalar argument) torch.compile would make a constant of the graph
        for x, y in zip(xs, ys, strict=True):
            x.add_((y - x) * w)
    else:
        torch._foreach_lerp_(xs, ys, cast(float, w))  # a number whenever not ``each``


def _addcmul_(xs: TensorList, ys: TensorList, zs: TensorList, value: float | Tensor, each: bool) -> None:
    """``x += value * y * z`` for every triple."""
    if each:  # not addcmul_, for the same reason as in _lerp_
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.add_(y * z * value)
    else:
        torch._foreach_addcmul_(xs, ys, zs, cast(float, value))


def scaled(updates: TensorList, ctx: StepContext) -> TensorList:
    """The true updates ``scale * u / denom + decay * p``, read-only unless ``ctx.owned``; resets the deferred
    arithmetic."""
    if ctx.denom is not None:
        if ctx.owned:
            torch._foreach_div_(updates, ctx.denom)
        else:
            updates = torch._foreach_div(updates, ctx.denom)
            ctx.owned = True
        ctx.denom = None
    if ctx.compiling or ctx.scale != 1.0:
        if ctx.owned:
            _mul_(updates, ctx.scale, ctx.compiling)
        else:
            updates = _mul(updates, ctx.scale, ctx.compiling)
            ctx.owned = True
        ctx.scale, ctx.scale_zeroed = ctx.number(1.0), False
    if ctx.has_decay():
        if ctx.owned:
            _axpy_(updates, ctx.params, ctx.decay, ctx.compiling)
        else:
            updates = _axpy(updates, ctx.params, ctx.decay, ctx.compiling)
            ctx.owned = True
        ctx.decay, ctx.decay_added = ctx.number(0.0), False
    return updates


def writable(updates: TensorList, ctx: StepContext) -> TensorList:
    """The true updates as tensors the chain owns (copied if needed), safe to modify in place."""
    updates = scaled(updates, ctx)
    if not ctx.owned:
        updates = [u.clone() for u in updates]
        ctx.owned = True
    return updates


def state_buffer(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    """The per-parameter state tensor ``state[key]`` for a parameter shaped and placed as ``like`` (the parameter or
    its update): made as zeros like it on first use. An existing buffer keeps its dtype, as torch.optim.SGD's
    momentum buffer does (a model cast after the optimizer stepped goes on with its state in the old precision; a
    float32 state kept for bfloat16 parameters stays float32; the parts cast their inputs to it); it follows a
    model moved to another device. A buffer of another shape raises a ValueError that names it (it had failed
    later in a broadcast). To cast the state with the model: ``opt.load_state_dict(opt.state_dict())``, as in
    torch."""
    buf = state.get(key)
    if buf is None:
        buf = state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    elif buf.shape != like.shape:
        raise ValueError(f"optimizer state {key!r} has shape {tuple(buf.shape)} where its parameter has "
                         f"{tuple(like.shape)}: a state from another model, or a parameter replaced by one of another "
                         "shape (build a new optimizer, or delete that parameter's entry of optimizer.state)")
    elif buf.device != like.device:
        buf = state[key] = buf.to(like.device)
    return buf


def _in_dtypes_of(xs: TensorList, buffers: TensorList) -> TensorList:
    """``xs``, each cast to its buffer's dtype where they differ (a state kept in another precision than its
    parameter: see :func:`state_buffer`): lerp and addcmul take one dtype (a model cast after the optimizer stepped
    had failed in them with "expected dtype float for `end` but got dtype double")."""
    if all(x.dtype == b.dtype for x, b in zip(xs, buffers, strict=True)):
        return xs
    return [x if x.dtype == b.dtype else x.to(b.dtype) for x, b in zip(xs, buffers, strict=True)]


def _buffers(ctx: StepContext, key: str, like: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter state tensors under ``key`` (see :func:`state_buffer`)."""
    return [state_buffer(state, key, u) for state, u in zip(ctx.states, like, strict=True)]


@dataclass(frozen=True)
class ScaleByLearningRate:
    r"""``u <- lr * u`` with ``lr = group["lr"]`` read at every step (so lr schedulers apply). Deferred: free."""

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Multiply the updates' scale by the group's lr (deferred: see :class:`StepContext`)."""
        lr = ctx.group["lr"]
        ctx.scale *= lr
        ctx.decay *= lr
        if lr == 0:
            ctx.scale_zeroed, ctx.decay_added = True, False
        return updates


@dataclass(frozen=True)
class Negate:
    r"""``u <- -u``: ascend instead of descend (torch.optim's ``maximize=True``; optax's ``scale(-1)``). Deferred:
    it flips the sign of ``ctx.scale`` and ``ctx.decay``, so the negation is free and exact.

    It goes first in a chain, so that everything after it (momentum, Adam's moments, L2's :math:`+\lambda\theta`)
    sees :math:`-\nabla L`, as in torch.optim: L2 then still pulls θ towards 0, and a decoupled decay is unchanged.
    """

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Negate the updates (``maximize``: ascend)."""
        ctx.scale = -ctx.scale
        ctx.decay = -ctx.decay
        return updates


@dataclass(frozen=True)
class Trace:
    r"""Momentum as a trace: :math:`v_t = \mu\, v_{t-1} + u_t`, output :math:`v_t`.

    ``mu`` is read from ``group[key]``. With ``dampening`` d the input is scaled by (1 - d), as torch.optim.SGD;
    ``first_step_copies=True`` initialises :math:`v_1 = u_1` without dampening (torch.optim.SGD's buffer rule).
    ``nesterov`` returns :math:`u_t + \mu v_t`. With μ = 0 it is the identity and keeps no state.
    """

    key: str = "momentum"
    state_key: str = "momentum_buffer"
    dampening_key: str | None = None
    first_step_copies: bool = False
    nesterov_key: str | None = None

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Accumulate the updates into the momentum buffer and return it (or the Nesterov look-ahead)."""
        mu = ctx.group[self.key]
        if mu == 0:
            return updates
        updates = scaled(updates, ctx)
        damp = ctx.group[self.dampening_key] if self.dampening_key else 0.0
        fresh = [self.state_key not in s for s in ctx.states]
        bufs = _buffers(ctx, self.state_key, updates)
        copies = fresh if self.first_step_copies else [False] * len(fresh)
        if all(copies):
            torch._foreach_copy_(bufs, updates)
        elif not any(copies):
            _mul_(bufs, mu, ctx.compiling)
            _axpy_(bufs, updates, ctx.complement(damp), ctx.compiling)
        else:  # buffers created beside existing ones (e.g. momentum switched on after some steps at 0) start at u,
            # undamped, as torch.optim.SGD's per-parameter rule
            kept = [i for i, c in enumerate(copies) if not c]
            made = [i for i, c in enumerate(copies) if c]
            _mul_([bufs[i] for i in kept], mu, ctx.compiling)
            _axpy_([bufs[i] for i in kept], [updates[i] for i in kept], ctx.complement(damp), ctx.compiling)
            torch._foreach_copy_([bufs[i] for i in made], [updates[i] for i in made])
        if self.nesterov_key and ctx.group.get(self.nesterov_key, False):
            if any(u.dtype != b.dtype for u, b in zip(updates, bufs, strict=True)):
                # a buffer kept in another precision (state_buffer): u + μv out of place, in the promoted dtype, as
                # torch.optim.SGD does; in place it had been rounded to the parameter's (0.77 against 0.36 ulp)
                updates = _axpy(updates, bufs, mu, ctx.compiling)  # (updates are scaled above)
                ctx.owned = True
            else:
                updates = writable(updates, ctx)
                _axpy_(updates, bufs, mu, ctx.compiling)
            return updates
        ctx.owned = False  # the buffers are state: later transforms must copy before writing
        return bufs


@dataclass(frozen=True)
class RunningAverage:
    r"""Exponential running average :math:`v_t = \beta v_{t-1} + (1-\beta) u_t` with :math:`v_0 = 0`.

    Unrolled, :math:`v_t = (1-\beta)\sum_{i=1}^t \beta^{t-i} u_i`, whose weights sum to :math:`1-\beta^t`: under
    a stationary mean μ, :math:`E[v_t] = (1-\beta^t)\mu`. With ``debias`` the output is
    :math:`\hat v_t = v_t / (1-\beta^t)`, which is unbiased. ``beta`` is read from ``group[key]`` (or from
    ``group[key][index]`` when ``index`` is set, for Adam's ``betas``); ``debias`` from ``group[debias_key]``
    when that is set.
    """

    key: str = "beta"
    state_key: str = "running_average"
    index: int | None = None
    debias: bool = False
    debias_key: str | None = None

    def beta(self, group: dict[str, Any]) -> float:
        """The decay rate β of the average, ``group[key]`` (its ``index``-th entry when the key holds a tuple,
        as Adam's ``betas``)."""
        b = group[self.key]
        return b[self.index] if self.index is not None else b

    def debiased(self, group: dict[str, Any]) -> bool:
        r"""Whether the output is divided by :math:`1-\beta^t`: ``group[debias_key]``, else ``debias``."""
        return bool(group[self.debias_key]) if self.debias_key else self.debias

    def power_bases(self, group: dict[str, Any]) -> dict[str, float]:
        """β when debiased, by the average's state key: its step-th power is what :meth:`update` takes from
        :meth:`StepContext.power`."""
        return {self.state_key: self.beta(group)} if self.debiased(group) else {}

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Update the running average with the updates and return it (debiased when asked)."""
        beta = self.beta(ctx.group)
        updates = scaled(updates, ctx)
        bufs = _buffers(ctx, self.state_key, updates)
        _lerp_(bufs, _in_dtypes_of(updates, bufs), ctx.complement(beta), ctx.compiling)  # v <- βv + (1-β)u
        ctx.owned = False
        if self.debiased(ctx.group):
            ctx.scale = ctx.scale / (1.0 - ctx.power(beta, self.state_key))
        return bufs


_warned_float16_adam = False  # once per process (a flag: Python's registry is cleared by any change of the filters)


def warn_float16_second_moment(params: Sequence[Tensor], beta2: float) -> None:
    r"""Warn (once per process) when Adam steps float16 parameters: their second moment is kept in float16, where
    :math:`(1-\beta_2)g^2` below 2⁻²⁵ rounds to 0, so gradient entries below :math:`\sqrt{2^{-25}/(1-\beta_2)}`
    (5.5e-3 at β₂ = 0.999) get steps of ±inf or NaN (eps below float16's 6e-8, the default 1e-8 included) or far
    too long ones (2.5·10⁴× at eps = 1e-7; ``fused=True`` computes the first step in float32, then 1.4×, 9.8× and
    25× at steps 2, 100 and 1000, √((1 − β₂ᵗ)/(1 − β₂)) since the stored moment stays 0). torch.optim.Adam does
    the same."""
    global _warned_float16_adam
    if _warned_float16_adam or not any(p.dtype == torch.float16 for p in params):
        return
    _warned_float16_adam = True
    threshold = math.sqrt(2.0**-25 / (1.0 - beta2)) if beta2 < 1 else math.inf
    warnings.warn(
        f"Adam with float16 parameters: the second moment (1 - beta2)·g² underflows to 0 in float16 for gradient "
        f"entries below {threshold:.1e} (beta2 = {beta2}), which then get steps of inf/NaN or far too long ones "
        "(torch.optim.Adam does the same). Keep float32 parameters and train under torch.autocast (mixed "
        "precision), or use bfloat16, whose range is float32's", UserWarning, stacklevel=2)


@dataclass(frozen=True)
class ScaleByAdam:
    r"""Adam's scaling (Kingma & Ba 2015, Algorithm 1) without the learning rate.

    With :math:`(\beta_1, \beta_2)` = ``group["betas"]`` and δ = ``group["eps"]``:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) u_t, \quad r_t = \beta_2 r_{t-1} + (1-\beta_2) u_t^2, \quad
        \text{out} = \frac{\hat m_t}{\sqrt{\hat r_t} + \delta},\ \hat m_t = \frac{m_t}{1-\beta_1^t},\
        \hat r_t = \frac{r_t}{1-\beta_2^t}.

    δ is added to :math:`\sqrt{\hat r_t}` (outside the root), as torch.optim.Adam. Computed as
    :math:`\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\cdot m_t / (\sqrt{r_t} + \delta\sqrt{1-\beta_2^t})`, which is the
    same number with two fewer passes over memory (the scalar is deferred); in float16 and bfloat16, where
    :math:`\delta\sqrt{1-\beta_2^t}` can round to 0, as torch computes it. State: ``exp_avg`` (m) and
    ``exp_avg_sq`` (r), torch's names. :math:`u^2` is the elementwise square of real tensors: complex parameters
    reach the chain as ``view_as_real`` pairs (see :class:`~theorylab.optim.ChainOptimizer`), so r holds the
    running mean of each component's square, as in torch.optim.Adam.

    With ``amsgrad`` (Reddi et al. 2018, as torch.optim.Adam's ``amsgrad=True``) the denominator uses the largest
    second moment so far, :math:`\hat r_t = \max_{i \le t} r_i / (1-\beta_2^t)`, kept under ``max_exp_avg_sq``
    (torch's name). That buffer is created as zeros the first time it is needed, so switching ``amsgrad`` on after
    some steps (or loading a state saved without it) starts the maximum at the current :math:`r_t`.
    """

    amsgrad: bool = False

    def power_bases(self, group: dict[str, Any]) -> dict[str, float]:
        """β₁ and β₂ by the state keys of the moments they debias: their step-th powers are what :meth:`update`
        takes from :meth:`StepContext.power`."""
        beta1, beta2 = group["betas"]
        return {"exp_avg": beta1, "exp_avg_sq": beta2}

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Update both moments with the updates and return Adam's direction (the denominator deferred)."""
        beta1, beta2 = ctx.group["betas"]
        eps = ctx.group["eps"]
        grads = scaled(updates, ctx)
        m = _buffers(ctx, "exp_avg", grads)
        r = _buffers(ctx, "exp_avg_sq", grads)
        _lerp_(m, _in_dtypes_of(grads, m), ctx.complement(beta1), ctx.compiling)
        _mul_(r, beta2, ctx.compiling)
        grads_r = _in_dtypes_of(grads, r)
        _addcmul_(r, grads_r, grads_r, ctx.complement(beta2), ctx.compiling)
        if self.amsgrad:
            r_max = _buffers(ctx, "max_exp_avg_sq", grads)
            torch._foreach_maximum_(r_max, _in_dtypes_of(r, r_max))
            r = r_max
        bc1, bc2_sqrt = 1.0 - ctx.power(beta1, "exp_avg"), _sqrt(1.0 - ctx.power(beta2, "exp_avg_sq"))
        denom: TensorList
        # a reused buffer (a fresh one costs page faults every step on CPU), shaped and typed as the parameter: not
        # for a second moment kept in another precision, whose square root would be rounded to the parameter's
        if ctx.scratch is not None and all(r_i.dtype == p.dtype for r_i, p in zip(r, ctx.params, strict=True)):
            denom = ctx.scratch(ctx.params)
            for r_i, d_i in zip(r, denom, strict=True):
                torch.sqrt(r_i, out=d_i)
        else:
            denom = torch._foreach_sqrt(r)
        if any(p.dtype in HALF_DTYPES for p in ctx.params):
            warn_float16_second_moment(ctx.params, beta2)
            # torch.optim's order, one more pass: in float16, δ·√(1−β₂ᵗ) (1e-8 · 0.03 at t = 1) rounds to 0, and a
            # zero gradient entry would then give 0/0
            _div_(denom, bc2_sqrt, ctx.compiling)
            _add_(denom, eps, ctx.compiling)
            ctx.scale /= bc1
        else:
            _add_(denom, eps * bc2_sqrt, ctx.compiling)
            ctx.scale *= bc2_sqrt / bc1
        ctx.denom = denom  # the division m / denom is left to the optimizer's addcdiv_
        ctx.owned = False
        return m


#: the group key under which :class:`~theorylab.optim.ChainOptimizer` records the lr a group was created with
CONSTRUCTION_LR_KEY = "lr_at_construction"


def reference_lr(group: dict[str, Any]) -> float:
    r""":math:`\text{lr}_0` of the schedule multiplier: ``initial_lr`` where an lr scheduler recorded it (torch's
    schedulers set it when created, CyclicLR after moving the lr to its ``base_lr``), else the lr the group was
    created with (so an lr set by hand at every step is measured against a fixed reference), else the lr."""
    lr0 = group.get("initial_lr")
    return lr0 if lr0 is not None else group.get(CONSTRUCTION_LR_KEY, group["lr"])


def schedule_multiplier(group: dict[str, Any]) -> float:
    r""":math:`\eta_t = \text{lr}/\text{lr}_0`, the schedule multiplier of Loshchilov & Hutter
    (:func:`reference_lr`); 0 at lr = 0, so that a group with lr 0 (frozen) does not decay either; 1 when
    :math:`\text{lr}_0 = 0 < \text{lr}` (a warm-up written by hand from 0), where the ratio has no meaning."""
    lr, lr0 = group["lr"], reference_lr(group)
    if lr == 0:
        return 0.0
    return lr / lr0 if lr0 != 0 else 1.0


@dataclass(frozen=True)
class AddDecayedWeights:
    r"""``u <- u + λ p`` with λ = ``group[key]`` (times lr / initial lr when ``schedule``), p before the step.

    The same part is L2 regularisation or weight decay depending on where it sits in the chain:

    * **before** the preconditioner (Adam's scaling, momentum): L2, the gradient of
      :math:`\frac{\lambda}{2}\lVert p\rVert^2` added to the loss's gradient;
    * **between** the preconditioner and :class:`ScaleByLearningRate`: decay :math:`\text{lr}\cdot\lambda\,p`
      (torch.optim.AdamW, optax.adamw);
    * **after** :class:`ScaleByLearningRate` with ``schedule=True``: decay
      :math:`\eta_t\lambda\,p` with the schedule multiplier :math:`\eta_t = \text{lr}/\text{lr}_0`
      (:func:`schedule_multiplier`: 0 at lr 0, 1 when lr₀ is 0) — Loshchilov & Hutter (2019), Algorithm 2.

    ``into_gradient`` (the L2 position) adds :math:`\lambda p` to the updates at once in float16 and bfloat16, as
    torch.optim does: deferred, it would reach p as a separate ``p.mul_(1 - lr·λ)``, which rounds back to p when
    lr·λ is below half a unit in the last place (2⁻⁹ in bfloat16), and the decay would be lost.
    """

    key: str = "weight_decay"
    schedule: bool = False
    into_gradient: bool = False

    def update(self, updates: TensorList, ctx: StepContext) -> TensorList:
        """Add λθ (times the schedule multiplier where asked) to the updates, or to the gradient."""
        lam = ctx.group[self.key]
        if self.schedule:
            lam = lam * schedule_multiplier(ctx.group)
        ctx.decay += lam  # deferred: applied to p as p.mul_(1 - decay) at the end, or by `scaled`
        nonzero = _may_be_nonzero(lam)
        ctx.decay_added = ctx.decay_added or nonzero
        if self.into_gradient and nonzero and any(p.dtype in HALF_DTYPES for p in ctx.params):
            return scaled(updates, ctx)
        return updates


def _may_be_nonzero(x: float | Tensor) -> bool:
    """``x != 0`` as a Python bool, and True where torch.compile traces ``x`` (an lr that dynamo made a tensor or a
    symbolic float): there the comparison is a value of the graph, not a bool. torch 2.11 could not even compile
    ``False | (x != 0)`` (its graph's code read ``False |= ...``, a SyntaxError)."""
    nonzero = x != 0
    return nonzero if isinstance(nonzero, bool) else True


def chain_step(transforms: Sequence[Transform], ctx: StepContext, grads: TensorList) -> None:
    """Run the chain on ``grads`` (never modified) and apply ``p <- (1 - decay) p - scale * u / denom`` (in float16
    and bfloat16, with a decay: ``p <- p - (scale * u / denom + decay * p)``, one rounding)."""
    updates = grads
    ctx.scale, ctx.decay, ctx.denom, ctx.owned = ctx.number(1.0), ctx.number(0.0), None, False
    ctx.decay_added = ctx.scale_zeroed = False
    for t in transforms:
        updates = t.update(updates, ctx)
    if ctx.has_decay() and any(p.dtype in HALF_DTYPES for p in ctx.params):
        # one rounding for decay and step, as torch's fused kernel: a separate p.mul_(1 - decay) rounds back to p
        # when the decay is below half a unit in the last place (2⁻⁹ in bfloat16, 2⁻¹² in float16), so every
        # realistic decoupled decay was lost there (|p| ratio 1.0000 after 200 steps, against 0.82 exact)
        updates = scaled(updates, ctx)
    if ctx.has_decay():
        _mul_(ctx.params, 1.0 - ctx.decay, ctx.compiling)
    if ctx.compiling:  # where the ops fuse into one pass whatever their form; the same cases as below
        if ctx.denom is not None:
            _axpy_(ctx.params, torch._foreach_div(updates, ctx.denom), -ctx.scale, ctx.compiling)
        elif ctx.has_scale():
            _axpy_(ctx.params, updates, -ctx.scale, ctx.compiling)
    elif ctx.denom is not None:
        torch._foreach_addcdiv_(ctx.params, updates, ctx.denom, value=-ctx.scale)
    elif ctx.scale == 1.0:
        torch._foreach_sub_(ctx.params, updates)
    elif ctx.scale != 0.0:
        torch._foreach_add_(ctx.params, updates, alpha=-cast(float, ctx.scale))
