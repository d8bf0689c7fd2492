"""The linters as tests: ruff over the sources, tests and benchmarks, and mypy over the package, whose type hints
are part of its API (it ships ``py.typed``; ``typed_usage.py`` is what a typed caller writes). Settings come from
pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CHECKOUT = (ROOT / "pyproject.toml").is_file() and (ROOT / "src" / "theorylab").is_dir()
pytestmark = pytest.mark.skipif(not IN_CHECKOUT, reason="these check the repository's sources: run from a checkout")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_passes() -> None:
    result = _run("ruff", "check", "src", "tests", "benchmarks")
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}\n{result.stderr}"


def test_mypy_passes() -> None:
    result = _run("mypy", "src/theorylab", "tests/typed_usage.py")
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}\n{result.stderr}"
