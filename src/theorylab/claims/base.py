"""What a claim returns, and the registry that maps claim IDs (and extra report sections) to functions.

A claim is a function ``(seed: int, quick: bool) -> Evidence``; it is registered with ``@claim("2.1")``. It
decides its own verdict from what it measured and returns matplotlib figures, which the engine saves beside the
report. Extra sections (``theorylab verify --extras``: model training, longer experiments) are registered the
same way with ``@extra("name", "Title")`` and return the same :class:`Evidence`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .catalogue import BY_ID, CLAIM_IDS


@dataclass
class Evidence:
    """The outcome of one measurement.

    Attributes:
        confirmed: the verdict the measurement supports (False = refuted; say why in ``notes``).
        numbers: named measured values (floats; non-finite values are written as strings in results.json).
        method: a few sentences on how it was measured (shown in the report).
        figures: name -> matplotlib Figure; saved as PNG by the engine, then closed.
        key: which of ``numbers`` matter most (results.json's ``key``; the summary table shows them when there
            is no ``summary``; default: the first three).
        notes: anything a reader must know, e.g. which sub-check failed.
        summary: the verdict's grounds in one line, for the summary table: what was compared with what, the
            measured numbers and the bounds they were judged against, written from the measurement (never a
            fixed text, so that it reads right whichever way the verdict goes).
        checks: each criterion of the verdict, written from the measurement with its bound (``"FLOPs ∝ n^1.91
            (needs 1.85–2.05)"``) -> whether it held. When given, ``confirmed`` must be all of them (the engine
            makes a claim that disagrees an error), and the report lists them; a refuted claim's one-line reason
            is the first sentence of ``notes``, else the failed checks.
        judged: False where this run cannot decide the claim by design (4.4 under ``--quick``: too few steps and
            replicates). The verdict is then "not judged" whatever ``confirmed`` says (the checks still show
            what was measured), the one-line reason is the first sentence of ``notes``, and the run's exit
            status does not count it as a failure.
    """

    confirmed: bool
    numbers: dict[str, float]
    method: str
    figures: dict[str, Any] = field(default_factory=dict)
    key: list[str] | None = None
    notes: str = ""
    summary: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    judged: bool = True


ClaimFn = Callable[[int, bool], Evidence]


def first_sentence(text: str, limit: int = 240) -> str:
    """The first sentence of ``text``, at most ``limit`` characters."""
    first = text.strip().split(". ", 1)[0].rstrip(".")
    return first if len(first) <= limit else first[:limit - 1] + "…"


#: the verdicts a record can have; "not judged" (see :attr:`Evidence.judged`) is not a failure of the run
VERDICTS = ("confirmed", "refuted", "error", "not judged")
PASSING = ("confirmed", "not judged")


def error_line(error: str, limit: int = 240) -> str:
    """The line of a traceback (or a reason) that says what went wrong: the first line of the exception after the
    last frame (not its message's later lines or its notes); a text without frames, its first line."""
    lines = [line.rstrip() for line in str(error).splitlines()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else 0
    while frames and start < len(lines) and lines[start].startswith(" "):  # the frame's code line and carets
        start += 1
    rest = [line.strip() for line in lines[start:] if line.strip()]
    line = rest[0] if rest else "error"
    return line if len(line) <= limit else line[:limit - 1] + "…"


def why_line(record: dict[str, Any], limit: int = 240) -> str:
    """Why a claim's record is not confirmed, in a line: the first sentence of the claim's notes, else the checks
    that failed ("failed: ..."); "" when neither says."""
    notes = record.get("notes")
    if isinstance(notes, str) and notes.strip():
        return first_sentence(notes, limit)
    checks = record.get("checks")
    failed = [str(k) for k, ok in checks.items() if not ok] if isinstance(checks, dict) else []
    line = "failed: " + "; ".join(failed) if failed else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads. Tiny tensors (a 64×64 matmul per step) run faster on one thread,
    and on a busy machine extra threads spin-wait for a core: one claim measured 7 s on 1 thread, 70 s on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Section:
    """A registered claim or extra section."""

    id: str
    title: str
    statement: str
    kind: str  # "claim" | "extra"
    fn: ClaimFn | None


_CLAIMS: dict[str, ClaimFn] = {}
_EXTRAS: dict[str, Section] = {}


def claim(claim_id: str) -> Callable[[ClaimFn], ClaimFn]:
    """Register the function that measures claim ``claim_id`` (one of the catalogue's IDs)."""
    if claim_id not in BY_ID:
        raise KeyError(f"unknown claim ID {claim_id!r}; valid IDs: {', '.join(CLAIM_IDS)} (a section of your own is "
                       "registered with @extra)")

    def register(fn: ClaimFn) -> ClaimFn:
        _CLAIMS[claim_id] = fn
        return fn

    return register


def extra(section_id: str, title: str, statement: str = "") -> Callable[[ClaimFn], ClaimFn]:
    """Register an extra report section, run with ``--extras`` or when ``--only`` names ``section_id``. A section of
    your own is registered so in a script that then runs the command line in the same process::

        from theorylab.claims import Evidence, extra
        from theorylab.cli import main

        @extra("my-check", "What I measured", "The statement it tests")
        def my_check(seed: int, quick: bool) -> Evidence:
            error = ...  # measured, from seed
            return Evidence(error < 1e-6, {"error": error}, "How it was measured.",
                            checks={f"error {error:.1e} (needs < 1e-6)": error < 1e-6})

        raise SystemExit(main(["verify", "--only", "my-check", "--out", "my-report"]))
    """

    for name, value in (("section_id", section_id), ("title", title), ("statement", statement)):
        if not isinstance(value, str) and not (name == "statement" and value is None):  # the summary table
            # failed on a title or ID of another type after the run, losing the exit status
            raise TypeError(f"extra: {name} must be a str; got {type(value).__name__} {value!r}")
    # an ID --only cannot select (it splits at whitespace and commas, and reads "-..." as an option); " 2.1" ran
    # claim 2.1 in its place
    if not section_id or section_id != section_id.strip() or any(c.isspace() or c == "," for c in section_id) \
            or section_id.startswith("-"):
        raise ValueError(f"extra: section_id {section_id!r} cannot be given to --only: use letters, digits, '.', "
                         "'-' or '_', without spaces or commas, not starting with '-'")

    def register(fn: ClaimFn) -> ClaimFn:
        # theorylab's own IDs are refused: a section of your own called "charlm" was replaced by the built-in one
        # when its module loaded, and one called "1.1" ran beside claim 1.1 under the same ID
        if not getattr(fn, "__module__", "").startswith("theorylab.claims."):
            if section_id in BY_ID:
                raise ValueError(f"extra: {section_id!r} is the ID of claim {section_id}; choose another")
            if section_id in EXTRA_MODULES.values():
                raise ValueError(f"extra: {section_id!r} is the ID of theorylab's own extra section; choose another")
        taken = _EXTRAS.get(section_id)
        if taken is not None and taken.fn is not None and _qualified(taken.fn) != _qualified(fn):
            warnings.warn(f"extra: the section {section_id!r} ({_qualified(taken.fn)}) is replaced by "
                          f"{_qualified(fn)}", UserWarning, stacklevel=2)
        _EXTRAS[section_id] = Section(section_id, title, statement, "extra", fn)
        return fn

    return register


def _qualified(fn: Callable[..., object]) -> str:
    """A function's module and name: registering the same one again (a notebook cell run twice) is no mistake."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def claim_sections() -> list[Section]:
    """All 16 claims in catalogue order; those not built yet have ``fn=None``."""
    _load_modules()
    return [Section(c.id, c.title, c.statement, "claim", _CLAIMS.get(c.id)) for c in BY_ID.values()]


#: the modules of the extra sections and the section each registers: one that fails to import (or is missing)
#: still appears, as an error naming the import error, instead of dropping out of the run
EXTRA_MODULES = {"extras_rnn": "rnn-tasks", "extras_charlm": "charlm"}


def extra_sections() -> list[Section]:
    """The extra sections (``verify --extras``): the built-in ones (RNN tasks, the char-level LM), then those
    registered with :func:`extra`. A built-in module that fails to import is still listed, as a section without
    a function, which the run reports as an error naming the import error."""
    _load_modules()
    failed = [Section(sid, f"{sid} (theorylab.claims.{module} did not register it)", "", "extra", None)
              for module, sid in EXTRA_MODULES.items() if sid not in _EXTRAS]
    return list(_EXTRAS.values()) + failed


def _load_modules() -> None:
    """Import the claim modules (they register themselves). A module that fails to import leaves its claims
    unregistered; the engine then reports them as errors instead of losing the other claims."""
    import importlib

    for name in ("q1_rnn", "q2_momentum", "q3_attention", "q4_weight_decay", *EXTRA_MODULES):
        try:
            importlib.import_module(f"theorylab.claims.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"theorylab.claims.{name}":
                _IMPORT_ERRORS[name] = repr(e)
        except Exception as e:  # noqa: BLE001 - reported per claim by the engine
            _IMPORT_ERRORS[name] = repr(e)


_IMPORT_ERRORS: dict[str, str] = {}


def import_error_for(section_id: str, kind: str = "claim") -> str | None:
    """The import error of the module that should register the claim or extra section ``section_id``, if any."""
    if kind == "extra":
        module = next((m for m, sid in EXTRA_MODULES.items() if sid == section_id), None)
    else:
        module = {"1": "q1_rnn", "2": "q2_momentum", "3": "q3_attention", "4": "q4_weight_decay"}.get(section_id[:1])
    return _IMPORT_ERRORS.get(module) if module else None
