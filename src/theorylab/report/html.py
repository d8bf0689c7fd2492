"""results.json -> one self-contained HTML page (inline CSS, no scripts, figures as PNG files beside it)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..claims.base import VERDICTS, error_line, why_line
from ..claims.catalogue import BY_ID, QUESTIONS

REPORT_FILE = "report.html"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { font-family: ui-monospace, Menlo, monospace; font-size: 0.9em; }
.verdict { font-weight: bold; padding: 1px 8px; border-radius: 10px; color: white; white-space: nowrap; }
.missing { color: #9a6700; }
.confirmed { background: #1a7f37; } .refuted { background: #cf222e; } .error { background: #9a6700; }
.not-judged { background: #57606a; }
.claim { border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.5em 1.2em 1em; margin: 1.2em 0; }
.statement { background: #f6f8fa; border-left: 4px solid #0969da; padding: 0.5em 0.8em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.summary-line { font-size: 1.15em; margin: 0.5em 0 1em; }
.why { color: #6e2b2b; font-size: 0.9em; margin-top: 0.3em; }
ul.checks { list-style: none; padding-left: 0.5em; margin-top: 0; } li.failed { color: #cf222e; font-weight: bold; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def format_number(x: Any) -> str:
    """A measured value for the report; anything that is not a real number (a hand-edited results.json may hold
    None, a list or a dict) is shown as it is rather than losing the page."""
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if not isinstance(x, float):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3e}"
    return f"{x:.4g}"


def why(rec: dict[str, Any]) -> str:
    """Why a claim is refuted, not judged or an error, in a line: what the engine recorded (the claim's notes or
    its failed checks, not a figure that failed to draw; an error's exception), or for a results.json written
    before it did, the same from the record; "" for a confirmed claim."""
    if rec.get("verdict") not in ("refuted", "not judged", "error"):
        return ""
    recorded = rec.get("why")
    if isinstance(recorded, str) and recorded:
        return recorded
    return error_line(rec.get("error", "")) if rec.get("verdict") == "error" else why_line(rec)


def _why(rec: dict[str, Any]) -> str:
    """Under a refuted or not judged claim's title in the summary: :func:`why`."""
    line = why(rec)
    return f'<div class="why">{_e(line)}</div>' if line else ""


def _checks(rec: dict[str, Any]) -> str:
    """Each criterion of the verdict with a mark: ✓ held, ✗ failed."""
    checks = rec.get("checks")
    if not isinstance(checks, dict) or not checks:
        return ""
    items = "".join(f'<li class="{"held" if ok else "failed"}">{"✓" if ok else "✗"} {_e(k)}</li>'
                    for k, ok in checks.items())
    return f'<p><b>Criteria.</b></p><ul class="checks">{items}</ul>'



def _verdict(v: str) -> str:
    return f'<span class="verdict {_e(v.replace(" ", "-"))}">{_e(v)}</span>'


def key_numbers(rec: dict[str, Any]) -> list[str]:
    """``name = value`` for a record's key numbers (its first three when it names none)."""
    ev = rec.get("evidence") or {}
    keys = rec.get("key") or list(ev)[:3]
    return [f"{k} = {format_number(ev[k])}" for k in keys if k in ev]


def result_line(rec: dict[str, Any]) -> str:
    """What a summary table shows for a record: for an error, the error's last line; else the claim's one-line
    summary (what it measured, against the bound that decides); for a record without one, its key numbers."""
    if rec["verdict"] == "error":
        lines = str(rec.get("error") or "").strip().splitlines()
        return lines[-1][:200] if lines else "error"
    return rec.get("summary") or "; ".join(key_numbers(rec))


def _result_cell(rec: dict[str, Any]) -> str:
    if rec["verdict"] == "error" or rec.get("summary"):
        return f"<td>{_e(result_line(rec))}</td>"
    return f'<td class="num">{"<br>".join(map(_e, key_numbers(rec)))}</td>'


def _summary(records: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><a href="#{_e(r["kind"])}-{_e(r["id"])}">{_e(r["id"])}</a></td><td>{_e(r["title"])}{_why(r)}</td>'
        f'<td>{_verdict(r["verdict"])}</td>{_result_cell(r)}<td>{_seconds(r)}</td></tr>'
        for r in records)
    return ("<table><tr><th>ID</th><th>title</th><th>verdict</th><th>measured vs criterion</th>"
            f"<th>seconds</th></tr>{rows}</table>")


def _seconds(rec: dict[str, Any]) -> str:
    return "?" if rec["seconds"] is None else f"{rec['seconds']:.2f}"


def _normalised(rec: Any) -> dict[str, Any]:
    """A record with the fields the page reads, of the types the engine writes: a hand-edited or foreign
    results.json (a list of figures set to null, seconds as a string, an id that is a list) renders as it reads
    instead of losing the whole page."""
    rec = dict(rec) if isinstance(rec, dict) else {"title": repr(rec)}
    for key, default in (("id", "?"), ("title", ""), ("kind", "claim"), ("verdict", "error")):
        rec[key] = str(rec.get(key, default))
    for key in ("statement", "summary", "method", "notes", "error"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            rec[key] = str(rec[key])
    rec["evidence"] = rec["evidence"] if isinstance(rec.get("evidence"), dict) else {}
    rec["key"] = [str(k) for k in rec["key"]] if isinstance(rec.get("key"), list) else None
    checks = rec.get("checks")
    rec["checks"] = {str(k): v for k, v in checks.items() if isinstance(v, bool)} if isinstance(checks, dict) else {}
    rec["figures"] = [str(f) for f in rec["figures"]] if isinstance(rec.get("figures"), list) else []
    seconds = rec.get("seconds")
    rec["seconds"] = float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None
    return rec


def _figure(name: str, present: set[str] | None) -> str:
    """The figure's <img>, linked to its file; a figure missing beside the report (``present`` given and without
    it) is said to be missing, instead of a broken image."""
    if present is not None and name not in present:
        return f'<p class="missing"><b>Figure {_e(name)} is missing</b> (not found beside the report).</p>'
    # quoted: a '#', '?' or '%' in a file name would make the browser read another URL than the file's
    # surrogateescape: a name that is not UTF-8 (its bytes kept as lone surrogates) becomes %XX of those bytes
    # a link to the file: a figure wider than the page is shown shrunk, and opens at its full size
    url = _e(quote(name, errors="surrogateescape"))
    return f'<p><a href="{url}" title="open at full size"><img src="{url}" alt="figure {_e(name)}"></a></p>'


def _section(rec: dict[str, Any], present: set[str] | None = None) -> str:
    ev = rec["evidence"]
    numbers = "".join(f'<tr><td>{_e(k)}</td><td class="num">{_e(format_number(v))}</td></tr>'
                      for k, v in ev.items())
    parts = [f'<div class="claim" id="{_e(rec["kind"])}-{_e(rec["id"])}">',
             f'<h3>{_e(rec["id"])} — {_e(rec["title"])} {_verdict(rec["verdict"])}</h3>']
    if rec.get("statement"):
        parts.append(f'<p class="statement"><b>Claim.</b> {_e(rec["statement"])}</p>')
    if rec.get("summary"):
        parts.append(f'<p><b>Measured.</b> {_e(rec["summary"])}</p>')
    if checks := _checks(rec):
        parts.append(checks)
    if rec.get("method"):
        parts.append(f'<p><b>Method.</b> {_e(rec["method"])}</p>')
    if rec.get("notes"):
        parts.append(f'<p><b>Notes.</b> {_e(rec["notes"])}</p>')
    if numbers:
        parts.append(f"<table><tr><th>measured</th><th>value</th></tr>{numbers}</table>")
    parts += [_figure(f, present) for f in rec["figures"]]
    if rec.get("error"):
        parts.append(f'<p><b>Error.</b></p><pre>{_e(rec["error"])}</pre>')
    parts.append(f'<p><small>{_seconds(rec)} s</small></p></div>')
    return "\n".join(parts)


def _environment(env: dict[str, Any]) -> str:
    flat = {k: v for k, v in env.items() if k != "versions"}
    versions = env.get("versions")
    flat.update({f"version of {k}": v for k, v in versions.items()} if isinstance(versions, dict) else {})
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in flat.items())
    return f"<table>{rows}</table>"


def _total_seconds(payload: dict[str, Any], records: list[dict[str, Any]]) -> float:
    """The run's total; an interrupted run has none yet, so the sum of its finished sections."""
    total = payload.get("total_seconds")
    if isinstance(total, (int, float)):
        return float(total)
    return float(sum(r["seconds"] or 0.0 for r in records))


def _counts(records: list[dict[str, Any]], what: str) -> str:
    """"3/4 claims confirmed, 1 refuted, 0 errors" (", 1 not judged" where there is one), as the terminal counts
    them."""
    n = {v: sum(r["verdict"] == v for r in records) for v in VERDICTS}
    unjudged = f', {n["not judged"]} not judged' if n["not judged"] else ""
    return (f'<b>{n["confirmed"]}/{len(records)}</b> {what} confirmed, {n["refuted"]} refuted, {n["error"]} errors'
            f'{unjudged}')


def render_report(payload: dict[str, Any], present: set[str] | None = None) -> str:
    """The page; ``present``: the figure files beside it (None: not checked, every figure gets its <img>)."""
    claims, extras = ([_normalised(r) for r in payload.get(k) or []] for k in ("claims", "extras"))
    status = "" if payload.get("complete", True) else " (run interrupted: partial results)"
    # the extras count as the terminal's table and the exit status count them: a refuted extra is no footnote
    counted = _counts(claims, "claims") + ("; " + _counts(extras, "extra sections") if extras else "")
    body = [f"<h1>theorylab — verification report{_e(status)}</h1>",
            f'<p class="summary-line">{counted}; {_total_seconds(payload, claims + extras):.1f} s in all.</p>',
            "<h2>Summary</h2>", _summary(claims + extras)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in claims:
        info = BY_ID.get(r["id"])
        groups.setdefault(info.question if info else "other", []).append(r)
    for q, recs in groups.items():
        title = f"{q} — {QUESTIONS[q]}" if q in QUESTIONS else "Other claims"
        body.append(f"<h2>{_e(title)}</h2>")
        body += [_section(r, present) for r in recs]
    if extras:
        body.append("<h2>Extra sections</h2>")
        body += [_section(r, present) for r in extras]
    env = payload.get("environment")
    body += ["<h2>Environment</h2>", _environment(env if isinstance(env, dict) else {})]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>theorylab report</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL byte, in a hand-edited results.json
        return False


def write_report(out_dir: Path, payload: dict[str, Any] | None = None) -> Path:
    """Render ``payload`` (or ``out_dir/results.json``) to ``out_dir/report.html``."""
    if payload is None:
        payload = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))  # as written, whatever the locale
    path = out_dir / REPORT_FILE
    names: set[str] = set()
    for key in ("claims", "extras"):
        for rec in payload.get(key) or []:
            figures = rec.get("figures") if isinstance(rec, dict) else None
            if isinstance(figures, list):
                names.update(str(f) for f in figures)
    present = {name for name in names if _is_file(out_dir / name)}
    # backslashreplace: see write_json_atomic
    path.write_text(render_report(payload, present), encoding="utf-8", errors="backslashreplace")
    return path
