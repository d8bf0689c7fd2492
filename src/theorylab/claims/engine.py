"""Runs claims one by one, isolated, and keeps results.json valid after every claim."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..env import environment
from .base import Evidence, Section, claim_sections, error_line, extra_sections, import_error_for, why_line
from .catalogue import CLAIM_IDS

RESULTS_FILE = "results.json"


class UnknownClaimError(ValueError):
    """An ID given to :func:`select_sections` (``verify --only``) that names no claim or extra section; the
    message lists the valid ones."""


class ClaimsInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_claims`; ``payload`` is what results.json holds (None if nothing was written yet,
    so that a caller does not render an earlier run's file as this one's)."""

    def __init__(self, payload: dict[str, Any] | None) -> None:
        super().__init__()
        self.payload = payload


def select_sections(only: Sequence[str] | None, extras: bool) -> list[Section]:
    """The claims to run (all, or those in ``only``, in catalogue order) followed by the extras: all of them with
    ``extras``, else those that ``only`` names (built-in or registered with ``@extra``), in its order."""
    sections = claim_sections()
    available = {s.id: s for s in extra_sections()}
    if not only:
        return sections + (list(available.values()) if extras else [])
    # "1.1 2.2" (a quoted shell variable) or "1.1,2.2" is two IDs; a blank one is named, not skipped
    only = [part for given in only for part in (given.replace(",", " ").split() or [given])]
    unknown = [i for i in only if i not in CLAIM_IDS and i not in available]
    if unknown:
        raise UnknownClaimError(f"unknown claim ID(s): {', '.join(map(repr, unknown))}; valid IDs: "
                                f"{', '.join(CLAIM_IDS)}, and the extra sections {', '.join(available)}")
    sections = [s for s in sections if s.id in set(only)]
    if extras:
        return sections + list(available.values())
    return sections + [available[i] for i in dict.fromkeys(only) if i in available]


def json_number(x: Any) -> Any:
    """A JSON-safe number: bools as 0/1, non-finite floats as the strings 'inf', '-inf', 'nan'."""
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, (np.integer, int)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else str(x)


def json_safe(x: Any) -> Any:
    """``x`` with every float (and tensor or numpy scalar) through :func:`json_number`, in nested dicts and lists:
    what ``json.dump(..., allow_nan=False)`` accepts."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating, np.integer, np.bool_, torch.Tensor)):
        return json_number(x)
    return x


def write_json_atomic(path: Path, payload: dict[str, Any], *, mode: int | None = None) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees a half-written file. The file
    gets permission bits ``mode`` (default: an ordinary new file's, 0666 minus the umask)."""
    from ..experiments.checkpoint import umask_mode

    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=path.parent)
    try:
        if mode is None or not hasattr(os, "fchmod"):  # Windows before Python 3.13: no mode bits to set
            umask_mode(fd)
        else:
            os.fchmod(fd, mode)
        # backslashreplace: a path or argument that is not valid UTF-8 (Linux allows any bytes) reaches Python as
        # lone surrogates, which UTF-8 cannot encode; written as \udcff escapes, the file stays valid JSON
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            json.dump(payload, f, indent=2, allow_nan=False, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _matplotlib_backend_restored() -> Iterator[None]:
    """The figures are drawn with Agg (:func:`run_section`); afterwards the caller's backend is back, so that a
    notebook that ran ``theorylab.cli.main(["verify", ...])`` still shows its own plots inline."""
    import matplotlib

    previous = matplotlib.get_backend()
    try:
        yield
    finally:
        if matplotlib.get_backend() != previous:
            with contextlib.suppress(ImportError, ValueError):  # it was usable before; if not now, Agg stays
                matplotlib.use(previous, force=True)


@contextlib.contextmanager
def _global_rng_restored() -> Iterator[None]:
    """The caller's random streams (Python's, numpy's, torch's, and CUDA's where it was started) go on afterwards
    where they were: every claim is run from its seed, and a script that calls
    ``theorylab.cli.main(["verify", ...])`` between its own draws must not find them reset to the run's seed."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _save_figures(section: Section, evidence: Evidence, out_dir: Path) -> tuple[list[str], list[str]]:
    """(the PNG files written, a note per figure that could not be drawn): a figure that fails to render (a
    mathtext typo, a full disk) must not cost the claim its measured numbers and verdict."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    names, failures = [], []
    for name, fig in evidence.figures.items():
        file = f"{section.kind}-{section.id}-{name}.png".replace(" ", "_").replace("/", "_")
        while file in names:  # names that map to one file name ("a b", "a/b") must not overwrite each other
            file = file.removesuffix(".png") + "_.png"
        try:
            if not isinstance(fig, Figure):
                raise TypeError(f"{type(fig).__name__} is not a matplotlib Figure")
            fig.savefig(out_dir / file, dpi=110, bbox_inches="tight")
            names.append(file)
        except Exception as e:  # noqa: BLE001 - reported in the claim's notes instead
            with contextlib.suppress(OSError, ValueError):  # the name itself may be what failed (too long, NUL)
                (out_dir / file).unlink(missing_ok=True)
            failures.append(f"figure {name!r} could not be drawn: {type(e).__name__}: {str(e).strip()[:300]}")
        finally:
            if isinstance(fig, Figure):
                plt.close(fig)
    return names, failures


@contextlib.contextmanager
def _torch_state_restored() -> Iterator[None]:
    """Each claim starts from the same global torch state: one that sets the default dtype or device, turns
    gradients off, anomaly detection on or changes the thread count (and then raises) must not change the claims
    after it. The working directory too: a section of one's own that changed it sent the later writes of a
    relative ``--out`` elsewhere (a traceback, and the finished sections lost)."""
    dtype, grad, threads = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()
    device, anomaly, cwd = _default_device(), torch.is_anomaly_enabled(), _working_directory()
    try:
        yield
    finally:
        if cwd is not None:  # first, and it cannot raise: a section that left a deleted temporary folder as the
            with contextlib.suppress(OSError):  # working directory made itself and the later ones errors
                os.chdir(cwd)
        torch.set_default_dtype(dtype)
        if _default_device() != device:  # only then: a default-device context intercepts every factory
            torch.set_default_device(None if device == torch.device("cpu") else device)
        torch.set_grad_enabled(grad)
        torch.set_anomaly_enabled(anomaly)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _working_directory() -> str | None:
    """``os.getcwd()``, or None where the working directory no longer exists (nothing to go back to)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _default_device() -> torch.device:
    """``torch.get_default_device()``, which on torch 2.4 raises AttributeError once ``set_default_device(None)``
    has been called (its context is then None: the default, the CPU)."""
    try:
        return torch.get_default_device()
    except AttributeError:
        return torch.device("cpu")


def run_section(section: Section, *, seed: int, quick: bool, out_dir: Path) -> dict[str, Any]:
    """Run one claim; any exception becomes verdict "error" with its traceback, never an escape."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    record: dict[str, Any] = {"id": section.id, "title": section.title, "kind": section.kind,
                              "statement": section.statement}
    start = time.perf_counter()
    try:
        if section.fn is None:
            reason = "not implemented"
            if err := import_error_for(section.id, section.kind):
                reason = f"its module failed to import: {err}"
            record.update(_error_fields(reason, record))
        else:
            with _global_rng_restored(), _torch_state_restored():
                _seed_everything(seed)
                evidence = section.fn(seed, quick)
            if not isinstance(evidence, Evidence):
                raise TypeError(f"claim {section.id} returned {type(evidence).__name__}, not Evidence")
            numbers = _evidence_numbers(section.id, evidence.numbers)
            key = evidence.key if evidence.key is not None else list(numbers)[:3]
            notes = "" if evidence.notes is None else str(evidence.notes)
            checks = {" ".join(str(k).split()): bool(v) for k, v in (evidence.checks or {}).items()}
            if checks and bool(evidence.confirmed) != all(checks.values()):
                raise ValueError(f"claim {section.id} returned confirmed={evidence.confirmed!r}, but its checks "
                                 f"say {all(checks.values())}: {checks}")
            verdict = "not judged" if not evidence.judged else "confirmed" if evidence.confirmed else "refuted"
            record.update(verdict=verdict, evidence=numbers,
                          key=[str(k) for k in key if str(k) in numbers], method=str(evidence.method), notes=notes,
                          summary=" ".join(str(evidence.summary or "").split()),  # one line in any table
                          checks=checks)
            # the reason in a line, from the claim alone (a figure that fails to draw below is not the reason)
            record["why"] = why_line(record) if verdict != "confirmed" else ""
            json.dumps(record, allow_nan=False)  # what results.json cannot hold fails this claim, not the run
            record["figures"], failures = _save_figures(section, evidence, out_dir)
            if failures:
                record["notes"] = "\n".join(filter(None, [record.get("notes") or "", *failures]))
                record["figure_errors"] = failures
    except KeyboardInterrupt:  # Ctrl-C stops the run (run_claims keeps what is finished)
        raise
    except BaseException:  # noqa: BLE001 - one failing claim must not lose the others (SystemExit, GeneratorExit too)
        record.update(_error_fields(traceback.format_exc(), record))
    finally:
        plt.close("all")
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _evidence_numbers(claim_id: str, numbers: dict[str, Any]) -> dict[str, Any]:
    """``Evidence.numbers`` as results.json holds them; a value that is not a number is an error naming its key."""
    out = {}
    for k, v in numbers.items():
        try:
            out[str(k)] = json_number(v)
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a tensor of more than one element
            raise TypeError(f"claim {claim_id}: Evidence.numbers[{str(k)!r}] is {v!r:.80}, not a number "
                            f"({type(e).__name__}: {e}); numbers hold floats: put text in notes or method") from None
    return out


def _error_fields(error: str, record: dict[str, Any]) -> dict[str, Any]:
    """A claim that raised: verdict "error", its traceback (or reason) in ``error``, and every key a record has,
    ``summary`` and ``why`` being the exception's own line (a consumer reading ``why`` must not meet a KeyError)."""
    line = error_line(error)
    return {"verdict": "error", "evidence": record.get("evidence", {}), "key": record.get("key", []), "figures": [],
            "error": error, "method": record.get("method", ""), "notes": record.get("notes") or "", "summary": line,
            "checks": {}, "why": line}


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..experiments.progress import progress_console

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True, console=progress_console())


def show_progress() -> bool:
    """A progress bar only on an interactive terminal, never in CI (see :mod:`theorylab.experiments.progress`)."""
    from ..experiments.progress import show_progress as terminal_and_not_ci

    return terminal_and_not_ci()


def run_claims(sections: Sequence[Section], *, out_dir: Path, seed: int = 0, quick: bool = False,
               progress: bool | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``sections`` in order, rewriting ``out_dir/results.json`` after each one; return the final payload.

    An interrupted run (Ctrl-C, a killed process) leaves a valid results.json holding every finished claim; Ctrl-C
    raises :class:`ClaimsInterrupted` carrying that payload.
    """
    out_dir = out_dir.absolute()  # the run's own writes do not depend on the working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "claims": [], "extras": [],
        "environment": {**environment(), "seed": seed, "quick": quick,
                        "command": shlex.join(argv) if argv is not None else None},
        "complete": False,
    }
    results_path = out_dir / RESULTS_FILE
    written = False
    bar = _progress(show_progress() if progress is None else progress)
    task = None
    with _matplotlib_backend_restored():
        try:
            write_json_atomic(results_path, payload)
            written = True
            if bar is not None:
                bar.start()
                task = bar.add_task("verifying", total=len(sections))
            for section in sections:
                if bar is not None:
                    bar.update(task, description=f"{section.kind} {section.id}")
                record = run_section(section, seed=seed, quick=quick, out_dir=out_dir)
                payload["claims" if section.kind == "claim" else "extras"].append(record)
                write_json_atomic(results_path, payload)
                if bar is not None:
                    bar.advance(task)
            payload["complete"] = True
            payload["total_seconds"] = round(sum(r["seconds"] for r in payload["claims"] + payload["extras"]), 3)
            write_json_atomic(results_path, payload)
        except KeyboardInterrupt:
            raise ClaimsInterrupted(payload if written else None) from None
        finally:
            if bar is not None:
                bar.stop()
    return payload
