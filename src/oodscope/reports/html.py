"""Self-contained HTML reports of benchmark results (and robustness audits).

The file needs nothing else: CSS is inline, figures are PNG ``data:`` URIs, there is no JavaScript
and no external resource, so it opens offline and can be mailed or archived as one file.

``render_report(results_dir, output)`` reads what :func:`oodscope.evaluation.bench.run_benchmark`
wrote (``results.json`` + ``scores/``) and adds, for every audit directory given (or found inside
the results directory), the audit's tables (``audit.json`` / ``*.csv``) and plots (``*.png``). A
directory with only an audit is reported too. Figures need matplotlib (extra ``plots``); without it
the report has the tables and says so.

Every figure draws a detector in the one colour :func:`report_colours` gives it for the whole report
(also shown as a square before its name in the results tables); averages that would repeat a single
set (or another average) are left out of the tables and the heat map.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.evaluation.tables import RankedTable, ranked_tables
from oodscope.reports import plots

__all__ = ["render_report", "write_audit_report"]

MAX_ROC_CURVES = 8  # curves per ROC plot: the best detectors by AUROC on that set
MAX_CSV_ROWS = 300

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2125;
background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;box-shadow:0 0 6px rgba(0,0,0,.06)}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{font-size:1.3em;border-bottom:2px solid #e3e6ea;padding-bottom:4px;
margin-top:2em}h3{font-size:1.08em;margin:1.4em 0 .4em}
.meta{color:#5b6570;font-size:.92em}
table{border-collapse:collapse;font-size:.84em;margin:.4em 0 1em}
th,td{border:1px solid #dfe3e8;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fbfbfc}td.wrap{white-space:normal;min-width:320px}
td.best{font-weight:700;background:#e6f4ea!important}
table.results td,table.results th{padding:3px 5px}td.grp{border-left:2px solid #c9ced4}
.scroll{overflow-x:auto;max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #e3e6ea;padding:6px;background:#fff}
figcaption{font-size:.8em;color:#5b6570;text-align:center}
img{display:block;max-width:100%;height:auto}
pre{background:#f6f8fa;border:1px solid #e3e6ea;padding:10px;overflow-x:auto;font-size:.78em;max-height:420px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:.9em}
.fail td{color:#8a1c1c}
nav a{margin-right:14px;font-size:.9em}
details{margin:.5em 0}summary{cursor:pointer;color:#0b5cad}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:-.05em;border:1px solid #555}
"""


# ============================================================================ small HTML helpers
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _img(png: bytes, caption: str, width: int | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure{style}><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1,
           best: Mapping[tuple[int, int], bool] | None = None, row_class: str = "", wrap_last: bool = False) -> str:
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        out.append(f'<tr class="{row_class}">')
        for c, cell in enumerate(row):
            cls = " ".join(x for x in ("l" if c < left else "", "best" if best and best.get((r, c)) else "",
                                       "wrap" if wrap_last and c == len(row) - 1 else "") if x)
            out.append(f'<td class="{cls}">{_e(cell)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain table in the report's style, cells escaped (for ``render_report(sections=...)``)."""
    return _table(header, rows)


def _results_table(sets: Sequence[str], rows: Sequence[Sequence[Any]], best: Mapping[tuple[int, int], bool],
                   colours: Mapping[str, str] | None = None) -> str:
    """Detector rows; per set two columns (AUROC, FPR95) under a spanning set header. ``colours``: the
    figures' detector colours, shown as a square before each name."""
    head1 = ['<th class="l" rowspan="2">detector</th>']
    head1 += [f'<th colspan="2">{_e(s.replace("-average", " avg"))}</th>' for s in sets]
    head1 += ['<th rowspan="2">ID acc.</th><th rowspan="2">fit s</th><th rowspan="2">score s</th>']
    head2 = ["<th>AUROC</th><th>FPR95</th>" for _ in sets]
    out = ['<div class="scroll"><table class="results"><thead><tr>', "".join(head1), "</tr><tr>", "".join(head2),
           "</tr></thead><tbody>"]
    for r, row in enumerate(rows):
        out.append("<tr>")
        for c, cell in enumerate(row):
            classes = ["l"] if c == 0 else []
            if best.get((r, c)):
                classes.append("best")
            if c > 0 and c <= 2 * len(sets) and c % 2 == 1:
                classes.append("grp")
            swatch = (f'<span class="sw" style="background:{_e(colours[cell])}"></span>'
                      if c == 0 and colours and cell in colours else "")
            out.append(f'<td class="{" ".join(classes)}">{swatch}{_e(cell)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


_AVERAGES = ("near-average", "far-average", "all-average")


def _shown_sets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One backbone's columns: every OOD set, then the averages that say something new.

    An average over a single set is that set again, and a near (far) average over the very sets the
    all-average covers repeats the all-average: both are left out (``evaluation.bench`` writes near /
    far averages for any non-empty group, the all-average only for two sets or more).
    """
    sets = list(dict.fromkeys(r["set"] for r in rows if r.get("kind") != "average"))
    members = {"near-average": {r["set"] for r in rows if r.get("kind") == "near"},
               "far-average": {r["set"] for r in rows if r.get("kind") == "far"},
               "all-average": set(sets)}
    present = list(dict.fromkeys(r["set"] for r in rows if r.get("kind") == "average"))
    shown = []
    for s in present:
        group = members.get(s)
        if group is not None and len(group) < 2:
            continue
        if s != "all-average" and group == members["all-average"] and "all-average" in present:
            continue
        shown.append(s)
    return sets + sorted(shown, key=lambda s: _AVERAGES.index(s) if s in _AVERAGES else len(_AVERAGES))


def report_colours(payload: Mapping[str, Any], tables: Sequence[RankedTable]) -> dict[str, str]:
    """The report's one ``{detector: colour}``: ranking order of the first backbone, then the detectors
    new on each later one (folded repeats included, so a name never changes colour)."""
    names: list[str] = []
    for t in tables:
        names += t.detectors + [d for dets in t.repeated.values() for d in dets]
    for files in payload.get("scores", {}).values():
        names += list(files)
    return plots.detector_colours(names)


def _pct(x: Any) -> str:
    return "" if x is None or x == "" else f"{100 * float(x):.1f}"


def _anchor(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in p) for p in parts)


# ============================================================================ benchmark sections
def _load_scores(results_dir: Path, rel: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(results_dir / rel)))


def _summary_section(payload: Mapping[str, Any], tables: Sequence[RankedTable],
                     colours: Mapping[str, str] | None = None) -> list[str]:
    rows = payload["results"]
    out = ["<h2 id='results'>Results</h2>",
           "<p>AUROC and FPR@95 in % for each OOD set, then averages over the near-OOD, far-OOD and all "
           "sets (an average is shown only where it covers two sets or more and differs from the others). "
           "Best AUROC (highest) and FPR@95 (lowest) per column in bold. Scores are higher = more OOD; "
           "FPR@95 is the share of OOD images accepted as ID at the threshold that accepts 95 % of the ID "
           "images. Detectors are sorted by AUROC on the all-OOD average, best first.</p>"]
    for table in tables:
        backbone = table.backbone
        mine = [r for r in rows if r["backbone"] == backbone]
        sets = _shown_sets(mine)
        detectors = table.detectors
        table_rows, values = [], []
        for det in detectors:
            cells = {r["set"]: r for r in mine if r["detector"] == det}
            first = next(iter(cells.values()))
            row: list[Any] = [det]
            vals: list[float | None] = []
            for s in sets:
                r = cells.get(s)
                row += [_pct(r["auroc"]) if r else "", _pct(r["fpr95"]) if r else ""]
                vals += [r["auroc"] if r else None, r["fpr95"] if r else None]
            row += [_pct(first.get("id_accuracy")), f"{first['fit_s']:.2f}", f"{first['score_s']:.2f}"]
            table_rows.append(row)
            values.append(vals)
        best = {}
        for c in range(len(sets) * 2):
            column = [(v[c], i) for i, v in enumerate(values) if v[c] is not None]
            if not column:
                continue
            target = max(column)[0] if c % 2 == 0 else min(column)[0]
            for v, i in column:
                if v == target:
                    best[(i, c + 1)] = True
        out.append(f"<h3 id='{_anchor('results', backbone)}'>{_e(backbone)}</h3>")
        out.append(_results_table(sets, table_rows, best, colours))
        for other, dets in table.repeated.items():
            out.append(f"<p class='meta'>Same metrics on every set as on {_e(other)} (not repeated): "
                       f"{_e(', '.join(dets))}.</p>")
        sources = sorted({r["id_accuracy_source"] for r in mine if r.get("id_accuracy_source")})
        if sources:
            out.append(f"<p class='meta'>ID accuracy from: {_e('; '.join(sources))}.</p>")
        notes = sorted({f"{r['detector']}: {r['note']}" for r in mine if r.get("note")})
        if notes:
            out.append("<p class='meta'>Notes: " + "<br>".join(_e(n) for n in notes) + "</p>")
    return out


def _figures_section(results_dir: Path, payload: Mapping[str, Any], tables: Sequence[RankedTable],
                     max_histograms: int | None, colours: Mapping[str, str] | None = None) -> list[str]:
    rows = payload["results"]
    ood_sets = [k for k, v in payload["datasets"].items() if v["role"] == "ood"]
    out = ["<h2 id='figures'>Figures</h2>"]
    if not plots.available():
        return out + ["<p class='note'>Figures need matplotlib (pip install 'oodscope[plots]'); "
                      "the tables above are complete without them.</p>"]
    colours = dict(colours) if colours is not None else report_colours(payload, tables)
    styles = plots.set_styles(ood_sets)
    out.append("<p>Each detector has one colour in every figure (the square before its name in the tables); "
               "in the histograms the OOD sets differ by line style.</p>")
    best_first = {t.backbone: t.detectors for t in tables}
    for backbone, files in payload.get("scores", {}).items():
        mine = [r for r in rows if r["backbone"] == backbone]
        # Best first, as in the tables; rows repeated from another backbone get no figures.
        detectors = [d for d in best_first.get(backbone, list(files)) if d in files]
        if not detectors:
            continue
        scores = {det: _load_scores(results_dir, files[det]) for det in detectors}
        out.append(f"<h3 id='{_anchor('figures', backbone)}'>{_e(backbone)}</h3>")
        # Overview heat map of AUROC.
        columns = ood_sets + [s for s in _shown_sets(mine) if s not in ood_sets]
        grid = np.full((len(detectors), len(columns)), np.nan)
        for r in mine:
            if r["set"] in columns and r["detector"] in detectors:
                grid[detectors.index(r["detector"]), columns.index(r["set"])] = r["auroc"]
        # Colours span 50-100 % (chance to perfect); worse than chance gets the darkest colour.
        out.append('<div class="grid">' + _img(
            plots.heatmap_png(grid, detectors, columns, f"AUROC (%) — {backbone}", vmin=0.5, vmax=1.0,
                              colours=colours),
            "AUROC per detector and OOD set (%); below 50 % shown as 50 %") + "</div>")
        # ROC curves per OOD set (best detectors on that set).
        figs = []
        for s in ood_sets:
            ranked = sorted((r for r in mine if r["set"] == s and s in scores.get(r["detector"], {})),
                            key=lambda r: -r["auroc"])[:MAX_ROC_CURVES]
            curves = {r["detector"]: (scores[r["detector"]]["id"], scores[r["detector"]][s]) for r in ranked}
            if curves:
                figs.append(_img(plots.roc_png(curves, f"ROC: ID vs {s}", colours=colours),
                                 f"{backbone}: ROC curves, ID vs {s} (best {len(curves)} detectors by AUROC)", 470))
        if figs:
            out.append("<p>ROC curves (OOD = positive class).</p>")
            out.append('<div class="grid">' + "".join(figs) + "</div>")
        # Score histograms per detector.
        order = sorted(detectors, key=lambda d: -_mean_auroc(mine, d))
        if max_histograms is not None:
            order = order[:max_histograms]
        figs = []
        for det in order:
            sc = scores[det]
            figs.append(_img(plots.histogram_png(sc["id"], {s: sc[s] for s in ood_sets if s in sc}, det,
                                                 colour=colours.get(det), styles=styles, detector=det),
                             f"{backbone} / {det}: score distributions", 470))
        if figs:
            out.append("<p>Score distributions, ID (grey) vs each OOD set (the detector's colour, one line style "
                       "per set); detectors by mean AUROC.</p>")
            out.append('<div class="grid">' + "".join(figs) + "</div>")
    return out


def _mean_auroc(rows: Sequence[Mapping[str, Any]], detector: str) -> float:
    vals = [r["auroc"] for r in rows if r["detector"] == detector and r["kind"] != "average"]
    return float(np.mean(vals)) if vals else 0.0


def _failures_section(payload: Mapping[str, Any]) -> list[str]:
    failures = payload.get("failures", [])
    if not failures:
        return []
    return ["<h2 id='failures'>Not run / failed</h2>",
            "<p>Detectors that could not run on a backbone, with the reason; the rest of the run was not affected.</p>",
            _table(["backbone", "detector", "stage", "reason"],
                   [[f["backbone"], f["detector"], f["stage"], f["reason"]] for f in failures], left=4,
                   row_class="fail", wrap_last=True)]


def _timings_section(payload: Mapping[str, Any]) -> list[str]:
    timings = payload.get("timings", [])
    if not timings:
        return []
    by_stage: dict[tuple[str, str], float] = {}
    for t in timings:
        by_stage[(t["backbone"], t["stage"])] = by_stage.get((t["backbone"], t["stage"]), 0.0) + t["seconds"]
    extract = [[t["backbone"], t["set"], f"{t['seconds']:.2f}"] for t in timings if t["stage"] == "extract"]
    out = ["<h2 id='timings'>Time</h2>",
           "<p>Seconds per stage. <em>extract</em>: reading, decoding and running the network (or reading the "
           "feature cache; 0 when the features were shared with another backbone); <em>derive</em>: building a "
           "derived backbone's features (ConSE) from its classifier's; <em>fit</em> / <em>score</em>: summed over "
           "detectors.</p>",
           _table(["backbone", "stage", "seconds"], [[b, s, f"{v:.2f}"] for (b, s), v in by_stage.items()], left=2)]
    if extract:
        out += ["<details><summary>Extraction per set</summary>",
                _table(["backbone", "set", "seconds"], extract, left=2), "</details>"]
    return out


def _datasets_section(payload: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, d in payload.get("datasets", {}).items():
        rows.append([name, d.get("role", ""), d.get("kind") or "", d.get("data", ""), d.get("images", ""),
                     d.get("n_failed", 0)])
    return ["<h2 id='data'>Data</h2>",
            _table(["set", "role", "kind", "source", "images", "unreadable"], rows, left=4)]


def _config_section(payload: Mapping[str, Any]) -> list[str]:
    env = payload.get("environment", {})
    return ["<h2 id='config'>Configuration and environment</h2>",
            _table(["key", "value"], [[k, v] for k, v in env.items()], left=2),
            "<details open><summary>Configuration</summary><pre>"
            + _e(json.dumps(payload.get("config", {}), indent=2, default=str)) + "</pre></details>"]


# ============================================================================ audits
def _audit_section(directory: Path, index: int) -> list[str]:
    anchor = f"audit-{index}"
    out = [f"<h2 id='{anchor}'>Audit: {_e(directory.name)}</h2>"]
    doc_path = directory / "audit.json"
    if doc_path.is_file():
        try:
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
        except ValueError as err:
            out.append(f"<p class='note'>audit.json could not be read: {_e(err)}</p>")
            doc = {}
        for kind, audit in (doc.get("audits") or {}).items():
            out.append(f"<h3>{_e(kind.replace('_', ' '))}</h3>")
            facts = {k: v for k, v in audit.items() if isinstance(v, str | int | float | bool) or v is None}
            nested = {k: v for k, v in audit.items() if k in ("n_ood", "method_params", "classes", "corruptions",
                                                             "severities")}
            facts.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in nested.items()})
            if facts:
                out.append(_table(["key", "value"], [[k, _shorten(f"{v:.4g}" if isinstance(v, float) else v)]
                                                     for k, v in facts.items()], left=2))
    pngs = sorted(directory.glob("*.png"))
    if pngs:
        # Audit figures keep their own size (they are often wide), shrunk to the page width.
        out += [_img(p.read_bytes(), p.name) for p in pngs if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    for path in sorted(directory.glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
        if not table:
            continue
        header, body = table[0], table[1:]
        shown = [[_number(c) for c in row] for row in body[:MAX_CSV_ROWS]]
        more = f" (first {MAX_CSV_ROWS} of {len(body)} rows)" if len(body) > MAX_CSV_ROWS else ""
        is_summary = "summary" in path.stem
        out.append(f"<details{' open' if is_summary else ''}><summary>{_e(path.name)}{_e(more)}</summary>"
                   + _table(header, shown, left=min(2, len(header))) + "</details>")
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


def _find_audits(results_dir: Path) -> list[Path]:
    found = [results_dir] if (results_dir / "audit.json").is_file() else []
    found += sorted(p.parent for p in results_dir.glob("*/audit.json"))
    return found


# ============================================================================ entry points
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
    for found in _find_audits(results_dir):
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
        sub = (f"{_e(env.get('date', ''))} · oodscope {_e(env.get('oodscope', ''))} · "
               f"Python {_e(env.get('python', ''))} · torch {_e(env.get('torch', ''))} · "
               f"{_e(env.get('cpu_count', ''))} CPU(s)")
        body += [f"<h1>{_e(heading)}</h1>", f"<p class='meta'>{sub}</p>"]
        ood_sets = [k for k, v in payload["datasets"].items() if v["role"] == "ood"]
        tables = ranked_tables(payload["results"], ood_sets)
        colours = report_colours(payload, tables) if plots.available() else None  # one per report
        body += _summary_section(payload, tables, colours)
        nav.append(("results", "Results"))
        for i, (heading, fragment) in enumerate(sections):
            body += [f"<h2 id='extra-{i}'>{_e(heading)}</h2>", fragment]
            nav.append((f"extra-{i}", heading))
        body += _figures_section(results_dir, payload, tables, max_histograms, colours)
        nav.append(("figures", "Figures"))
        failures = _failures_section(payload)
        if failures:
            nav.append(("failures", "Not run"))
        body += failures
        body += _timings_section(payload)
        nav.append(("timings", "Time"))
        body += _datasets_section(payload)
        nav.append(("data", "Data"))
        body += _config_section(payload)
        nav.append(("config", "Configuration"))
    else:
        body += [f"<h1>{_e(title or 'oodscope audit report')}</h1>"]
    for i, a in enumerate(audits):
        body += _audit_section(a, i)
        nav.append((f"audit-{i}", f"Audit {a.name}"))
    links = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in nav)
    document = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{_e(title or 'oodscope report')}</title><style>{_CSS}</style></head><body><main>"
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
