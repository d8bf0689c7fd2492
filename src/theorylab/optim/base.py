"""A torch.optim.Optimizer whose step is a chain of :mod:`theorylab.optim.transforms`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .transforms import StepContext, Transform, chain_step

NONFINITE_POLICIES = ("raise", "skip", "propagate")


def check_lr(lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")


def check_beta(beta: float, name: str = "beta", *, allow_zero: bool = False) -> None:
    """β must lie in (0, 1), or [0, 1) with ``allow_zero``; β = 1 would never forget and never debias."""
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"Invalid {name} value: {beta!r} (must lie in {interval})")
    low_ok = beta >= 0 if allow_zero else beta > 0
    if not (low_ok and beta < 1):
        raise ValueError(f"Invalid {name} value: {beta} (must lie in {interval})")


def check_nonnegative(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name} value: {value} (must be a finite number >= 0)")


def check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name} value: {value} (must be a finite number > 0)")


def check_nonfinite(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite policy: {policy!r} (must be one of {', '.join(NONFINITE_POLICIES)})")


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or ±inf and the group's ``nonfinite`` policy is ``"raise"``."""


class ChainOptimizer(torch.optim.Optimizer):
    """Base class: subclasses return the transform chain of a parameter group in :meth:`transforms`.

    Per parameter it keeps ``state["step"]`` (a float tensor, as torch.optim does) plus the transforms' buffers.
    Parameters without a gradient are skipped and their step count does not advance; parameters of one group
    with different step counts are stepped in buckets, so bias corrections use each parameter's own count.

    Every group records ``initial_lr`` (the lr it was created with, as torch's lr schedulers do), which the
    schedule-multiplied decoupled decay reads.

    **Non-finite gradients.** ``group["nonfinite"]`` (default ``"raise"``) decides what a NaN or ±inf in any
    gradient of a group does, *before* any state or parameter is touched:

    * ``"raise"``: :class:`NonFiniteGradientError` (a ``FloatingPointError``) naming the group and parameter
      indices; parameters, buffers and step counts stay as they were, so training can resume after fixing it;
    * ``"skip"``: the group's step is skipped (as ``torch.amp.GradScaler`` does) and ``self.skipped_steps``
      is incremented;
    * ``"propagate"``: torch.optim's behaviour: the NaN flows into the moment buffers and the parameters, and
      stays there. Saves one read of the gradients per step.
    """

    skipped_steps: int = 0

    def transforms(self, group: dict[str, Any]) -> list[Transform]:
        raise NotImplementedError

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (called for every new group and at every step); override."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.check_group(merged)
        check_nonfinite(merged.get("nonfinite", "raise"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            self.check_group(group)
            chain = self.transforms(group)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            policy = group.get("nonfinite", "raise")
            if policy != "propagate" and not _all_finite([p.grad for p in params]):
                if policy == "skip":
                    self.skipped_steps += 1
                    continue
                bad = [i for i, p in enumerate(group["params"])
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or inf) in parameter group {group_index}, parameter index(es) "
                    f"{bad}; no parameter or state was changed. Pass nonfinite='skip' to skip such steps or "
                    "'propagate' for torch.optim's behaviour")
            if self._fused_group_step(group, params):
                continue
            buckets: dict[int, list[Tensor]] = defaultdict(list)
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["step"] += 1
                buckets[int(state["step"].item())].append(p)
            for t, bucket in buckets.items():
                ctx = StepContext(params=bucket, states=[self.state[p] for p in bucket], group=group, step=t,
                                  scratch=self._scratch)
                chain_step(chain, ctx, [p.grad for p in bucket])
        return loss

    def _fused_group_step(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Step ``params`` (the group's parameters with a gradient) with a fused kernel instead of the chain.

        Called by :meth:`step` after validation and the non-finite policy, so an override sees only finite
        gradients (unless ``"propagate"``). Return False to run the chain; return True only after stepping every
        parameter and advancing its ``state["step"]`` exactly once, with the chain's state keys, so that a
        ``state_dict`` saved on either path resumes on the other.
        """
        return False

    def _scratch(self, params: list[Tensor]) -> list[Tensor]:
        """Work tensors shaped like ``params``, kept between steps but not in ``state`` (nor ``state_dict``).

        Reusing them instead of allocating every step matters on CPU, where a fresh multi-megabyte tensor is
        fresh pages from the kernel (page faults cost more than the arithmetic). They hold one parameter-sized
        tensor per parameter: as much memory as torch's foreach step allocates transiently, but resident.
        """
        buffers: dict[Tensor, Tensor] = self.__dict__.setdefault("_scratch_buffers", {})
        out = []
        for p in params:
            buf = buffers.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(buf)
        return out

    def scratch_bytes(self) -> int:
        """Bytes held by the reusable work tensors (see :meth:`_scratch`)."""
        return sum(b.numel() * b.element_size() for b in self.__dict__.get("_scratch_buffers", {}).values())


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite. Fast path: one read of every tensor for its sum, which is NaN or inf if any
    entry is (a NaN or inf cannot cancel out); a sum can also overflow to inf on large finite entries, so a
    non-finite sum is re-checked exactly. A sum is the cheapest full read torch offers here (about 0.6× the time
    of a 2-norm on 10M float32 entries); half-precision tensors are summed in float32 to keep false alarms rare."""
    sums = [t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum() for t in tensors]
    if len({x.dtype for x in sums}) > 1:  # stack needs one dtype; |x| keeps a complex sum's non-finiteness
        sums = [x.abs().to(torch.float64) for x in sums]
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def as_param_list(params: Iterable[Any]) -> Iterable[Any]:
    """Materialise generators so that the emptiness check of torch.optim gives a clear error."""
    return list(params) if not isinstance(params, Tensor) else params
