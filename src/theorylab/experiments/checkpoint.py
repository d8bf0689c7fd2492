"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (state dicts included), so it loads
without unpickling arbitrary objects. It is written to a temporary file in the same folder, flushed to disk and
renamed over the old one: a crash at any moment leaves either the previous checkpoint or the new one, never a
half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not belong to this run."""


def umask_mode(fd: int) -> None:
    """Give a file from ``tempfile.mkstemp`` (always 0600) the mode an ordinary ``open`` would: 0666 minus the
    umask, so the outputs renamed into place are as readable as the report beside them."""
    if not hasattr(os, "fchmod"):  # Windows before Python 3.13, which has no such mode bits to set
        return
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    ``payload`` must be what :func:`load_checkpoint` (``weights_only=True``) reads back in every supported torch: a
    dict of tensors, ints, floats, strings, bools, None, dtypes, devices, sizes and dicts, lists and tuples of them
    (a config as ``config.to_dict()``). Anything else (a dataclass, a Path, a numpy array or scalar, a set, bytes) is
    refused here, with a TypeError naming its key, rather than written into a file that would not load.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"save_checkpoint: payload must be a dict; got {type(payload).__name__}")
    _check_loadable(payload, "payload")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        umask_mode(fd)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: what a weights_only load reads back besides tensors, None and the containers (exact types), in every torch
#: this package supports: torch 2.4 refuses bytes, bytearray, complex and sets, which later versions take
_LOADABLE_LEAVES = (str, bool, int, float, torch.dtype, torch.device, torch.Size)


def _check_loadable(value: Any, where: str) -> None:
    """TypeError naming ``where`` unless ``value`` is of a type that a ``weights_only`` load reads back."""
    kind = type(value)  # exact types: a subclass (np.float64 of float, a namedtuple, an IntEnum) is refused there
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_loadable(key, f"{where}'s key {key!r}")
            _check_loadable(item, f"{where}[{key!r}]")
    elif kind in (list, tuple):
        for i, item in enumerate(value):
            _check_loadable(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, torch.Tensor) or kind in _LOADABLE_LEAVES):
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}, which a weights_only load refuses; "
                        "store tensors, numbers, strings and containers of them (a config as config.to_dict())")


def load_checkpoint(path: str | Path, *, expected_format: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; CheckpointError says what is wrong with it.

    Args:
        path: the checkpoint file.
        expected_format: the value its ``"format"`` key must hold (e.g. the char-LM's), or None: any.
    """
    path = Path(path)
    try:  # Python 3.11's pathlib lets "file name too long" (and a NUL byte) through as exceptions
        is_file = path.is_file()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot use {str(path)!r}: {e}") from None
    if not is_file:
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make torch's unpickler raise almost anything
        # (KeyError, IndexError, UnicodeDecodeError, ... besides UnpicklingError and BadZipFile): all mean "not a
        # checkpoint" to the caller
        text = str(e).strip()
        # torch's weights-only refusal suggests weights_only=False (arbitrary code execution): keep only its reason
        text = text.split("WeightsUnpickler error:", 1)[-1].strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} (corrupt or not a checkpoint): {first}") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a dict")
    if expected_format is not None and payload.get("format") != expected_format:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {payload.get('format')!r}, "
                              f"expected {expected_format!r}")
    return payload
