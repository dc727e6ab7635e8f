"""The audit sections of the report: an audit directory's ``audit.json`` facts, PNG plots and CSV tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from oodscope.reports.markup import escape, figure, styled_table

MAX_CSV_ROWS = 300


def audit_section(directory: Path, index: int) -> list[str]:
    """The section of one audit directory (anchor ``audit-<index>``)."""
    anchor = f"audit-{index}"
    out = [f"<h2 id='{anchor}'>Audit: {escape(directory.name)}</h2>"]
    doc_path = directory / "audit.json"
    if doc_path.is_file():
        try:
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
        except ValueError as err:
            out.append(f"<p class='note'>audit.json could not be read: {escape(err)}</p>")
            doc = {}
        for kind, audit in (doc.get("audits") or {}).items():
            out.append(f"<h3>{escape(kind.replace('_', ' '))}</h3>")
            facts = {k: v for k, v in audit.items() if isinstance(v, str | int | float | bool) or v is None}
            nested = {k: v for k, v in audit.items() if k in ("n_ood", "method_params", "classes", "corruptions",
                                                             "severities")}
            facts.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in nested.items()})
            if facts:
                out.append(styled_table(["key", "value"],
                                        [[k, _shorten(f"{v:.4g}" if isinstance(v, float) else v)]
                                         for k, v in facts.items()], left=2))
    pngs = sorted(directory.glob("*.png"))
    if pngs:
        # Audit figures keep their own size (they are often wide), shrunk to the page width.
        out += [figure(p.read_bytes(), p.name) for p in pngs if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    for path in sorted(directory.glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
        if not table:
            continue
        header, body = table[0], table[1:]
        shown = [[_number(c) for c in row] for row in body[:MAX_CSV_ROWS]]
        more = f" (first {MAX_CSV_ROWS} of {len(body)} rows)" if len(body) > MAX_CSV_ROWS else ""
        is_summary = "summary" in path.stem
        out.append(f"<details{' open' if is_summary else ''}><summary>{escape(path.name)}{escape(more)}</summary>"
                   + styled_table(header, shown, left=min(2, len(header))) + "</details>")
    if len(out) == 1:
        out.append("<p class='note'>No audit.json, CSV or PNG found in this directory.</p>")
    return out


def _shorten(value: Any, width: int = 160) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    if cell.strip().lstrip("-").isdigit():
        return cell
    return f"{value:.4f}"


def find_audits(results_dir: Path) -> list[Path]:
    """``results_dir`` itself and its sub-folders, those that hold an ``audit.json``."""
    found = [results_dir] if (results_dir / "audit.json").is_file() else []
    found += sorted(p.parent for p in results_dir.glob("*/audit.json"))
    return found
