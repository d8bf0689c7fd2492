"""When and where to draw progress bars: on an interactive terminal only, never in CI or when output is piped,
and on stderr, the stream that test decides on (rich's default console is stdout: with ``verify > file`` on a
terminal the bar was suppressed yet a stray line reached the file)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any


def show_progress() -> bool:
    """Whether stderr is a terminal and the environment is not CI (``CI`` unset, empty, ``0`` or ``false``)."""
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return sys.stderr.isatty() and not in_ci


def progress_console() -> Any:
    """The rich console progress bars draw on: stderr."""
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def progress_steps(total: int, description: str) -> Iterator[Callable[[str], None]]:
    """A transient bar of ``total`` steps where :func:`show_progress` allows one; yields ``advance(label)``, which
    counts a step and shows ``label`` (what runs next). Elsewhere ``advance`` does nothing."""
    if not show_progress():
        yield lambda label: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=progress_console()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda label: bar.update(task, advance=1, description=label)
