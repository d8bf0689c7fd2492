"""When and where to draw progress bars: on an interactive terminal only, never in CI or when output is piped,
and on stderr, the stream that test decides on (rich's default console is stdout: with ``verify > file`` on a
terminal the bar was suppressed yet a stray line reached the file)."""

from __future__ import annotations

import os
import sys
from typing import Any


def show_progress() -> bool:
    """Whether stderr is a terminal and the environment is not CI (``CI`` unset, empty, ``0`` or ``false``)."""
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return sys.stderr.isatty() and not in_ci


def progress_console() -> Any:
    """The rich console progress bars draw on: stderr."""
    from rich.console import Console

    return Console(stderr=True)
