"""Corruption robustness: detectors on ImageNet-C-style corrupted ID / OOD images, by severity."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import Features
from oodscope.detectors.fitting import fit_detector
from oodscope.evaluation.audit._common import (
    MEAN_KEY,
    AuditRecord,
    ExtractedData,
    as_data,
    check_ood_names,
    is_source,
    is_stateful,
    jsonable,
    merge_audit_json,
    pair_metrics,
    pyplot,
    write_csv,
)
from oodscope.evaluation.corruptions import CORRUPTION_NAMES, REFERENCE_SIZE, CorruptedSource

# -------------------------------------------------------------------------- corruption audit
DetectorSpec = Any  # "name" | ("name", {params}) | {"name": ..., **params} | an unfitted Detector


def _make_detector(spec: DetectorSpec, classes: Sequence[str] | None):
    from oodscope.detectors import Detector
    from oodscope.detectors.fitting import build_detector

    if isinstance(spec, Detector):
        detector = spec
    else:
        if isinstance(spec, str):
            name, params = spec, {}
        elif isinstance(spec, tuple) and len(spec) == 2:
            name, params = spec[0], dict(spec[1])
        elif isinstance(spec, Mapping):
            params = dict(spec)
            name = params.pop("name")
        else:
            raise TypeError(f"a detector spec is a name, (name, params), a dict or a Detector; got {spec!r}")
        detector = build_detector(name, params, classes)
    if detector.fit_needs().model:
        raise ValueError(f"{detector.name} needs the model in the loop; the corruption audit scores cached features")
    return detector


@dataclass
class CorruptionAuditResult(AuditRecord):
    """AUROC / FPR@95 per detector, corruption, severity and OOD set, and a degradation summary.

    ``rows``: one dict per (detector, corruption, severity, OOD set). Severity 0 is the clean
    measurement, computed once and repeated under every corruption so that each curve starts there.
    ``summary``: detector -> corruption (and ``"mean"`` over corruptions) -> {"auroc": {severity:
    mean over OOD sets}, "fpr95": {...}, "drop_at_3", "drop_at_5"} where ``drop_at_s`` = AUROC at
    severity 0 minus AUROC at ``s`` (``None`` when either severity was not run).
    Severities are strings in the JSON (``"0"``, ``"3"``); :meth:`curve` returns them as ints.
    """

    kind = "corruption_robustness"

    backbone_id: str | None
    detectors: dict[str, Any]
    corruptions: list[str]
    severities: list[int]
    apply_to: str
    seed: int
    work_size: int | None
    n_id: int
    n_ood: dict[str, int]
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    seconds: float = 0.0
    n_failed: int = 0

    def curve(self, detector: str, corruption: str = MEAN_KEY, metric: str = "auroc",
              ood_set: str | None = None) -> tuple[list[int], list[float]]:
        """(severities, metric) for one detector; averaged over OOD sets unless ``ood_set`` is given."""
        if ood_set is None:
            values = self.summary[detector][corruption][metric]
            return [int(s) for s in values], [float(x) for x in values.values()]
        sev = []
        out = []
        names = self.corruptions if corruption == MEAN_KEY else [corruption]
        for s in self.severities:
            picked = [r[metric] for r in self.rows if r["detector"] == detector and r["severity"] == s
                      and r["ood_set"] == ood_set and r["corruption"] in names]
            sev.append(s)
            out.append(float(np.mean(picked)))
        return sev, out

    def save(self, directory: str | os.PathLike) -> Path:
        """``audit.json`` (entry ``corruption_robustness``), ``corruption_audit.csv`` (every
        measurement) and ``corruption_summary.csv`` (per detector and corruption: AUROC by severity,
        averaged over OOD sets, and the drops)."""
        directory = Path(directory)
        path = merge_audit_json(directory, self.kind, self.to_dict())
        write_csv(directory / "corruption_audit.csv", self.rows,
                   ("detector", "corruption", "severity", "ood_set", "auroc", "fpr95"))
        rows = []
        for det, per in self.summary.items():
            for corruption, s in per.items():
                row = {"detector": det, "corruption": corruption, "drop_at_3": s["drop_at_3"],
                       "drop_at_5": s["drop_at_5"]}
                row.update({f"auroc_s{k}": v for k, v in s["auroc"].items()})
                row.update({f"fpr95_s{k}": v for k, v in s["fpr95"].items()})
                rows.append(row)
        columns = (["detector", "corruption"] + [f"auroc_s{s}" for s in self.severities]
                   + [f"fpr95_s{s}" for s in self.severities] + ["drop_at_3", "drop_at_5"])
        write_csv(directory / "corruption_summary.csv", rows, columns)
        return path

    def table(self) -> str:
        """Plain text: mean AUROC over OOD sets by severity, per detector and corruption."""
        sev = self.severities
        head = f"{'detector':<14} {'corruption':<18}" + "".join(f" {'s' + str(s):>6}" for s in sev) + "  drop@3 drop@5"
        lines = [head, "-" * len(head)]
        for det, per in self.summary.items():
            for corruption, s in per.items():
                vals = "".join(f" {s['auroc'][str(k)]:6.3f}" for k in sev)
                drops = "".join(f" {'-' if s[k] is None else format(s[k], '+.3f'):>6}"
                                for k in ("drop_at_3", "drop_at_5"))
                lines.append(f"{det:<14} {corruption:<18}{vals} {drops}")
        return "\n".join(lines)


def corruption_robustness(
    backbone: Any,
    detectors: Mapping[str, DetectorSpec] | Sequence[str],
    id_data: Any,
    ood_data: Mapping[str, Any],
    *,
    corruptions: Sequence[str] = CORRUPTION_NAMES,
    severities: Sequence[int] = (0, 1, 2, 3, 4, 5),
    apply_to: str = "both",
    id_fit: Any = None,
    id_fit_labels: np.ndarray | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    text_encoder: Any = None,
    seed: int = 0,
    work_size: int | None = REFERENCE_SIZE,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> CorruptionAuditResult:
    """Detection quality of ``detectors`` as ID and/or OOD images are corrupted.

    ``detectors``: display name -> spec (a registered name, ``(name, params)``, ``{"name": ...,
    **params}`` or an unfitted Detector), or a list of names. Zero-shot detectors are fitted with
    the text encoder (``text_encoder``, default the backbone) and ``classes`` (default: the ID
    source's class names); detectors that learn from ID data are fitted once on the **clean**
    ``id_fit`` (an ImageSource or Features, with ``id_fit_labels`` or the source's labels).
    ``id_data`` / ``ood_data``: ImageSources (their images are corrupted). ``apply_to``: corrupt
    ``"both"`` ID and OOD images, only ``"id"`` or only ``"ood"`` (the other side stays clean).
    ``severities``: integers in 0..5; 0 (clean) is always measured, as the reference of the drops.
    ``work_size``: see :class:`~oodscope.evaluation.corruptions.CorruptedSource`.
    Features go through the content-hash cache in ``cache_dir``: clean images (severity 0) share it
    with every other run, and a repeated audit only re-reads and re-corrupts the images.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if apply_to not in ("both", "id", "ood"):
        raise ValueError("apply_to must be 'both', 'id' or 'ood'")
    unknown = [c for c in corruptions if c not in CORRUPTION_NAMES]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; available: {', '.join(CORRUPTION_NAMES)}")
    if not corruptions:
        raise ValueError("at least one corruption is needed")
    severities = sorted({int(s) for s in severities})
    if not severities or severities[0] < 0 or severities[-1] > 5:
        raise ValueError("severities must be integers in 0..5")
    if 0 not in severities:
        severities = [0, *severities]  # the clean reference is always measured
    check_ood_names(ood_data)
    for name, data in {"ID": id_data, **ood_data}.items():
        if not is_source(data):
            raise TypeError(f"{name}: the corruption audit needs an ImageSource (its images are corrupted)")
    if isinstance(detectors, Sequence) and not isinstance(detectors, str):
        detectors = {d: d for d in detectors}
    if not detectors:
        raise ValueError("at least one detector is needed")

    options = {"cache_dir": cache_dir, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    n_failed = 0

    def features_of(source: Any, label: str) -> ExtractedData:
        nonlocal n_failed
        d = as_data(backbone, source, label, options)
        n_failed += d.n_failed
        return d

    clean_id = features_of(id_data, "ID clean")
    if classes is None and getattr(id_data, "class_names", None):
        classes = list(id_data.class_names)
    fitted: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    fit_data: ExtractedData | None = None
    encoder = text_encoder if text_encoder is not None else backbone
    for name, spec in detectors.items():
        det = _make_detector(spec, classes)
        needs = det.fit_needs()
        if needs.features:
            if id_fit is None:
                raise ValueError(f"{name} learns from ID data: pass id_fit (clean in-distribution images or features)")
            if fit_data is None:
                fit_data = features_of(id_fit, "ID fit") if is_source(id_fit) else ExtractedData(id_fit, None, None, 0)
                if id_fit_labels is not None:
                    fit_data.labels = np.asarray(id_fit_labels, dtype=np.int64)
            if needs.labels and fit_data.labels is None:
                raise ValueError(f"{name} needs the labels of the ID fit data (id_fit_labels=...)")
        fit_detector(det, fit_data.features if needs.features else None,
                     fit_data.labels if needs.labels else None, text_encoder=encoder)
        fitted[name] = det
        specs[name] = {"name": det.name, "params": jsonable(det.get_params())}

    clean_ood = {name: features_of(src, f"{name} clean") for name, src in ood_data.items()}

    def measure(id_f: Features, ood_f: Mapping[str, Features], corruption: str, severity: int) -> list[dict]:
        out = []
        for det_name, det in fitted.items():
            id_scores = None if is_stateful(det) else det.score(id_f)
            for ood_name, f in ood_f.items():
                m = pair_metrics(det, id_f, f, id_scores, seed)
                out.append({"detector": det_name, "corruption": corruption, "severity": severity,
                            "ood_set": ood_name, **m})
        return out

    clean_rows = measure(clean_id.features, {k: d.features for k, d in clean_ood.items()}, "none", 0)
    rows: list[dict[str, Any]] = []
    conditions = [(c, s) for c in corruptions for s in severities if s > 0]
    bar = tqdm(total=len(conditions), desc="corruptions", disable=not progress, dynamic_ncols=True, position=0)
    try:
        for corruption in corruptions:
            rows.extend({**r, "corruption": corruption} for r in clean_rows)
            for severity in (s for s in severities if s > 0):
                bar.set_postfix_str(f"{corruption}@{severity}")
                tag = f"{corruption}@{severity}"
                if apply_to in ("both", "id"):
                    id_f = features_of(CorruptedSource(id_data, corruption, severity, seed, work_size=work_size),
                                       f"ID {tag}").features
                else:
                    id_f = clean_id.features
                if apply_to in ("both", "ood"):
                    ood_f = {name: features_of(CorruptedSource(src, corruption, severity, seed, work_size=work_size),
                                               f"{name} {tag}").features for name, src in ood_data.items()}
                else:
                    ood_f = {k: d.features for k, d in clean_ood.items()}
                rows.extend(measure(id_f, ood_f, corruption, severity))
                bar.update(1)
    finally:
        bar.close()

    summary: dict[str, dict[str, Any]] = {}
    for det_name in fitted:
        per: dict[str, Any] = {}
        for corruption in [*corruptions, MEAN_KEY] if len(corruptions) > 1 else list(corruptions):
            names = corruptions if corruption == MEAN_KEY else [corruption]
            entry: dict[str, Any] = {"auroc": {}, "fpr95": {}}
            for s in severities:
                picked = [r for r in rows
                          if r["detector"] == det_name and r["severity"] == s and r["corruption"] in names]
                entry["auroc"][str(s)] = float(np.mean([r["auroc"] for r in picked]))
                entry["fpr95"][str(s)] = float(np.mean([r["fpr95"] for r in picked]))
            for s in (3, 5):
                have = str(s) in entry["auroc"]
                entry[f"drop_at_{s}"] = entry["auroc"]["0"] - entry["auroc"][str(s)] if have else None
            per[corruption] = entry
        summary[det_name] = per

    return CorruptionAuditResult(
        backbone_id=getattr(clean_id.features, "backbone_id", None), detectors=specs,
        corruptions=list(corruptions), severities=severities, apply_to=apply_to, seed=seed, work_size=work_size,
        n_id=len(clean_id.features), n_ood={k: len(d.features) for k, d in clean_ood.items()}, rows=rows,
        summary=summary, seconds=time.perf_counter() - started, n_failed=n_failed,
    )


def plot_corruption_curves(result: CorruptionAuditResult | Mapping[str, Any], path: str | os.PathLike,
                           metric: str = "auroc", dpi: int = 110) -> Path:
    """``metric`` (mean over OOD sets) against severity, one line per detector, one panel per
    corruption plus one averaged over the corruptions."""
    if not isinstance(result, CorruptionAuditResult):
        result = CorruptionAuditResult.from_dict(result)
    if metric not in ("auroc", "fpr95"):
        raise ValueError("metric must be 'auroc' or 'fpr95'")
    plt = pyplot()
    panels = list(result.corruptions) + ([MEAN_KEY] if len(result.corruptions) > 1 else [])
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols + 0.4, 2.6 * rows_n + 0.4), sharey=True, squeeze=False)
    for ax, corruption in zip(axes.flat, panels, strict=False):
        for det in result.summary:
            sev, vals = result.curve(det, corruption, metric)
            ax.plot(sev, vals, marker="o", markersize=3.5, label=det)
        ax.set_title("mean over corruptions" if corruption == MEAN_KEY else corruption, fontsize=9)
        ax.set_xticks(result.severities)
        ax.set_xlabel("severity", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(("AUROC" if metric == "auroc" else "FPR@95") + " (mean over OOD sets)", fontsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8, frameon=False)
    who = "ID+OOD" if result.apply_to == "both" else result.apply_to.upper()
    fig.suptitle(f"Corruption robustness ({who} corrupted, {result.backbone_id})", fontsize=10)
    legend_rows = math.ceil(len(names) / 6)
    fig.tight_layout(rect=(0, (0.05 + 0.04 * legend_rows) / rows_n, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
