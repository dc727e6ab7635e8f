"""The benchmark sections of the report: results tables, figures, failures, timings, data and configuration.

Every figure draws a detector in the one colour :func:`report_colours` gives it for the whole report
(also shown as a square before its name in the results tables); averages that would repeat a single
set (or another average) are left out of the tables and the heat map.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.evaluation.tables import RankedTable, shown_sets
from oodscope.reports import plots
from oodscope.reports.markup import escape, figure, styled_table

MAX_ROC_CURVES = 8  # curves per ROC plot: the best detectors by AUROC on that set


def _results_table(sets: Sequence[str], rows: Sequence[Sequence[Any]], best: Mapping[tuple[int, int], bool],
                   colours: Mapping[str, str] | None = None) -> str:
    """Detector rows; per set two columns (AUROC, FPR95) under a spanning set header. ``colours``: the
    figures' detector colours, shown as a square before each name."""
    head1 = ['<th class="l" rowspan="2">detector</th>']
    head1 += [f'<th colspan="2">{escape(s.replace("-average", " avg"))}</th>' for s in sets]
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
            swatch = (f'<span class="sw" style="background:{escape(colours[cell])}"></span>'
                      if c == 0 and colours and cell in colours else "")
            out.append(f'<td class="{" ".join(classes)}">{swatch}{escape(cell)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)




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


def _load_scores(results_dir: Path, rel: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(results_dir / rel)))


def summary_section(payload: Mapping[str, Any], tables: Sequence[RankedTable],
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
        sets = shown_sets(mine)
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
        out.append(f"<h3 id='{_anchor('results', backbone)}'>{escape(backbone)}</h3>")
        out.append(_results_table(sets, table_rows, best, colours))
        for other, dets in table.repeated.items():
            out.append(f"<p class='meta'>Same metrics on every set as on {escape(other)} (not repeated): "
                       f"{escape(', '.join(dets))}.</p>")
        sources = sorted({r["id_accuracy_source"] for r in mine if r.get("id_accuracy_source")})
        if sources:
            out.append(f"<p class='meta'>ID accuracy from: {escape('; '.join(sources))}.</p>")
        notes = sorted({f"{r['detector']}: {r['note']}" for r in mine if r.get("note")})
        if notes:
            out.append("<p class='meta'>Notes: " + "<br>".join(escape(n) for n in notes) + "</p>")
    return out


def figures_section(results_dir: Path, payload: Mapping[str, Any], tables: Sequence[RankedTable],
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
        out.append(f"<h3 id='{_anchor('figures', backbone)}'>{escape(backbone)}</h3>")
        # Overview heat map of AUROC.
        columns = ood_sets + [s for s in shown_sets(mine) if s not in ood_sets]
        grid = np.full((len(detectors), len(columns)), np.nan)
        for r in mine:
            if r["set"] in columns and r["detector"] in detectors:
                grid[detectors.index(r["detector"]), columns.index(r["set"])] = r["auroc"]
        # Colours span 50-100 % (chance to perfect); worse than chance gets the darkest colour.
        out.append('<div class="grid">' + figure(
            plots.heatmap_png(grid, detectors, columns, f"AUROC (%) — {backbone}", vmin=0.5, vmax=1.0,
                              colours=colours),
            "AUROC per detector and OOD set (%); below 50 % shown as 50 %") + "</div>")
        # ROC curves per OOD set (best detectors on that set).
        figs = []
        for s in ood_sets:
            ranked = sorted((r for r in mine if r["set"] == s and s in scores.get(r["detector"], {})),
                            key=lambda r: -r["auroc"])[:MAX_ROC_CURVES]
            curves = {r["detector"]: (scores[r["detector"]].get(f"id@{s}", scores[r["detector"]]["id"]),
                                      scores[r["detector"]][s]) for r in ranked}  # id@s: per-pair ID stream
            if curves:
                figs.append(figure(plots.roc_png(curves, f"ROC: ID vs {s}", colours=colours),
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
            figs.append(figure(plots.histogram_png(sc["id"], {s: sc[s] for s in ood_sets if s in sc}, det,
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


def failures_section(payload: Mapping[str, Any]) -> list[str]:
    failures = payload.get("failures", [])
    if not failures:
        return []
    return ["<h2 id='failures'>Not run / failed</h2>",
            "<p>Detectors that could not run on a backbone, with the reason; the rest of the run was not affected.</p>",
            styled_table(["backbone", "detector", "stage", "reason"],
                         [[f["backbone"], f["detector"], f["stage"], f["reason"]] for f in failures], left=4,
                         row_class="fail", wrap_last=True)]


def timings_section(payload: Mapping[str, Any]) -> list[str]:
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
           styled_table(["backbone", "stage", "seconds"], [[b, s, f"{v:.2f}"] for (b, s), v in by_stage.items()],
                        left=2)]
    if extract:
        out += ["<details><summary>Extraction per set</summary>",
                styled_table(["backbone", "set", "seconds"], extract, left=2), "</details>"]
    return out


def datasets_section(payload: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, d in payload.get("datasets", {}).items():
        rows.append([name, d.get("role", ""), d.get("kind") or "", d.get("data", ""), d.get("images", ""),
                     d.get("n_failed", 0)])
    return ["<h2 id='data'>Data</h2>",
            styled_table(["set", "role", "kind", "source", "images", "unreadable"], rows, left=4)]


def config_section(payload: Mapping[str, Any]) -> list[str]:
    env = payload.get("environment", {})
    return ["<h2 id='config'>Configuration and environment</h2>",
            styled_table(["key", "value"], [[k, v] for k, v in env.items()], left=2),
            "<details open><summary>Configuration</summary><pre>"
            + escape(json.dumps(payload.get("config", {}), indent=2, default=str)) + "</pre></details>"]
