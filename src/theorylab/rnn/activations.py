r"""The activations of the RNN unit, their exact derivatives, and the bound :math:`\gamma = \sup_x |\sigma'(x)|`.

Each activation carries three functions:

* ``fn`` — :math:`\sigma` itself, built from torch ops so autograd works (the model's forward pass);
* ``deriv`` — :math:`\sigma'` in a closed form that keeps full *relative* precision where the derivative is tiny
  (``sech²`` instead of ``1 − tanh²``, ``σ(x)σ(−x)`` instead of ``σ(1 − σ)``), which the Jacobian diagnostics use;
* ``log_deriv`` — :math:`(\log|\sigma'|, \operatorname{sign}\sigma')`, finite wherever σ' ≠ 0 even when σ' itself
  underflows float64 (sech²(1000) ≈ e^{−1999}); the Jacobian diagnostics scale by it, so a deep saturation gives a
  finite log-norm, not −inf;
* ``second`` — :math:`\sigma''` on Python floats, whose roots locate the extrema of :math:`\sigma'`.

:func:`derivative_bound` computes γ: the larger of :math:`|\sigma'|` at the roots of :math:`\sigma''` (found by
bracketing on a grid and Brent's method) and :math:`|\sigma'|` at :math:`\pm\infty`. For GELU
(:math:`\sigma'(x) = \Phi(x) + x\varphi(x)`, :math:`\sigma''(x) = \varphi(x)(2 - x^2)`) the root is :math:`\sqrt 2` and
γ = Φ(√2) + √2 φ(√2) ≈ 1.1289; for SiLU (:math:`\sigma'' = s(1-s)(2 + x(1 - 2s))`, s the logistic) γ ≈ 1.0998.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """An activation σ with its derivative (torch) and second derivative (float) for root finding.

    Fields: ``fn`` σ on tensors (autograd through it); ``deriv`` σ' on tensors; ``deriv_float`` σ' on floats;
    ``second`` σ'' on floats, or None where σ' is piecewise constant; ``deriv_at_infinity`` (σ'(−∞), σ'(+∞));
    ``log_deriv`` (log|σ'|, sign σ') on tensors, finite wherever σ' ≠ 0 (the diagnostics scale by it). An
    activation of your own goes to the model by name, after :func:`register_activation`.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    deriv_float: Callable[[float], float]
    second: Callable[[float], float] | None  # None: σ' is piecewise constant (relu)
    deriv_at_infinity: tuple[float, float]  # (σ'(−∞), σ'(+∞))
    log_deriv: Callable[[Tensor], tuple[Tensor, Tensor]]  # (log|σ'|, sign σ'), no underflow


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _tanh_deriv(h: Tensor) -> Tensor:
    # sech²(h) = 1/cosh²(h): full relative precision in saturation, where 1 − tanh² cancels; cosh overflows to
    # inf for |h| > 710, giving 0, the correctly rounded value.
    return torch.cosh(h).square().reciprocal()


def _sigmoid_deriv(h: Tensor) -> Tensor:
    return torch.sigmoid(h) * torch.sigmoid(-h)


def _relu_deriv(h: Tensor) -> Tensor:
    return (h > 0).to(h.dtype)  # 0 at h = 0, as torch's relu backward


def _gelu_deriv(h: Tensor) -> Tensor:
    cdf = 0.5 * torch.erfc(-h / _SQRT2)  # Φ(h), accurate in the left tail
    pdf = torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return cdf + h * pdf


def _silu_deriv(h: Tensor) -> Tensor:
    s = torch.sigmoid(h)
    return s * (1.0 + h * torch.sigmoid(-h))


def _tanh_log_deriv(h: Tensor) -> tuple[Tensor, Tensor]:
    a = h.abs()  # log sech²(h) = 2 (log 2 − |h| − log(1 + e^{−2|h|}))
    return 2.0 * (math.log(2.0) - a - torch.log1p(torch.exp(-2.0 * a))), torch.ones_like(h)


def _sigmoid_log_deriv(h: Tensor) -> tuple[Tensor, Tensor]:
    return F.logsigmoid(h) + F.logsigmoid(-h), torch.ones_like(h)


def _relu_log_deriv(h: Tensor) -> tuple[Tensor, Tensor]:
    on = h > 0
    return torch.where(on, 0.0, -math.inf).to(h.dtype), on.to(h.dtype)


_GELU_TAIL = -5.0  # below it Φ(h) + hφ(h) is computed as φ(h)·(h + Φ(h)/φ(h)), which does not underflow


def _gelu_log_deriv(h: Tensor) -> tuple[Tensor, Tensor]:
    direct = _gelu_deriv(h)
    log_pdf = -0.5 * h * h - 0.5 * math.log(2.0 * math.pi)
    # the Mills ratio Φ(h)/φ(h) = √(π/2)·erfcx(−h/√2), ~1/|h| for h → −∞: never a difference of two huge logs
    mills = math.sqrt(0.5 * math.pi) * torch.special.erfcx(-h / _SQRT2)
    tail = h + mills  # ≈ h for h → −∞ (no cancellation)
    in_tail = h < _GELU_TAIL
    log_abs = torch.where(in_tail, log_pdf + tail.abs().log(), direct.abs().log())
    return log_abs, torch.where(in_tail, tail.sign(), direct.sign())


def _silu_log_deriv(h: Tensor) -> tuple[Tensor, Tensor]:
    factor = 1.0 + h * torch.sigmoid(-h)  # σ'(h) = s(h)(1 + h s(−h)); s(h) underflows for h ≲ −745, its log does not
    return F.logsigmoid(h) + factor.abs().log(), factor.sign()


def _gelu_deriv_float(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2) + x * math.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _silu_deriv_float(x: float) -> float:
    return _logistic(x) * (1.0 + x * _logistic(-x))


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", torch.tanh, _tanh_deriv, lambda x: 1.0 / math.cosh(x) ** 2,
                       lambda x: -2.0 * math.tanh(x) / math.cosh(x) ** 2, (0.0, 0.0), _tanh_log_deriv),
    "sigmoid": Activation("sigmoid", torch.sigmoid, _sigmoid_deriv,
                          lambda x: _logistic(x) * _logistic(-x),
                          lambda x: _logistic(x) * _logistic(-x) * (_logistic(-x) - _logistic(x)), (0.0, 0.0),
                          _sigmoid_log_deriv),
    "relu": Activation("relu", torch.relu, _relu_deriv, lambda x: 1.0 if x > 0 else 0.0, None, (0.0, 1.0),
                       _relu_log_deriv),
    "gelu": Activation("gelu", torch.nn.functional.gelu, _gelu_deriv, _gelu_deriv_float,
                       lambda x: math.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x), (0.0, 1.0),
                       _gelu_log_deriv),
    "silu": Activation("silu", torch.nn.functional.silu, _silu_deriv, _silu_deriv_float,
                       lambda x: _logistic(x) * _logistic(-x) * (2.0 + x * (_logistic(-x) - _logistic(x))),
                       (0.0, 1.0), _silu_log_deriv),
}


#: the activations theorylab defines, which :func:`register_activation` never replaces
BUILT_IN = frozenset(ACTIVATIONS)


def get_activation(name: str) -> Activation:
    """The :class:`Activation` called ``name``; ValueError naming it if unknown."""
    if isinstance(name, Activation):  # the object, not its name: say how to pass it
        hint = "" if ACTIVATIONS.get(name.name) is name else ", after register_activation(<it>)"
        raise ValueError(f"activation: pass the activation's name ({name.name!r}{hint}), not the Activation")
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}, or a name "
                         "given to register_activation")
    return ACTIVATIONS[name]


def register_activation(activation: Activation, *, replace: bool = False) -> None:
    r"""Make ``activation`` available by its name to :class:`~theorylab.rnn.RNN`, the diagnostics and
    :func:`derivative_bound`, for the rest of the process (a model saved with it needs it registered again
    before it is built). The diagnostics are exact only as far as its ``deriv`` and ``log_deriv`` are σ' and
    :math:`(\log|\sigma'|, \operatorname{sign}\sigma')`, and γ as far as the roots of ``second`` within [−12, 12] and
    ``deriv_at_infinity`` hold σ''s extrema. Without ``second`` (σ' piecewise constant, hardtanh's say), γ is the
    largest |σ'| on a grid of [−12, 12] in steps of 0.01 and at ±∞: a piece narrower than a step is missed, and a
    smooth σ' may peak between grid points, so give ``second`` for a smooth σ'.
    Softplus, :math:`\sigma' = \operatorname{sigmoid}`::

        register_activation(Activation("softplus", F.softplus, torch.sigmoid, lambda x: 1 / (1 + math.exp(-x)),
                                       lambda x: math.exp(-x) / (1 + math.exp(-x)) ** 2, (0.0, 1.0),
                                       lambda h: (F.logsigmoid(h), torch.ones_like(h))))
        RNN(4, 32, activation="softplus")

    ``replace=True`` puts a corrected activation of your own in place of the one registered under its name (the
    models built with that name use the new one from their next call); the built-in five cannot be replaced.

    TypeError unless an :class:`Activation` whose functions are callables (``second`` may be None) and whose
    ``deriv_at_infinity`` is two real numbers; ValueError if its name is taken by another one (registering the same
    object twice does nothing)."""
    if not isinstance(activation, Activation):
        raise TypeError(f"register_activation: expected an Activation; got {type(activation).__name__}")
    name = activation.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_activation: the activation's name must be a non-empty string; got {name!r}")
    for field in ("fn", "deriv", "deriv_float", "log_deriv", "second"):
        value = getattr(activation, field)
        if not callable(value) and not (field == "second" and value is None):
            raise TypeError(f"register_activation: {name!r}: {field} must be callable; got {type(value).__name__}")
    ends = activation.deriv_at_infinity
    if not (isinstance(ends, tuple) and len(ends) == 2
            and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in ends)):
        raise TypeError(f"register_activation: {name!r}: deriv_at_infinity must be a tuple of two real numbers "
                        f"(σ'(−∞), σ'(+∞)); got {ends!r}")
    if not all(math.isfinite(x) for x in ends):
        raise ValueError(f"register_activation: deriv_at_infinity must be two finite numbers; got {ends!r}")
    taken = ACTIVATIONS.get(name)
    if taken is not None and taken is not activation:
        if name in BUILT_IN:
            raise ValueError(f"register_activation: {name!r} is a built-in activation; choose another name")
        if not replace:
            raise ValueError(f"register_activation: the name {name!r} is taken by another activation; choose another,"
                             " or pass replace=True")
    ACTIVATIONS[name] = activation
    _derivative_bound.cache_clear()  # γ of a replaced activation is computed again


_LO, _HI, _GRID = -12.0, 12.0, 2401  # where γ is looked for: [−12, 12] in steps of 0.01


def _grid(lo: float, hi: float, points: int) -> list[float]:
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]


def critical_points(name: str, lo: float = _LO, hi: float = _HI, grid: int = _GRID) -> list[float]:
    """Roots of σ'' in [lo, hi]: sign changes on a uniform grid, refined by Brent's method to machine precision."""
    act = get_activation(name)
    if act.second is None:
        return []
    xs = _grid(lo, hi, grid)
    vals = [act.second(x) for x in xs]
    roots = []
    for x0, x1, v0, v1 in zip(xs, xs[1:], vals, vals[1:], strict=False):
        if v0 == 0.0:
            roots.append(x0)
        elif v0 * v1 < 0.0:
            roots.append(brentq(act.second, x0, x1, xtol=1e-15, rtol=1e-15, maxiter=200))
    return roots


def derivative_bound(activation: str) -> float:
    r"""γ = sup_x |σ'(x)|, computed: the maximum of |σ'| over the roots of σ'' and the limits at ±∞.

    relu has σ' ∈ {0, 1} (piecewise constant), so γ = 1; a registered activation without ``second`` gets the
    largest |σ'| on a grid of [−12, 12] (steps of 0.01) and at ±∞. For tanh and sigmoid the root of σ'' is 0
    (γ = 1, 1/4); for GELU it is √2 (γ = Φ(√2) + √2 φ(√2) ≈ 1.1289); for SiLU the root of 2 + x(1 − 2σ(x))
    ≈ 2.3994 (γ ≈ 1.0998).
    ValueError naming ``activation`` unless it is one of :data:`ACTIVATIONS` (registered ones included).
    """
    # Validate before the cache: an unhashable argument (a list) would otherwise raise "unhashable type" from it.
    return _derivative_bound(get_activation(activation).name)


@cache
def _derivative_bound(activation: str) -> float:
    """:func:`derivative_bound` for a valid name, computed once per activation."""
    act = get_activation(activation)
    candidates = [abs(v) for v in act.deriv_at_infinity]
    if act.second is None:  # piecewise constant σ': its values on the grid (pieces narrower than a step are missed)
        candidates += [abs(act.deriv_float(x)) for x in _grid(_LO, _HI, _GRID)]
    else:
        candidates += [abs(act.deriv_float(x)) for x in critical_points(activation)]
    return max(candidates)
