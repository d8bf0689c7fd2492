r"""Adam and AdamW as chains: ``ScaleByAdam`` with the decay part before it (L2) or after it (decoupled)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.adamw import adamw as torch_adamw

from .base import (
    STATE_KIND_KEY,
    ChainOptimizer,
    as_param_list,
    check_beta,
    check_common_keys,
    check_flag,
    check_nonnegative,
    check_positive,
    check_torch_options,
)
from .decay import check_decay, check_decay_rate, with_decay
from .transforms import (
    CONSTRUCTION_LR_KEY,
    Negate,
    ScaleByAdam,
    Transform,
    reference_lr,
    state_buffer,
    warn_float16_second_moment,
)

#: what torch's fused Adam kernel implements on both CPU and CUDA (float8 types are floating point but not among them)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: what ``fused=True`` takes: the kernel's dtypes, and complex64/complex128 passed to it as float32/float64 pairs
FUSED_DTYPES = (*KERNEL_DTYPES, torch.complex64, torch.complex128)
FUSED_DEVICES = ("cpu", "cuda")


def check_fused_params(params: Iterable[Tensor], group_index: int | None = None) -> bool:
    """Raise ValueError naming the first parameter whose dtype or device ``fused=True`` does not take; return
    whether any parameter is complex (it then goes to the kernel as its real view).

    An error rather than a silent fall back to the chain: ``fused=True`` is asked for speed, and a chain step
    several times slower should not pass unnoticed.
    """
    has_complex = False
    for i, p in enumerate(params):
        dtype = p.dtype
        # is_cpu / is_cuda, not p.device.type, which costs 6x more: this runs at every step
        if dtype not in FUSED_DTYPES or not (p.is_cpu or p.is_cuda):
            where = f" in parameter group {group_index}" if group_index is not None else ""
            raise ValueError(
                f"fused=True does not support parameter {i}{where}: dtype {p.dtype} on device {p.device} (torch's "
                f"fused Adam kernel takes {', '.join(map(str, KERNEL_DTYPES))} on {' or '.join(FUSED_DEVICES)}, and "
                "complex64/complex128 as their real views); pass fused=False to use the chain")
        has_complex = has_complex or dtype.is_complex
    return has_complex


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory span exactly once, in some order of the dimensions."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_safe(p: Tensor, *others: Tensor) -> bool:
    """Whether the fused kernel, which walks each tensor's memory linearly, pairs the right elements.

    It does not look at strides: on a transposed parameter with a contiguous gradient torch.optim.AdamW(fused=True)
    silently applies the wrong gradient entries (torch 2.13, CPU).
    """
    if p.is_contiguous():
        return all(t.is_contiguous() for t in others)
    return _dense(p) and all(t.stride() == p.stride() for t in others)


def check_betas(betas: Any) -> tuple[float, float]:
    """Return ``betas`` as a pair of floats, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    beta1, beta2 = (check_beta(b, f"beta{i + 1} (betas[{i}])", allow_zero=True) for i, b in enumerate(betas))
    return beta1, beta2


#: torch.optim.Adam's keywords beyond ours, accepted at their default values (see check_torch_options)
ADAM_TORCH_OPTIONS = ("foreach", "capturable", "differentiable")


def _decay_from_torch_flag(flag: Any, decay: str) -> str:
    """torch.optim.Adam's ``decoupled_weight_decay``: True is torch's AdamW convention, ``"decoupled_lr"``; False
    is L2. A ``decay`` other than the default ``"l2"`` must agree with it."""
    wanted = "decoupled_lr" if check_flag(flag, "decoupled_weight_decay") else "l2"
    if decay not in ("l2", wanted):
        raise ValueError(f"Adam: decoupled_weight_decay={flag!r} (torch's {wanted!r}) contradicts decay={decay!r}")
    return wanted


class Adam(ChainOptimizer):
    r"""Adam with L2 regularisation or decoupled weight decay: ``ScaleByAdam`` plus the decay part.

    Notation of the problem set: ε is the learning rate ``lr`` (under a schedule, η is the current ``lr`` and
    :math:`\eta_0` the group's ``initial_lr``, so ε = η), δ is ``eps`` (not ε), :math:`(\beta_1, \beta_2)` are
    ``betas`` and λ is ``weight_decay``. ∇L below is the gradient, or its negative with ``maximize=True``
    (torch.optim's option: a :class:`~theorylab.optim.transforms.Negate` first in the chain). With
    :math:`\tilde g_t` the gradient seen by the moments,

    .. math::
        s_t = \beta_1 s_{t-1} + (1-\beta_1)\tilde g_t,\quad r_t = \beta_2 r_{t-1} + (1-\beta_2)\tilde g_t^2,\quad
        a_t = \frac{\hat s_t}{\sqrt{\hat r_t} + \delta}\ (\hat s_t = s_t/(1-\beta_1^t),\ \hat r_t = r_t/(1-\beta_2^t))

    and, by ``decay`` (θ is the value before the step):

    * ``"l2"`` (torch.optim.Adam): :math:`\tilde g_t = \nabla L + \lambda\theta`,
      :math:`\Delta\theta = -\varepsilon a_t`. The decay passes through :math:`1/(\sqrt{\hat r}+\delta)`:
      it is weaker where gradients are large;
    * ``"decoupled"`` (Loshchilov & Hutter 2019, Algorithm 2; the problem set's form):
      :math:`\Delta\theta = -\varepsilon a_t - (\eta/\eta_0)\lambda\theta` — every weight decays at rate λ per step
      at a constant lr, whatever its gradient, and the best λ does not move with lr;
    * ``"decoupled_lr"`` (torch.optim.AdamW, optax.adamw): :math:`\Delta\theta = -\varepsilon(a_t + \lambda\theta)`;
      the decay per step is ε·λ, so the best λ moves as 1/ε.

    ``amsgrad=True`` (torch.optim's option; Reddi et al. 2018) replaces :math:`r_t` in :math:`a_t` by its largest
    value so far, :math:`\max_{i \le t} r_i`, kept in the state as ``max_exp_avg_sq`` (see
    :class:`~theorylab.optim.transforms.ScaleByAdam`).

    ``weight_decay = 2γ`` for the problem set's L2 term :math:`\gamma\lVert\theta\rVert^2`. The decoupled decays
    need a shrink per step below 1: λ < 1 (and :math:`(\eta/\eta_0)\lambda < 1` at every step) for
    ``"decoupled"``, ελ < 1 for ``"decoupled_lr"``; ValueError otherwise
    (:func:`~theorylab.optim.decay.check_decay_rate`). ``nonfinite``, validation: see :class:`ChainOptimizer`.
    torch.optim.Adam's ``capturable`` and ``differentiable`` are accepted off, and ``foreach`` (a bool or None)
    and ``fused=None``, so that a configuration written for torch runs unchanged (on: ValueError);
    ``decoupled_weight_decay=True`` means ``decay="decoupled_lr"``, as in torch. Pass them, and ``amsgrad`` and
    ``maximize``, by keyword: the sixth positional argument is ``decay`` here, ``amsgrad`` in torch.optim.Adam.

    Args:
        params: the parameters to optimise, or dicts of parameter groups (``"params"`` plus any of the keywords
            below), as for torch.optim; real or complex floating point (float16, bfloat16, float32, float64,
            complex64, complex128).
        lr: ε, the learning rate (η under a schedule); default 1e-3, a finite number >= 0 (a one-element tensor
            is taken).
        betas: (β₁, β₂), the decay rates of the moments s and r; default (0.9, 0.999), each in [0, 1).
        eps: δ, added to :math:`\sqrt{\hat r_t}`; default 1e-8, a finite number > 0.
        weight_decay: λ, default 0.0; a finite number >= 0; where it acts is ``decay``'s choice.
        decay: ``"l2"`` (default, torch.optim.Adam's), ``"decoupled"`` or ``"decoupled_lr"`` (above).
        amsgrad: use :math:`\max_{i \le t} r_i` in :math:`a_t` (default False; above).
        maximize: ascend L instead of descending it (default False).
        nonfinite: what a NaN or ±inf in a gradient does (default ``"raise"``); in short — ``"raise"``:
            :class:`~theorylab.optim.base.NonFiniteGradientError` before any parameter or state changes;
            ``"skip"``: the whole step (every group) is skipped and ``skipped_steps`` counts it; ``"propagate"``:
            torch.optim's behaviour, the NaN flows into the moments and the parameters (no check, no read-back).
            In full: :class:`~theorylab.optim.base.ChainOptimizer`.
        fused: step with torch's fused Adam/AdamW kernel (default False; None means False; see Notes).
        **torch_options: torch.optim.Adam's ``foreach`` (True, False or None; ignored), ``capturable`` and
            ``differentiable`` (accepted off: False or None), and ``decoupled_weight_decay`` (True:
            ``decay="decoupled_lr"``, False: ``"l2"``; a ``decay`` other than the default ``"l2"`` must agree: an
            explicit ``decay="l2"`` cannot be told from the default, and the flag wins).

    Raises:
        TypeError: lr, a beta, eps or weight_decay is not a real number (an int, a float, a numpy scalar or a
            one-element tensor); a keyword that torch.optim.Adam does not take either.
        ValueError: lr or weight_decay negative or not finite; betas not a pair, or a beta outside [0, 1); eps not
            finite and > 0; amsgrad, maximize, fused or a torch switch not a bool (or 0/1); an unknown ``decay`` or
            ``nonfinite``; a decoupled decay rate >= 1 (above; with ``nonfinite="propagate"`` only λ >= 1 of
            ``"decoupled"``); ``capturable`` or ``differentiable`` on; ``decoupled_weight_decay`` contradicting
            ``decay``; ``fused=True`` with a parameter of another dtype or device than the kernel takes (see Notes); no
            parameters (torch's), or a parameter of a dtype no step can update (integer, bool, float8). At :meth:`step`:
            the same checks on values written into ``param_groups``.
        NonFiniteGradientError: at :meth:`step`, a gradient holds NaN or ±inf and ``nonfinite="raise"``.
        RuntimeError: at :meth:`step`, a sparse gradient.

    Notes:
        **Complex parameters** are optimised as pairs of reals (``view_as_real``), as torch.optim.Adam does: the
        moments are taken per real component, and the result matches torch.optim.Adam/AdamW on the same complex
        parameters, on both the chain and the fused path.

        **fused** (default False; a per-group option, like torch's): step the group with torch's fused Adam/AdamW kernel
        (``torch.optim.adam.adam(..., fused=True)``, one pass over memory instead of the chain's several; faster on CPU,
        see ``theorylab bench optim``). The chain stays the definition: the fused step is tested against it in every
        decay mode and agrees to rounding, not bitwise (the kernel orders the arithmetic differently); not with float16
        parameters, whose second moment underflows (a ``UserWarning``; see
        :func:`~theorylab.optim.transforms.warn_float16_second_moment`). ``"l2"`` maps to the kernel's L2 weight decay
        with λ, ``"decoupled_lr"`` to its decoupled decay with λ, and ``"decoupled"`` to its decoupled decay with
        λ/:math:`\eta_0`. Everything around the arithmetic is the chain's: validation, the ``nonfinite`` policy (whose
        check of the gradients is most of what the fused step costs beyond torch's), parameters without a gradient,
        per-parameter step counts, and the state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so a
        ``state_dict`` saved with either setting loads into the other; ``load_state_dict`` keeps the loading optimizer's
        ``fused`` setting (an execution choice, not a hyperparameter of the saved run), where torch.optim takes the
        saved one. Parameters must be float16/bfloat16/float32/float64 on CPU or CUDA (or complex64/complex128, given to
        the kernel as their float32/float64 real views), else ValueError (at construction and at step). A group runs the
        chain instead when its ``"decoupled"`` schedule multiplier is out of the kernel's reach (``initial_lr == 0``
        with λ > 0), or when a parameter's gradient or state is laid out differently from it in memory (which the
        kernel, blind to strides, gets silently wrong). A state of another dtype than its parameter (a model cast
        after the optimizer stepped) is a ValueError at the step, before anything changes: cast the state with
        ``opt.load_state_dict(opt.state_dict())``, or step that group with ``fused=False``.
    """

    later_switches = ("amsgrad", "maximize")
    torch_switches = ADAM_TORCH_OPTIONS

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decay: str = "l2", *, amsgrad: bool = False,
                 maximize: bool = False, nonfinite: str = "raise", fused: bool = False,
                 **torch_options: Any) -> None:
        if "decoupled_weight_decay" in torch_options and type(self) is Adam:  # torch.optim.Adam's (AdamW lacks it)
            decay = _decay_from_torch_flag(torch_options.pop("decoupled_weight_decay"), decay)
        check_torch_options(type(self).__name__, torch_options, ADAM_TORCH_OPTIONS)
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas, "eps": eps,
                    "weight_decay": weight_decay, "decay": decay, "amsgrad": amsgrad, "maximize": maximize,
                    "nonfinite": nonfinite, "fused": fused}
        check_common_keys(defaults)  # lr first: check_group computes with it (lr·λ < 1)
        self.check_group(defaults)
        super().__init__(as_param_list(params), defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's betas, eps, weight_decay, decay (and its rate), amsgrad, maximize and fused
        (ValueError naming the value), storing numbers back as floats."""
        group["betas"] = check_betas(group["betas"])
        group["eps"] = check_positive(group["eps"], "eps")
        group["weight_decay"] = check_nonnegative(group["weight_decay"], "weight_decay")
        check_decay(group["decay"])
        check_decay_rate(group, self)
        for key in ("amsgrad", "maximize"):  # absent in groups pickled before they existed
            group[key] = check_flag(group.get(key, False), key)
        if "fused" in group and group["fused"] is None:  # torch.optim's default: not fused
            group["fused"] = False
        check_flag(group.get("fused", False), "fused")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`ChainOptimizer.add_param_group`; torch's ``decoupled_weight_decay`` in the group sets its decay."""
        if "decoupled_weight_decay" in param_group:  # torch.optim.Adam(W)'s per group (torch >= 2.6): it had been
            # kept as an unknown key, and the group ran L2. Translated on a copy: the caller's dict keeps its
            # meaning (for a torch.optim twin built from it, or a retry after an error)
            param_group = {k: v for k, v in param_group.items() if k != "decoupled_weight_decay"} | {
                "decay": self._decay_of_torch_group(param_group)}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["fused"]:
            try:
                check_fused_params(group["params"], len(self.param_groups) - 1)
            except ValueError:
                self.param_groups.pop()  # leave the optimizer as it was, as any other invalid group does
                raise

    def _decay_of_torch_group(self, group: dict[str, Any]) -> str:
        """The decay mode of a group that gives torch's ``decoupled_weight_decay``: True is ``"decoupled_lr"``,
        False ``"l2"``. A decay the group gives must agree, and so must the optimizer's when it is the paper's
        ``"decoupled"``, which the flag cannot express (as with the keywords, which refuse such a pair)."""
        flag = group["decoupled_weight_decay"]
        wanted = "decoupled_lr" if check_flag(flag, "decoupled_weight_decay") else "l2"
        decay = group.get("decay", self.defaults["decay"])
        if decay != wanted and ("decay" in group or decay == "decoupled"):
            raise ValueError(f"{type(self).__name__}: a group's decoupled_weight_decay={flag!r} (torch's {wanted!r}) "
                             f"contradicts decay={decay!r}")
        return wanted

    def _from_torch_group(self, saved: dict[str, Any], current: dict[str, Any],
                          torch_name: str) -> dict[str, Any] | None:
        """A torch.optim.Adam or AdamW group as this optimizer's, where the decay mode agrees: AdamW's is
        ``"decoupled_lr"``, Adam's ``"l2"`` (torch 2.4 saves the two alike: without weight decay they agree). Their
        state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) is ours, so a run moves over and goes on
        as it would have in torch; torch's execution switches (foreach, fused) are dropped."""
        if "amsgrad" not in saved:
            return None
        on = [k for k in ("capturable", "differentiable") if saved.get(k)]
        if on:
            raise ValueError(f"it is a {torch_name} state saved with {' and '.join(f'{k}=True' for k in on)}, which "
                             "theorylab's optimizers do not implement (save it with the option off)")
        if saved.get("weight_decay", 0) != 0:
            if "decoupled_weight_decay" not in saved:
                raise ValueError(f"it is a {torch_name} state with weight decay, saved by a torch (2.4) that does "
                                 "not record which of the two it was (their decays differ): load it into the "
                                 "torch.optim optimizer that saved it, or save it again from torch >= 2.5")
            theirs = "decoupled_lr" if saved["decoupled_weight_decay"] else "l2"
            if theirs != current["decay"]:
                build = "theorylab.optim.Adam(decay='l2')" if isinstance(self, AdamW) else f"decay={theirs!r}"
                raise ValueError(f"it is a {torch_name} state, whose decay is theorylab's decay={theirs!r}; this "
                                 f"group's is {current['decay']!r} (build the optimizer with {build})")
        torch_only = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
        return {**{k: v for k, v in saved.items() if k not in torch_only}, "decay": current["decay"],
                CONSTRUCTION_LR_KEY: current.get(CONSTRUCTION_LR_KEY, saved.get("lr"))}

    def _complete_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Also torch's ``decoupled_weight_decay`` in each group whose decay torch has (``"l2"``: False,
        ``"decoupled_lr"``: True): torch.optim.Adam (>= 2.6) loads its groups' settings from the saved ones, and
        without the flag a ``"decoupled_lr"`` run went on with L2 there, silently. ``"decoupled"`` (λ times
        lr/lr₀) has no torch equivalent and gets no flag. Loaded here, the flag is dropped again."""
        state_dict = super()._complete_state_dict(state_dict)
        for group in state_dict["param_groups"]:
            if group.get("decay") in ("l2", "decoupled_lr"):
                group["decoupled_weight_decay"] = group["decay"] == "decoupled_lr"
        return state_dict

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        checked = super()._checked_state_dict(state_dict)
        groups = checked.get("param_groups")
        if checked.get(STATE_KIND_KEY) is not None and isinstance(groups, list):  # ours: the flag is torch's only
            checked["param_groups"] = [{k: v for k, v in g.items() if k != "decoupled_weight_decay"}
                                       if isinstance(g, dict) else g for g in groups]
        return checked

    def check_torch_keys(self, group: dict[str, Any]) -> None:
        """Also refuse a ``decoupled_weight_decay`` (written into a group by hand) that contradicts its decay."""
        super().check_torch_keys(group)
        if "decoupled_weight_decay" in group:  # written into param_groups by hand, or loaded
            wanted = "decoupled_lr" if check_flag(group["decoupled_weight_decay"], "decoupled_weight_decay") else "l2"
            if group["decay"] != wanted:
                raise ValueError(f"{type(self).__name__}: decoupled_weight_decay="
                                 f"{group['decoupled_weight_decay']!r} (torch's {wanted!r}) contradicts the group's "
                                 f"decay={group['decay']!r}: set decay instead")

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        """The chain: Adam's scaling (``amsgrad`` as the group says), the decay part where ``decay`` puts it
        (:func:`~theorylab.optim.decay.with_decay`), the lr; led by a negation when ``maximize``."""
        return [*([Negate()] if group["maximize"] else []),
                *with_decay([ScaleByAdam(amsgrad=group["amsgrad"])], group["decay"])]

    def _check_state(self, group_index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """A fused group's state must have its parameters' dtypes, the kernel's one dtype: a state kept in another
        precision (a model cast after the optimizer stepped; see
        :func:`~theorylab.optim.transforms.state_buffer`) is refused, as ``fused=True`` refuses what the kernel
        cannot take, rather than stepped by the chain at a fraction of the speed without a word."""
        if not group.get("fused", False):
            return
        for p in params:
            for key, value in self.state.get(p, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.dtype != p.dtype:
                    index = next(i for i, q in enumerate(group["params"]) if q is p)  # identity: == compares values
                    raise ValueError(
                        f"{type(self).__name__}(fused=True): parameter group {group_index}, parameter {index}: its "
                        f"state {key!r} is {value.dtype} where the parameter is {p.dtype}, and torch's fused kernel "
                        "takes one dtype (was the model cast after the optimizer stepped?). Cast the state with "
                        "opt.load_state_dict(opt.state_dict()), as in torch, or set the group's fused to False to "
                        "keep the state in its precision")

    def _fused_group_step(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if not group.get("fused", False):
            return False
        weight_decay, lr = group["weight_decay"], group["lr"]
        if group["decay"] == "decoupled" and weight_decay != 0:
            lr0 = reference_lr(group)
            if lr0 == 0:
                # the chain's multiplier is then 1 at lr > 0 (decay λθ) and 0 at lr 0, while the kernel decays by
                # lr·wd·θ, which no one wd matches; a corner case not worth a second code path: the chain runs it
                return False
            weight_decay = weight_decay / lr0  # the kernel's lr·wd is then (lr/lr0)·λ, the scheduled decay
        # by identity: list.index would compare the groups' tensors with ==
        has_complex = check_fused_params(group["params"],
                                         next(i for i, g in enumerate(self.param_groups) if g is group))
        # step() passes the parameters with a gradient; the kernel takes no lazily conjugated or negated one (a
        # model using p.conj() gets the first: view_as_real refuses it)
        grads = [cast(Tensor, p.grad).resolve_conj().resolve_neg() for p in params]
        warn_float16_second_moment(params, group["betas"][1])
        amsgrad = group["amsgrad"]
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        buffers: list[list[Tensor]] = [[] for _ in keys]  # per key, one tensor per parameter
        steps = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # 0, not 1: the kernel advances it. Made where the parameter is: the CUDA kernel reads it there, and
                # a copy from the host waits for the GPU (the first step had read back once per parameter)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if state["step"].device != p.device:  # the CUDA kernel reads the count on the parameter's device
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            for key, tensors in zip(keys, buffers, strict=True):
                # max_exp_avg_sq too, as the chain makes it: zeros, max(0, r) = r
                tensors.append(state_buffer(state, key, p))
            steps.append(state["step"])
        if has_complex:  # the kernel takes real tensors: complex ones go in as (..., 2) views, as torch.optim's do
            params, grads, *buffers = (
                [torch.view_as_real(t) if t.is_complex() else t for t in ts] for ts in (params, grads, *buffers))
        if not all(_kernel_safe(*ts) for ts in zip(params, grads, *buffers, strict=True)):
            return False
        exp_avgs, exp_avg_sqs, *max_exp_avg_sqs = buffers
        beta1, beta2 = group["betas"]
        # adamw, not adam(decoupled_weight_decay=True): torch 2.4 (which we support) lacks that keyword
        kernel = torch_adam if group["decay"] == "l2" else torch_adamw
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs[0] if amsgrad else [], steps, fused=True,
               amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=group["eps"],
               maximize=group["maximize"])
        return True


class AdamW(Adam):
    r"""torch.optim.AdamW's convention: ``Adam(decay="decoupled_lr")``, decay lr·λ·θ per step, λ = 1e-2 default.

    With :math:`a_t = \hat s_t / (\sqrt{\hat r_t} + \delta)` the Adam direction of :class:`Adam`, from moments of the
    gradient alone (the decay does not enter them), each step is

    .. math::
        \Delta\theta = -\text{lr}\,(a_t + \lambda\theta)

    with θ the value before the step, lr the group's current learning rate (the problem set's ε) and λ
    ``weight_decay``: torch.optim.AdamW's (and optax.adamw's) convention, ``decay="decoupled_lr"`` of
    :class:`Adam`. The decay per step is lr·λ, so the best λ moves as 1/lr. For the paper's decoupling of λ from
    the learning rate use ``Adam(..., decay="decoupled")``. ``fused=True`` runs torch's fused AdamW kernel: see
    :class:`Adam`.

    Args:
        params, lr, betas, eps, amsgrad, maximize, nonfinite, fused: as :class:`Adam` (lr default 1e-3, betas
            (0.9, 0.999), eps 1e-8, the switches False, nonfinite ``"raise"``).
        weight_decay: λ, default 1e-2; a finite number >= 0 with lr·λ < 1 (not checked with
            ``nonfinite="propagate"``: see :func:`~theorylab.optim.decay.check_decay_rate`).
        **torch_options: torch.optim.AdamW's ``foreach`` (True, False or None; ignored), ``capturable`` and
            ``differentiable`` (accepted off: False or None). There is no ``decay`` (it is ``"decoupled_lr"``)
            and no ``decoupled_weight_decay``.

    Raises:
        TypeError: as :class:`Adam`; also a ``decay`` or ``decoupled_weight_decay`` keyword.
        ValueError: as :class:`Adam` (lr·λ >= 1 among them, unless ``nonfinite="propagate"``: the weights would be
            multiplied by 1 − lr·λ <= 0).
        NonFiniteGradientError, RuntimeError: at :meth:`step`, as :class:`Adam`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 nonfinite: str = "raise", fused: bool = False, **torch_options: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay="decoupled_lr",
                         amsgrad=amsgrad, maximize=maximize, nonfinite=nonfinite, fused=fused, **torch_options)
