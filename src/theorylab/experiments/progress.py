"""When to draw progress bars: on an interactive terminal only, never in CI or when output is piped."""

from __future__ import annotations

import os
import sys


def show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")
