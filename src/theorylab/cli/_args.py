"""Argument checks shared by the subcommands: bad values exit 2 with a message naming them, before any work."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

try:
    import fcntl
except ImportError:  # Windows: runs into one folder are not locked against each other
    fcntl = None  # type: ignore[assignment]

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


def folder(text: str) -> str:
    """argparse type for ``--out``: a non-blank path. An empty one (say, an unset shell variable) would otherwise
    mean the current folder and scatter the run's files there; '.' asks for that explicitly."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"invalid folder {text!r}: give a folder name ('.' for the current one)")
    return text


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
        if folder.exists() and not folder.is_dir():
            return f"{what} {str(folder)!r} is a file, not a folder"
        for part in (folder, *folder.parents):  # mkdir would say "File exists"
            if part.is_symlink() and not part.exists():
                where = f"{what} {str(folder)!r}" + ("" if part == folder else f": its folder {str(part)!r}")
                return f"{where} is a broken symbolic link (to {os.readlink(part)!r})"
        folder.mkdir(parents=True, exist_ok=True)
        # a unique name: ranks of a multi-node job on a shared folder can have the same process id
        fd, probe = tempfile.mkstemp(prefix=".theorylab-write-test-", dir=folder)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except (OSError, ValueError) as e:  # ValueError: e.g. a NUL byte in the path
        return f"cannot write to {what} {str(folder)!r}: {getattr(e, 'strerror', None) or e}"
    return None


class OutputBusyError(RuntimeError):
    """Another theorylab run holds the output folder."""


@contextlib.contextmanager
def exclusive_output(folder: Path) -> Iterator[None]:
    """Holds an advisory lock on the (existing) ``folder`` for the block, so that two runs cannot interleave their
    writes into it; raises :class:`OutputBusyError` at once if another run holds it.

    The lock is ``flock`` on the folder itself: no lock file is left behind, and the kernel releases it when the
    process ends, however it ends. Where it cannot be taken for another reason (no ``fcntl`` on Windows; NFS, whose
    exclusive locks need a file open for writing; a folder that can be written but not read) the block runs
    unlocked, as before locks existed, with a one-line warning on stderr. Once the lock is held, the temporary
    files that a killed run left are removed (:func:`remove_stale_temporaries`)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # from flock: fd is open
            os.close(cast(int, fd))
            raise OutputBusyError(f"another theorylab run is writing into {str(folder)!r}; wait for it to end or "
                                  "choose another output folder") from None
        except OSError as e:
            if fd is not None:
                os.close(fd)
                fd = None
            print(f"theorylab: warning: cannot lock {str(folder)!r} ({e.strerror or e}); a second run into it at "
                  "the same time would not be refused", file=sys.stderr)
    if fd is not None:
        remove_stale_temporaries(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


#: the temporary files of our atomic writes (``tempfile.mkstemp``'s 8 random characters): a checkpoint, and a
#: results.json or metrics.json
_TEMPORARY = re.compile(r"\.(checkpoint\.pt-[a-z0-9_]{8}\.tmp|results-[a-z0-9_]{8}\.json)")


#: a temporary untouched for this long is stale: a live write keeps its file's mtime fresh (ours take seconds)
STALE_AFTER_S = 60.0


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove (and name) the temporary files that a run killed mid-write (SIGKILL, or SIGTERM from a scheduler
    or torchrun) left in ``folder``: as large as a checkpoint each, and nothing else would ever remove them.
    Called once the folder's lock is held. Writers that do not take the lock (``bench --json``, the library's
    functions called directly) use the same names, so only a file untouched for :data:`STALE_AFTER_S` goes."""
    removed: list[str] = []
    cutoff = time.time() - STALE_AFTER_S
    try:
        names = [entry.name for entry in os.scandir(folder)
                 if _TEMPORARY.fullmatch(entry.name) and entry.stat(follow_symlinks=False).st_mtime < cutoff]
    except OSError:
        return removed
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
            removed.append(name)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM (a CI job's timeout or cancel, a scheduler's stop) taken as Ctrl-C is (``verify``: the finished
    claims get their report; ``train``: the resume hint), for an exit status of 143. Yields a list that holds the
    signal once it came. A process forked from this one (claim 4.4's workers) dies of it as before. Main thread only
    (signal handlers can be set nowhere else)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked worker: the default action, death
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
