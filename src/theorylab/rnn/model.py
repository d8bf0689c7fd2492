r"""The RNN unit of Q1 in its two equivalent forms.

Let :math:`W \in \mathbb{R}^{H\times H}`, :math:`U \in \mathbb{R}^{H\times I}`, :math:`b \in \mathbb{R}^H` and σ
an activation. The **h-form** keeps the pre-activation state

.. math:: h_t = W\,\sigma(h_{t-1}) + U x_t + b,

the **g-form** the post-activation state

.. math:: g_t = \sigma(W g_{t-1} + U x_t + b).

With :math:`g_0 = \sigma(h_0)` the two give :math:`g_t = \sigma(h_t)` for every t (induction: :math:`h_t = W g_{t-1}
+ U x_t + b`), which is claim 1.1. Both forms share the same parameters and ``state_dict``; only the state they carry
(and hence the Jacobian ``∂s_t/∂s_{t-1}``) differs: ``W diag(σ'(h_{t-1}))`` for h, ``diag(σ'(W g_{t-1} + U x_t + b)) W``
for g.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._threads import threads_for
from .activations import get_activation

FORMS = ("h", "g")
PARAMETERS = ("W", "U", "b")
SECOND_ORDER_ERROR = (
    "RNN.forward is differentiable once only: its backward through time is hand-written and not itself recorded, "
    "so trying to differentiate twice (a gradient penalty, a Hessian-vector product) would give wrong numbers. "
    "Use RNN.forward_reference for higher derivatives."
)


class RNN(nn.Module):
    """An Elman unit in h-form (``h_t = W σ(h_{t-1}) + U x_t + b``) or g-form (``g_t = σ(W g_{t-1} + U x_t + b)``).

    Args:
        input_size: I, the size of each input x_t.
        hidden_size: H, the size of the state.
        activation: one of ``tanh``, ``sigmoid``, ``relu``, ``gelu``, ``silu``, or the name of one of your own
            (:func:`~theorylab.rnn.register_activation`).
        form: ``"h"`` or ``"g"``; the parameters (``W`` (H, H), ``U`` (H, I), ``b`` (H,)) are the same for both.
        device, dtype: where the parameters are made, and their floating dtype (as torch.nn.RNN's; default:
            torch's defaults).

    The parameters are initialised as torch.nn.RNN's: uniform on [−1/√H, 1/√H].

    Raises:
        ValueError: hidden_size not a positive int, input_size not a non-negative int (a float or bool is a
            ValueError here too), an unknown activation or form.
        TypeError: dtype not a floating torch.dtype.
    """

    def __init__(self, input_size: int, hidden_size: int, *, activation: str = "tanh", form: str = "h",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"RNN: dtype must be a floating torch.dtype (as torch.nn.RNN's); got {dtype!r}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 0:
            raise ValueError(f"input_size must be a non-negative int, got {input_size!r}")
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; expected 'h' or 'g'")
        self.activation = get_activation(activation).name
        self.form = form
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.W = nn.Parameter(torch.empty(hidden_size, hidden_size, device=device, dtype=dtype))
        self.U = nn.Parameter(torch.empty(hidden_size, input_size, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw W, U and b again, uniform on [−1/√H, 1/√H] (torch.nn.RNN's initialisation)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.W, self.U, self.b):
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"activation={self.activation!r}, form={self.form!r}")

    def sigma(self, h: Tensor) -> Tensor:
        """σ applied elementwise (e.g. to turn an h-form state into the g-form one)."""
        return get_activation(self.activation).fn(h)

    def check_parameters(self) -> None:
        """ValueError naming the parameter unless W is (H, H), U (H, I) and b (H,) (they may have been replaced);
        TypeError naming it unless it is real floating point (``rnn.to(torch.complex64)`` would run a complex
        recurrence whose diagnostics silently drop the imaginary part)."""
        self._checked_parameters()

    def _checked_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """W, U and b as :meth:`check_parameters` checks them, each read once: a parametrized weight
        (``torch.nn.utils.parametrizations``) is computed anew at every read, and spectral_norm's power iteration
        advances at each in training mode."""
        h, i = self.hidden_size, self.input_size
        params = (self.W, self.U, self.b)
        for name, p, shape in zip(PARAMETERS, params, ((h, h), (h, i), (h,)), strict=True):
            if not isinstance(p, Tensor) or tuple(p.shape) != shape:
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"parameter {name} must have shape {shape} for hidden_size={h}, input_size={i}, "
                                 f"got {got}")
            _check_real_floating(f"parameter {name}", p)
        return params

    def check_finite_parameters(self, *names: str) -> None:
        """ValueError naming the first of ``names`` (default: W, U and b) that contains NaN or ±inf.

        The forward pass runs on such parameters (and yields NaN), but the diagnostics would fail obscurely (an
        SVD that does not converge) or return nan/inf as if it were a measurement. Meta tensors hold no values and
        are not checked.
        """
        self.check_parameters()
        for name in names or PARAMETERS:
            if name not in PARAMETERS:
                raise ValueError(f"unknown parameter {name!r}; expected one of {', '.join(PARAMETERS)}")
            p = getattr(self, name)
            if p.device.type != "meta" and not bool(torch.isfinite(p.detach()).all()):
                raise ValueError(f"parameter {name} is not finite (contains NaN or inf)")

    def check_inputs(self, x: Tensor, h0: Tensor | None) -> None:
        """ValueError naming the offending shape unless x is (B, T, I) and h0 is None or (B, H); TypeError naming
        the dtype unless both are real floating point.

        Integer or bool x would be cast silently and complex x would run a complex recurrence (whose diagnostics
        drop the imaginary part); the attention modules reject them the same way.
        """
        self.check_parameters()
        self._check_x_h0(x, h0)

    def _check_x_h0(self, x: Tensor, h0: Tensor | None, device: torch.device | None = None) -> None:
        """As :meth:`check_inputs` (without the parameters); with ``device`` (the parameters'), x and h0 must be
        there too."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, {self.input_size}), got {shape}")
        _check_real_floating("x", x)
        if h0 is not None and (not isinstance(h0, Tensor) or tuple(h0.shape) != (x.shape[0], self.hidden_size)):
            shape = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
            raise ValueError(f"h0 must have shape (B, H) = ({x.shape[0]}, {self.hidden_size}), got {shape}")
        if h0 is not None:
            _check_real_floating("h0", h0)
        for name, value in (("x", x), ("h0", h0)):  # torch's own error names neither ("expected device meta")
            if device is not None and value is not None and value.device != device:
                raise ValueError(f"{name} is on {value.device} but the RNN's parameters are on {device}: "
                                 f"move one of them (rnn.to({str(value.device)!r}) or {name}.to(...))")

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the recurrence over x (B, T, I) from h0 (B, H) (h_0 for form h, g_0 for form g; None -> zeros).

        Returns ``(states (B, T, H), last (B, H))``: s_1..s_T and s_T (s_0 = h0 when T = 0), in the dtype
        ``torch.promote_types(x.dtype, W.dtype)`` (h0 is cast to it). The recurrence is one autograd node
        (:class:`_Recurrence`: a hand-written backward through time, a few kernels per step) instead of T small
        graphs; :meth:`forward_reference` is the plain autograd loop it is tested against. It is differentiable
        once, in reverse mode: a second derivative, forward mode (``jvp``) and the torch.func transforms
        (``jacrev``, ``vmap``; also ``autograd.functional.jacobian(..., vectorize=True)``) raise RuntimeError or
        NotImplementedError. Use :meth:`forward_reference` for those.

        Inside ``torch.autocast``, the recurrence runs in autocast's dtype (bfloat16 on CPU by default), as
        ``torch.nn.RNN``'s does; float64 inputs stay float64, as autocast leaves them. Each parameter is read once
        per call (a parametrized W is computed once).

        Raises:
            ValueError: x not (B, T, input_size) or h0 not (B, hidden_size).
            TypeError: x is not floating point.
            RuntimeError: called inside a torch.func transform (``vmap``, ``grad``, ``jacrev``, ...).
        """
        W, U, b = self._checked_parameters()
        self._check_x_h0(x, h0, W.device)
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            raise RuntimeError("RNN.forward cannot run inside a torch.func transform (vmap, grad, jacrev, ...): its "
                               "backward through time is hand-written. Use RNN.forward_reference, the plain "
                               "autograd loop, which supports them")
        bsz, steps, _ = x.shape
        dtype = _compute_dtype(x, W)
        with _autocast_off(x):  # every tensor of the node in one dtype, which its backward relies on
            s = torch.zeros(bsz, self.hidden_size, dtype=dtype, device=x.device) if h0 is None else h0.to(dtype)
            drive = torch.nn.functional.linear(x.to(dtype), U.to(dtype), b.to(dtype))  # (B, T, H) = Ux_t + b
            if steps == 0:
                return x.new_zeros(bsz, 0, self.hidden_size, dtype=dtype), s
            with threads_for(2 * bsz * self.hidden_size**2):  # tiny kernels: one thread (see _threads)
                states = _Recurrence.apply(drive, s, W.to(dtype), self.activation, self.form)
        return states, states[:, -1]

    def forward_reference(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The same recurrence as a plain Python loop of torch ops (autograd records every step)."""
        W, U, b = self._checked_parameters()
        self._check_x_h0(x, h0, W.device)
        bsz, steps, _ = x.shape
        dtype = _compute_dtype(x, W)  # autocast's inside autocast, as forward's (and for T = 0 too)
        s = torch.zeros(bsz, self.hidden_size, dtype=dtype, device=x.device) if h0 is None else h0.to(dtype)
        drive = torch.nn.functional.linear(x.to(dtype), U.to(dtype), b.to(dtype))  # (B, T, H) = Ux_t + b
        w_t = W.to(dtype).T
        sigma = get_activation(self.activation).fn
        states = []
        with threads_for(2 * bsz * self.hidden_size**2):  # tiny kernels: one thread (see _threads)
            for t in range(steps):
                if self.form == "h":
                    s = torch.addmm(drive[:, t], sigma(s), w_t)  # h_t = W σ(h_{t-1}) + U x_t + b
                else:
                    s = sigma(torch.addmm(drive[:, t], s, w_t))  # g_t = σ(W g_{t-1} + U x_t + b)
                states.append(s)
        if not states:
            return x.new_zeros(bsz, 0, self.hidden_size, dtype=dtype), s
        return torch.stack(states, dim=1), s


def _autocast_on(x: Tensor) -> bool:
    """Whether an autocast region is active for x's device (autocast knows no meta device: never there)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def _compute_dtype(x: Tensor, W: Tensor) -> torch.dtype:
    """The dtype of the recurrence: x's and W's promoted, or autocast's inside an autocast region (torch.nn.RNN is
    on autocast's lower-precision list), except float64, which autocast leaves alone."""
    dtype = torch.promote_types(x.dtype, W.dtype)
    if dtype != torch.float64 and _autocast_on(x):
        return torch.get_autocast_dtype(x.device.type)
    return dtype


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off for x's device (the dtypes are then the ones :func:`_compute_dtype` chose)."""
    return torch.autocast(x.device.type, enabled=False) if _autocast_on(x) else contextlib.nullcontext()


def as_rnn(rnn: object) -> RNN:
    """``rnn``, or the :class:`RNN` that ``torch.compile(rnn)`` wraps; ValueError naming the type otherwise."""
    inner = getattr(rnn, "_orig_mod", None) if isinstance(rnn, nn.Module) else None
    if isinstance(inner, RNN):
        return inner
    if not isinstance(rnn, RNN):
        raise ValueError(f"rnn must be a theorylab.rnn.RNN (or torch.compile of one), got {type(rnn).__name__}")
    return rnn


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Measuring(threading.local):
    active = False  # inside a diagnostic that outside_transforms has checked (per thread)


_measuring = _Measuring()


def outside_transforms(inputs: Callable[..., dict[str, object]], *, batched_only: bool = False
                       ) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Make a diagnostic a measurement that torch.func's transforms do not enter: ``inputs`` (called with the
    diagnostic's arguments) names the tensors it reads, and one that a transform wraps is refused
    (:func:`refuse_transformed`), before anything is read with the transforms switched off. Switched off, the
    numpy code runs on plain tensors, so the diagnostics of a model that a transform does not touch can be logged
    inside it (inside ``grad`` even an untouched model's factors failed in numpy: "Cannot access data pointer of
    Tensor that doesn't have storage"); and a wrapped input must be refused first, as it would be read there as a
    plain number (a derivative of 0, silently)."""

    def decorate(function: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(function)
        def measured(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            # outside any transform, or inside a measurement already checked (a diagnostic calling another):
            # nothing to refuse
            if _measuring.active or not torch._C._are_functorch_transforms_active():
                return function(*args, **kwargs)
            try:
                tensors = inputs(*args, **kwargs)
            except TypeError:  # a call with the wrong arguments: the diagnostic's own message names it
                return function(*args, **kwargs)
            refuse_transformed(tensors, batched_only=batched_only)
            _measuring.active = True
            try:
                with torch._C._DisableFuncTorch():
                    return function(*args, **kwargs)
            finally:
                _measuring.active = False

        return measured

    return decorate


def parameters_of(rnn: object) -> dict[str, object]:
    """The tensors ``rnn`` holds, by name (a parametrized W's ``parametrizations.W.original``: not W computed,
    which ``grad`` would wrap even for a model it does not touch); nothing for what is not an RNN (the diagnostic
    then names it)."""
    try:
        model = as_rnn(rnn)
    except ValueError:
        return {}
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def refuse_transformed(tensors: dict[str, object], *, batched_only: bool = False) -> None:
    """RuntimeError naming the first of ``tensors`` that a torch.func transform wraps (``batched_only``: vmap's
    only; under ``grad`` the certificate reads δ as a number). The diagnostics compute in float64 numpy, where such
    a tensor failed, naming a missing storage or data-dependent control flow."""
    functorch = torch._C._functorch
    wrapped = functorch.is_batchedtensor if batched_only else functorch.is_functorch_wrapped_tensor
    for name, tensor in tensors.items():
        if isinstance(tensor, Tensor) and wrapped(tensor):
            raise RuntimeError(f"the RNN diagnostics cannot take {name} from inside a torch.func transform (vmap, "
                               "grad, jacrev, ...): they are float64 measurements, not differentiable (their "
                               "results carry no autograd graph). For many parameter sets at once, pass batched W, "
                               "U, b to trajectory_derivatives and measure the JacobianFactors with "
                               "log_norms_of_products")


@contextlib.contextmanager
def read_for_diagnostics(rnn: RNN) -> Iterator[None]:
    """The parameters as a diagnostic reads them: each parametrization computed once (``parametrize.cached``) and
    in eval mode, so that reading does not change the model (spectral_norm's power iteration would advance at
    every read in training mode, and training after a diagnostic would differ from training without it)."""
    modes = [(m, m.training) for m in rnn.modules()]
    cache = getattr(parametrize, "_cache", None)  # inside a cached() block of the caller's, what is computed here
    before = set(cache) if isinstance(cache, dict) else None  # in eval mode must not stay for the caller's reads
    rnn.eval()
    try:
        with parametrize.cached():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        if before is not None and isinstance(cache, dict):
            for key in set(cache) - before:
                cache.pop(key, None)


class _Recurrence(torch.autograd.Function):
    r"""The recurrence over T steps as one autograd node, with backpropagation through time written out.

    Form h: :math:`h_t = W\sigma(h_{t-1}) + u_t` (:math:`u_t = Ux_t + b`). Backward, with :math:`\bar h_t` the
    total derivative of the loss: :math:`\bar h_{t-1} = \sigma'(h_{t-1}) \odot (W^\top \bar h_t) + \partial L/\partial
    h_{t-1}`, :math:`\bar u_t = \bar h_t`, :math:`\bar W = \sum_t \bar h_t \sigma(h_{t-1})^\top`.
    Form g: :math:`g_t = \sigma(a_t)`, :math:`a_t = W g_{t-1} + u_t`; :math:`\bar a_t = \sigma'(a_t) \odot \bar g_t`,
    :math:`\bar g_{t-1} = W^\top \bar a_t + \partial L/\partial g_{t-1}`, :math:`\bar u_t = \bar a_t`,
    :math:`\bar W = \sum_t \bar a_t g_{t-1}^\top`. Only the per-step vector products stay in the loop;
    :math:`\bar W` is one matmul at the end.

    First derivatives only. The sweep runs under ``no_grad``, so a graph built through it (``create_graph=True``)
    would treat it as a constant: an input-gradient penalty would get no gradient for W and a wrong one for U.
    ``once_differentiable`` does not catch that (it only guards when the incoming gradient requires grad, which a
    loss like ``states.sum()`` does not), so under ``create_graph`` the gradients pass through
    :class:`_FirstOrderOnly`, whose backward raises: any attempt to differentiate them names
    :meth:`RNN.forward_reference`, the plain autograd loop, which supports higher derivatives.
    """

    @staticmethod
    def forward(ctx, drive: Tensor, s0: Tensor, W: Tensor, activation: str, form: str) -> Tensor:
        act = get_activation(activation)
        bsz, steps, hidden = drive.shape
        w_t = W.T
        out = drive.new_empty(bsz, steps + 1, hidden)  # s_0..s_T for form g; h_0..h_T for form h
        pre = drive.new_empty(bsz, steps, hidden) if form == "g" else None  # a_1..a_T
        out[:, 0] = s0
        s = s0
        for t in range(steps):
            if form == "h":
                s = torch.addmm(drive[:, t], act.fn(s), w_t)
            else:
                a = torch.addmm(drive[:, t], s, w_t)
                cast(Tensor, pre)[:, t] = a  # form "g": pre is a tensor
                s = act.fn(a)
            out[:, t + 1] = s
        states = out[:, 1:]
        # states, saved as the output it is, comes back in backward with this node as its grad_fn: the link from the
        # gradients to x, h0, W, U and b that _FirstOrderOnly needs (no extra memory: it is a view of out).
        ctx.save_for_backward(out, W, states, *(() if pre is None else (pre,)))
        ctx.activation, ctx.form = activation, form
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor) -> tuple[Tensor | None, ...]:
        out, W, states, *rest = ctx.saved_tensors
        with torch.no_grad():
            grads = _backward_through_time(grad_states, out, W, rest, ctx.activation, ctx.form)
        if torch.is_grad_enabled():  # create_graph: the engine runs backward with grad mode on
            # The gradients depend on grad_states, W and the trajectory; states' graph reaches x, h0, W, U and b.
            grads = _FirstOrderOnly.apply(*grads, grad_states, states, W)
        return (*grads, None, None)


def _backward_through_time(grad_states: Tensor, out: Tensor, W: Tensor, rest: list[Tensor], activation: str,
                           form: str) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (drive, s_0, W) of :class:`_Recurrence` (see its docstring for the recursions)."""
    act = get_activation(activation)
    steps = out.shape[1] - 1
    grad_drive = torch.empty_like(grad_states)
    with threads_for(2 * out.shape[0] * out.shape[2] ** 2):
        if form == "h":
            prev = out[:, :-1]  # h_0..h_{T-1}
            deriv = act.deriv(prev)  # σ'(h_{t-1})
            carry = torch.zeros_like(grad_states[:, 0])
            for t in range(steps - 1, -1, -1):
                carry = carry + grad_states[:, t]  # total ∂L/∂h_{t+1}
                grad_drive[:, t] = carry
                carry = (carry @ W) * deriv[:, t]  # into h_t through σ
            grad_w = torch.einsum("bti,btj->ij", grad_drive, act.fn(prev))
        else:
            (pre,) = rest
            deriv = act.deriv(pre)  # σ'(a_t)
            carry = torch.zeros_like(grad_states[:, 0])
            for t in range(steps - 1, -1, -1):
                g_a = (carry + grad_states[:, t]) * deriv[:, t]  # ∂L/∂a_{t+1}
                grad_drive[:, t] = g_a
                carry = g_a @ W  # into g_t
            grad_w = torch.einsum("bti,btj->ij", grad_drive, out[:, :-1])
    return grad_drive, carry, grad_w


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the first three tensors (the gradients), recorded as depending on all inputs; backward raises.

    Differentiating a gradient of :meth:`RNN.forward` reaches this node whatever the target (x, h0, W, U or b),
    so it raises :data:`SECOND_ORDER_ERROR` instead of returning a gradient computed with the hand-written sweep
    held constant.
    """

    @staticmethod
    def forward(ctx, grad_drive: Tensor, grad_s0: Tensor, grad_w: Tensor, *depends_on: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        return grad_drive.clone(), grad_s0.clone(), grad_w.clone()  # new tensors: no view bookkeeping

    @staticmethod
    def backward(ctx, *grads: Tensor) -> None:
        raise RuntimeError(SECOND_ORDER_ERROR)


def _check_real_floating(name: str, t: Tensor) -> None:
    """TypeError naming ``name`` and its dtype unless ``t`` is real floating point."""
    if not t.is_floating_point():  # is_floating_point() is False for complex, integer and bool
        raise TypeError(f"{name} must be real floating point (float16, bfloat16, float32, float64), got {t.dtype}")
