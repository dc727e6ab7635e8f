"""Self-contained HTML reports of benchmark results (and robustness audits).

The file needs nothing else: CSS is inline, figures are PNG ``data:`` URIs, there is no JavaScript
and no external resource, so it opens offline and can be mailed or archived as one file.

``render_report(results_dir, output)`` reads what :func:`oodscope.evaluation.bench.run_benchmark`
wrote (``results.json`` + ``scores/``) and adds, for every audit directory given (or found inside
the results directory), the audit's tables (``audit.json`` / ``*.csv``) and plots (``*.png``). A
directory with only an audit is reported too. Figures need matplotlib (extra ``plots``); without it
the report has the tables and says so. A results directory of the bench's anomaly mode gets the
anomaly section instead of the OOD results (:mod:`oodscope.reports.anomaly`: per-category tables and
the gallery of maps and masks).

The sections are built in :mod:`oodscope.reports.sections` (benchmark results) and
:mod:`oodscope.reports.audits`; the HTML building blocks are in :mod:`oodscope.reports.markup`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from oodscope.evaluation.tables import ranked_tables
from oodscope.reports import plots
from oodscope.reports.anomaly import anomaly_section, is_anomaly
from oodscope.reports.audits import audit_section, find_audits
from oodscope.reports.markup import CSS, escape
from oodscope.reports.sections import (
    config_section,
    datasets_section,
    failures_section,
    figures_section,
    report_colours,
    summary_section,
    timings_section,
)

__all__ = ["render_report", "write_audit_report"]


def render_report(
    results_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    audit_dirs: Sequence[str | os.PathLike] = (),
    title: str | None = None,
    max_histograms: int | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the HTML report of ``results_dir`` to ``output`` (default ``results_dir/report.html``).

    ``sections``: extra ``(heading, html)`` sections placed after the results table; the HTML is the
    caller's and is inserted as it is (escape what you put in it)."""
    results_dir = Path(results_dir)
    output = Path(output) if output is not None else results_dir / "report.html"
    results_path = results_dir / "results.json"
    payload = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else None
    audits = [Path(a) for a in audit_dirs]
    for found in find_audits(results_dir):
        if all(os.path.realpath(found) != os.path.realpath(a) for a in audits):
            audits.append(found)
    if payload is None and not audits:
        raise FileNotFoundError(f"{results_dir}: no results.json (oodscope bench) and no audit.json (oodscope audit)")
    for a in audits:
        if not a.is_dir():
            raise FileNotFoundError(f"audit directory {a} does not exist")

    body: list[str] = []
    nav: list[tuple[str, str]] = []
    if payload is not None:
        env = payload.get("environment", {})
        heading = title or "oodscope benchmark report"
        sub = (f"{escape(env.get('date', ''))} · oodscope {escape(env.get('oodscope', ''))} · "
               f"Python {escape(env.get('python', ''))} · torch {escape(env.get('torch', ''))} · "
               f"{escape(env.get('cpu_count', ''))} CPU(s)")
        body += [f"<h1>{escape(heading)}</h1>", f"<p class='meta'>{sub}</p>"]
    if payload is not None and is_anomaly(payload):  # the bench's anomaly mode: tables + gallery
        body += anomaly_section(results_dir, payload)
        nav.append(("anomaly", "Anomaly"))
        for i, (heading, fragment) in enumerate(sections):
            body += [f"<h2 id='extra-{i}'>{escape(heading)}</h2>", fragment]
            nav.append((f"extra-{i}", heading))
        body += failures_section(payload)
        if payload.get("failures"):
            nav.append(("failures", "Not run"))
        body += timings_section(payload) + datasets_section(payload) + config_section(payload)
        nav += [("timings", "Time"), ("data", "Data"), ("config", "Configuration")]
    elif payload is not None:
        ood_sets = [k for k, v in payload["datasets"].items() if v["role"] == "ood"]
        tables = ranked_tables(payload["results"], ood_sets)
        colours = report_colours(payload, tables) if plots.available() else None  # one per report
        body += summary_section(payload, tables, colours)
        nav.append(("results", "Results"))
        for i, (heading, fragment) in enumerate(sections):
            body += [f"<h2 id='extra-{i}'>{escape(heading)}</h2>", fragment]
            nav.append((f"extra-{i}", heading))
        body += figures_section(results_dir, payload, tables, max_histograms, colours)
        nav.append(("figures", "Figures"))
        failures = failures_section(payload)
        if failures:
            nav.append(("failures", "Not run"))
        body += failures
        body += timings_section(payload)
        nav.append(("timings", "Time"))
        body += datasets_section(payload)
        nav.append(("data", "Data"))
        body += config_section(payload)
        nav.append(("config", "Configuration"))
    else:
        body += [f"<h1>{escape(title or 'oodscope audit report')}</h1>"]
    for i, a in enumerate(audits):
        body += audit_section(a, i)
        nav.append((f"audit-{i}", f"Audit {a.name}"))
    links = "".join(f'<a href="#{k}">{escape(v)}</a>' for k, v in nav)
    document = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{escape(title or 'oodscope report')}</title><style>{CSS}</style></head><body><main>"
                f"<nav>{links}</nav>" + "\n".join(body) + "</main></body></html>\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, output)
    return output


def write_audit_report(audit_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Report of one audit directory (``oodscope audit`` writes it next to its results)."""
    audit_dir = Path(audit_dir)
    return render_report(audit_dir, output if output is not None else audit_dir / "report.html")
