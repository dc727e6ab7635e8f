"""The benchmark's tables, free of torch so reports can render them: detectors ranked per backbone,
rows a derived backbone repeats folded away, and the Markdown summary (``results.md``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "detection_error")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


class RankedTable(NamedTuple):
    """One backbone's rows as shown in results.md and the report."""

    backbone: str
    ranking: str | None  # the set whose AUROC orders the detectors
    detectors: list[str]  # best first
    repeated: dict[str, list[str]]  # earlier backbone -> detectors with the same metrics there (not shown)


def ranked_tables(rows: Sequence[Mapping[str, Any]], sets: Sequence[str]) -> list[RankedTable]:
    """Per backbone, detectors by descending AUROC on ``all-average`` (else the first set; ties keep run
    order), leaving out those whose metrics on every set repeat the same detector on an earlier backbone.

    A derived backbone (ConSE) hands the classifier's own logits and features to most detectors, so
    their rows would repeat the classifier's word for word.
    """
    seen: dict[tuple, str] = {}
    tables = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        present = {r["set"] for r in mine}
        ranking = next((c for c in ("all-average", *sets) if c in present), None)
        order = list(dict.fromkeys(r["detector"] for r in mine))
        auroc = {r["detector"]: r["auroc"] for r in mine if r["set"] == ranking}
        shown, repeated = [], {}
        for det in sorted(order, key=lambda d: -auroc.get(d, float("-inf"))):
            key = (det, *((r["set"], *(r[m] for m in METRICS)) for r in mine
                          if r["detector"] == det and r["set"] in sets))
            if key in seen:
                repeated.setdefault(seen[key], []).append(det)
            else:
                seen[key] = backbone
                shown.append(det)
        tables.append(RankedTable(backbone, ranking, shown, repeated))
    return tables


_AVERAGES = ("near-average", "far-average", "all-average")


def shown_sets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One backbone's columns: every OOD set, then the averages that say something new.

    An average over a single set is that set again, and a near (far) average over the very sets the
    all-average covers repeats the all-average: both are left out (the runner writes near /
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


def markdown(payload: Mapping[str, Any]) -> str:
    """Markdown summary: one table per backbone (AUROC / FPR95 in %, per set and averaged)."""
    rows = payload["results"]
    env = payload["environment"]
    lines = ["# oodscope benchmark", "",
             f"{env['date']} · oodscope {env['oodscope']} · Python {env['python']} · torch {env['torch']} · "
             f"{env['cpu_count']} CPU(s)", "",
             "Cells: AUROC / FPR@95 in % (higher AUROC, lower FPR@95 is better). Scores: higher = more OOD.", ""]
    preset = (payload.get("config") or {}).get("preset")
    if preset:  # named hyper-parameters (oodscope.detectors.presets); explicit detector_params override them
        lines += [f"Hyper-parameter preset: `{preset}` (detector_params on top; a detector it does not list keeps "
                  "its defaults).", ""]
    sets = [k for k, v in payload["datasets"].items() if v["role"] == "ood"]
    lines += ["Data: " + "; ".join(f"`{k}` = {v['data']} ({v['images']} images"
                                   f"{', ' + v['kind'] if v.get('kind') else ''})"
                                   for k, v in payload["datasets"].items()), ""]
    for table in ranked_tables(rows, sets):
        backbone = table.backbone
        mine = [r for r in rows if r["backbone"] == backbone]
        columns = shown_sets(mine)
        lines += [f"## {backbone}", "", f"Sorted by AUROC on `{table.ranking}`, best first.", "",
                  "| detector | " + " | ".join(columns) + " | ID acc. | fit s | score s |",
                  "|---|" + "---|" * (len(columns) + 3)]
        for det in table.detectors:
            cells = {r["set"]: r for r in mine if r["detector"] == det}
            first = next(iter(cells.values()))
            acc = _pct(first["id_accuracy"])
            lines.append(f"| {det} | " + " | ".join(
                f"{_pct(cells[c]['auroc'])} / {_pct(cells[c]['fpr95'])}" if c in cells else "" for c in columns)
                + f" | {acc} | {first['fit_s']:.2f} | {first['score_s']:.2f} |")
        for other, dets in table.repeated.items():
            lines += ["", f"Same metrics on every set as on `{other}` (not repeated): "
                      + ", ".join(f"`{d}`" for d in dets) + "."]
        sources = sorted({r["id_accuracy_source"] for r in mine if r["id_accuracy_source"]})
        if sources:
            lines += ["", "ID accuracy from: " + "; ".join(sources) + "."]
        notes = sorted({f"`{r['detector']}`: {r['note']}" for r in mine if r["note"]})
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines.append("")
    if payload["failures"]:
        lines += ["## Not run / failed", "", "| backbone | detector | stage | reason |", "|---|---|---|---|"]
        lines += [f"| {f['backbone']} | {f['detector']} | {f['stage']} | {f['reason'].replace('|', '/')} |"
                  for f in payload["failures"]]
        lines.append("")
    stages: dict[tuple[str, str], float] = {}
    for t in payload["timings"]:
        stages[(t["backbone"], t["stage"])] = stages.get((t["backbone"], t["stage"]), 0.0) + t["seconds"]
    lines += ["## Time per stage (s)", "", "| backbone | stage | seconds |", "|---|---|---|"]
    lines += [f"| {b} | {s} | {v:.2f} |" for (b, s), v in stages.items()]
    return "\n".join(lines) + "\n"
