"""Argument checks shared by the subcommands: bad values exit 2 with a message naming them, before any work."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MAX_SEED = 2**32 - 1  # numpy's and torch's generators take any of these; the claims derive sub-seeds from it


def seed(text: str) -> int:
    """argparse type: an int in [0, 2³² − 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: must be an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: must lie in [0, {MAX_SEED}]")
    return value


def check_files(folder: Path, names: tuple[str, ...]) -> str | None:
    """None unless one of the output files ``names`` in ``folder`` exists as a folder (the write would fail only
    after all the work), else the reason."""
    for name in names:
        if (folder / name).is_dir():
            return f"cannot write {str(folder / name)!r}: a folder of that name exists"
    return None


def check_writable(folder: Path, what: str = "output folder") -> str | None:
    """None if ``folder`` can be created and written to, else the reason (for an error message)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".theorylab-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except (OSError, ValueError) as e:  # ValueError: e.g. a NUL byte in the path
        return f"cannot write to {what} {str(folder)!r}: {getattr(e, 'strerror', None) or e}"
    return None
