"""Seeded experiments that leave the caller's random state alone.

Training functions seed torch's global generator (``torch.manual_seed``): ``nn.Module`` initialisation and dropout
draw from it, so the seed must reach it. :func:`keeps_global_rng` restores the caller's state afterwards, as
``torch.random.fork_rng`` does, so that calling an experiment does not reseed the code around it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")


def seed_global(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed torch's CPU generator, and the CUDA generators only for a CUDA ``device``: ``torch.manual_seed`` also
    queues a seed for a CUDA runtime not yet started, which no ``fork_rng`` could take back."""
    torch.random.default_generator.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)


def keeps_global_rng(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` inside ``torch.random.fork_rng``: the CPU generator and those of the CUDA devices already in use
    are restored when it returns or raises (a CUDA runtime that ``fn`` starts keeps what ``fn`` seeded)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper
