"""Peak memory of a call: the most bytes of tensor storage that the call itself had alive at once.

A ``TorchDispatchMode`` sees every aten op the call runs; each output storage that is new (not the storage of
one of the op's arguments, as views and in-place ops return) is added to a running total, and a weakref
finalizer subtracts it when the storage is freed. So the measure is

    peak over the call of (bytes of storages allocated during the call and still alive),

which excludes what existed before (inputs, parameters, imports: the "extra peak a call adds") and is exactly
reproducible — no allocator caching, no page-level noise, no dependence on other processes. It does not see
scratch buffers that a single kernel allocates and frees internally (e.g. inside SDPA's fused CPU kernel), nor
memory outside torch tensors (``torch.from_numpy`` and ``torch.as_tensor`` of an array share numpy's memory: their
storages reach the dispatcher through ``lift_fresh`` but are not resizable, and are skipped), nor storages created
outside the dispatcher (``torch.load`` builds its storages directly), nor sparse tensors made inside the call (views
of a sparse argument's parts, such as ``_values()``, count as nothing). ``torch.tensor(data)`` is seen: its copy
reaches the dispatcher through ``lift_fresh``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _counted(t: Any) -> bool:
    """A tensor whose storage is measured: strided (sparse tensors have no single storage) and not on meta."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


_SPARSE_PARTS = {torch.sparse_coo: ("_indices", "_values"),
                 torch.sparse_csr: ("crow_indices", "col_indices", "values"),
                 torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
                 torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
                 torch.sparse_bsc: ("ccol_indices", "row_indices", "values")}


def _storages(t: Any) -> list[int]:
    """The storages behind an argument: its own, or a sparse tensor's indices and values (whose views, such as
    ``_values()``, allocate nothing)."""
    if _counted(t):
        return [t.untyped_storage()._cdata]
    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout in _SPARSE_PARTS:
        return [getattr(t, part)().untyped_storage()._cdata for part in _SPARSE_PARTS[t.layout]]
    return []


class PeakMemory(TorchDispatchMode):
    """Context manager tracking live bytes of the tensor storages created inside it.

    Attributes during the block: ``current`` (bytes alive now) and ``peak`` (the maximum); after it, their values
    at its end. Each ``with`` starts from zero (a reused instance had reported the previous block's peak). Not
    seen: work on other threads (dispatch modes are thread-local) and a storage that grows after its creation
    (``resize_``, an ``out=`` tensor resized by the op)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.finalize] = {}

    def __enter__(self) -> PeakMemory:
        self.current = 0
        self.peak = 0
        self._alive = {}
        return super().__enter__()

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output that shares an argument's storage (a view, an in-place or out= op) allocated nothing; except
        # lift_fresh, which returns its argument: the storage torch.tensor(data) has just filled
        fresh = func is torch.ops.aten.lift_fresh.default
        inputs = set() if fresh else {key for t in tree_leaves((args, kwargs)) for key in _storages(t)}
        for t in tree_leaves(out):
            if _counted(t):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._alive or key in inputs:
                    continue
                if fresh and not storage.resizable():  # memory torch did not allocate: numpy's, a buffer's
                    continue
                nbytes = storage.nbytes()
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                self._alive[key] = weakref.finalize(storage, self._freed, key, nbytes)
        return out

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        for fin in list(self._alive.values()):  # later frees no longer concern this measurement
            fin.detach()
        self._alive.clear()
        return out


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak bytes of tensor storage that ``fn(*args, **kwargs)`` had alive at once (its output included)."""
    with PeakMemory() as tracker:
        result = fn(*args, **kwargs)
        del result
    return tracker.peak
