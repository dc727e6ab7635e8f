"""The anomaly section of the report: per-category tables (image AUROC, pixel AUROC, AUPRO) and a
gallery of the highest- and lowest-scoring test images with their maps and ground-truth masks.

Reads what the benchmark's anomaly mode wrote (:mod:`oodscope.evaluation.bench_anomaly`):
``results.json`` (``"mode": "anomaly"``: rows and the ``gallery`` list) and the gallery PNGs, which are
embedded as ``data:`` URIs so the report stays one self-contained file.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oodscope.evaluation.bench_anomaly import anomaly_tables
from oodscope.reports.markup import escape, styled_table


def is_anomaly(payload: Mapping[str, Any]) -> bool:
    """Whether ``results.json`` comes from the benchmark's anomaly mode."""
    return payload.get("mode") == "anomaly"


def anomaly_section(results_dir: str | Path, payload: Mapping[str, Any], *, anchor: str = "anomaly") -> list[str]:
    """HTML fragments: the tables, the notes, then the gallery (one block per backbone, detector, category)."""
    results_dir = Path(results_dir)
    rows = payload.get("results", [])
    out = [f"<h2 id='{anchor}'>Anomaly detection</h2>",
           "<p>Per category: each detector fitted on the good training images, scoring the test images (good and "
           "defective). Image AUROC (defective = positive), pixel AUROC over all test pixels and AUPRO (per-region "
           "overlap integrated to FPR 0.3, normalised), in %; <em>mean</em> = over the categories. Best per column "
           "in bold; empty cells are explained in the notes.</p>"]
    for backbone, label, header, table in anomaly_tables(rows):
        best = {}
        for c in range(1, len(header)):
            column = [(float(r[c]), i) for i, r in enumerate(table) if r[c] != ""]
            if column:
                top = max(column)[0]
                best.update({(i, c): True for v, i in column if v == top})
        out.append(f"<h3>{escape(backbone)}: {escape(label)}</h3>")
        out.append(styled_table(header, table, best=best))
    notes = sorted({f"{r['detector']} on {r['category']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        out.append("<p class='meta'>Notes: " + "<br>".join(escape(n) for n in notes) + "</p>")
    out += gallery_section(results_dir, payload.get("gallery", []))
    return out


def gallery_section(results_dir: Path, gallery: list[Mapping[str, Any]]) -> list[str]:
    """The gallery: per (backbone, detector, category), the highest then the lowest scores, each image
    shown alone, with its map over it (where the method has maps) and its mask (where the set has masks)."""
    if not gallery:
        return []
    out = ["<h3 id='anomaly-gallery'>Gallery: highest- and lowest-scoring test images</h3>",
           "<p>Each image with its anomaly map over it (jet, normalised per image: it shows where, not how much) "
           "and its ground-truth mask (white = defect). Highest scores first, then the lowest; the label is the "
           "truth (good / defect).</p>"]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for entry in gallery:
        groups.setdefault((entry["backbone"], entry["detector"], entry["category"]), []).append(entry)
    for (backbone, detector, category), entries in groups.items():
        out.append(f"<h4>{escape(backbone)} / {escape(detector)} / {escape(category)}</h4><div class='grid'>")
        for e in entries:
            images = "".join(_img(results_dir, e.get(k), f"{k}: {e['item']}") for k in ("image", "overlay", "mask"))
            caption = (f"{e['which']} #{e['rank']}: score {e['score']:.4g}, "
                       f"{'defect' if e['label'] == 1 else 'good'} — {Path(str(e['item'])).name}")
            out.append(f"<figure class='anomaly'>{images}<figcaption>{escape(caption)}</figcaption></figure>")
        out.append("</div>")
    return out


def _img(results_dir: Path, rel: str | None, alt: str) -> str:
    if not rel:
        return ""
    path = results_dir / rel
    if not path.is_file():
        return f"<span class='note'>{escape(rel)} missing</span>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}" style="width:128px">'
