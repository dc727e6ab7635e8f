"""One backbone's part of a benchmark run: its detectors planned, fitted by their kind, scored on every
set batch by batch, and turned into result rows (used by :func:`oodscope.evaluation.bench.run_benchmark`).

A detector that cannot run (fields the backbone lacks, no text encoder, missing parameters, an
exception) is recorded with the stage and reason; the run goes on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import Features, is_vision_language
from oodscope.detectors import DetectorError, create
from oodscope.detectors.fitting import fit_detector, fit_problems, planned_params
from oodscope.detectors.kinds import DetectorKind
from oodscope.evaluation.bench_accuracy import accuracy, id_predictor, labels_are_logit_classes, own_predictions
from oodscope.evaluation.bench_config import BenchConfig
from oodscope.evaluation.metrics import ood_metrics
from oodscope.evaluation.streams import ADAPTIVE_PROTOCOL_NOTE, DEFAULT_STREAM_SEED, adaptive_pair_scores, is_adaptive
from oodscope.evaluation.tables import METRICS
from oodscope.features.extract import ExtractionResult
from oodscope.io import ImageSource, Subset

#: SHE stores one pattern per *classifier* class and looks it up with argmax(logits): when the ID
#: labels are not the classifier's classes, the classifier's own predictions are its labels.
LABELS_FROM_CLASSIFIER = {"she", "openmax"}



@dataclass
class SetPlan:
    name: str
    role: str  # "id", "id_fit" or "ood"
    kind: str | None
    source: ImageSource
    description: Any


@dataclass
class BackboneEntry:
    name: str
    backbone: Any
    network: Any  # what runs on images (the classifier under a derived backbone such as ConSE)
    derive: Callable[[Features], Features] | None  # network features -> this backbone's features
    #: Backbones whose networks compute the same features share one extraction (and its cache). Computed
    #: once: a network's weights fingerprint may hash all of its weights.
    network_key: str = ""


class FeatureSet:
    """One set's features for one backbone: whole (``all``) or in batches (``batches``)."""

    def __init__(self, extraction: ExtractionResult, batch: int, stream: bool) -> None:
        self.extraction = extraction
        self.batch = batch
        self.stream = stream

    def __len__(self) -> int:
        return len(self.extraction.indices)

    @property
    def labels(self) -> np.ndarray | None:
        return self.extraction.labels

    def all(self) -> Features:
        if self.stream:  # not kept: streaming runs hold no whole set
            return self.extraction.as_derived(self.extraction.derive).features
        return self.extraction.features

    def batches(self) -> Iterator[Features]:
        if not self.stream:
            whole = self.all()
            for start in range(0, len(whole), self.batch):
                yield whole.subset(slice(start, start + self.batch))
            return
        for _, feats in self.extraction.iter_features(self.batch):
            yield feats


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


@dataclass
class RunContext:
    """What every backbone's detectors share in one benchmark run."""

    cfg: BenchConfig
    sets: dict[str, SetPlan]
    classes: list[str] | None
    labels_aligned: bool
    out: Path
    timing: Callable[..., None]
    log: Callable[[str], None]


@dataclass
class _Run:
    name: str
    detector: Any
    kind: str  # "features" | "model"
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    fit_cpu: float = 0.0  # process CPU time (all threads): robust to other load on the machine
    score_cpu: float = 0.0
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pair_id_scores: dict[str, np.ndarray] = field(default_factory=dict)  # test-time adaptive: per OOD set
    predictions: list[np.ndarray] = field(default_factory=list)
    accuracy_source: str = ""
    note: str = ""


class _Failures(list):
    """Detectors that did not run, with the stage and reason (logged as they happen)."""

    def __init__(self, backbone: str, log: Callable[[str], None]) -> None:
        super().__init__()
        self.backbone, self.log = backbone, log

    def __call__(self, detector: str, stage: str, reason: str) -> None:
        self.append({"backbone": self.backbone, "detector": detector, "stage": stage, "reason": reason})
        self.log(f"  {detector}: not run ({stage}): {reason}")


def run_backbone(ctx: RunContext, entry: BackboneEntry, names: list[str],
                  feature_sets: dict[str, FeatureSet]) -> tuple[list[dict], list[dict], dict[str, str]]:
    fail = _Failures(entry.name, ctx.log)
    planned = _plan_detectors(ctx, entry, names, feature_sets, fail)
    fit = feature_sets.get("id_fit")
    fit_features = _LazyFit(fit, entry.name, ctx.timing)
    runs = [run for name, detector in planned
            if (run := _fit_run(ctx, entry, name, detector, fit_features, fail)) is not None]
    predictor = None
    if ctx.cfg.id_accuracy != "off" and ctx.labels_aligned:
        predictor = id_predictor(entry, fit, fit_features.get, ctx.classes, ctx.cfg, ctx.timing)
    fit_features.release()  # fitted detectors keep what they need; free the rest before scoring
    shared = _score_runs(ctx, entry, runs, feature_sets, predictor, fail)
    rows, score_files = _result_rows(ctx, entry, runs, feature_sets, shared, predictor, fail)
    return rows, list(fail), score_files


def _plan_detectors(ctx: RunContext, entry: BackboneEntry, names: list[str], feature_sets: dict[str, FeatureSet],
                    fail: _Failures) -> list[tuple[str, Any]]:
    """Each detector created and checked against what this backbone and the data provide."""
    provided = _provided_fields(feature_sets["id"])
    fit = feature_sets.get("id_fit")
    have_labels = fit is not None and fit.labels is not None and not (fit.labels < 0).any()
    planned = []
    for name in names:
        try:
            params = planned_params(name, ctx.cfg.params_for(name), ctx.classes)  # preset, then --params
        except DetectorError as err:
            fail(name, "plan", str(err))
            continue
        try:
            detector = create(name, preset=ctx.cfg.preset, **params)
        except Exception as err:  # noqa: BLE001 - a constructor's value check; recorded, the run goes on
            fail(name, "create", _reason(err))
            continue
        if type(detector).kind is DetectorKind.ANOMALY:
            fail(name, "skipped", "image anomaly method (scores and pixel maps on normal/defective images): "
                 "run it with --anomaly CATEGORY")
            continue
        lacking = [r for r in detector.fields() if r != "model" and r not in provided]
        if lacking:
            hint = {"patches": " (backbone option patches=true adds them)",
                    "layers": " (backbone option layers=true adds them)"}
            fail(name, "plan", f"needs {lacking} from the backbone's features; {entry.name} provides "
                 f"{sorted(provided & _FEATURE_FIELDS)}" + "".join(hint.get(x, "") for x in lacking))
            continue
        needs = detector.fit_needs()
        if needs.model and not ctx.cfg.model_based:
            fail(name, "skipped", "model-in-the-loop method (one forward+backward pass per image); "
                 "set model_based = true (--model-based) to run it")
            continue
        problems = fit_problems(detector, features=fit is not None, labels=have_labels,
                                text_encoder=is_vision_language(entry.backbone),
                                classifier=callable(getattr(entry.backbone, "classifier_parts", None)))
        if problems:
            fail(name, "plan", f"needs {' and '.join(problems)}" + (" (--id-fit)" if not fit and needs.features
                                                                       else ""))
            continue
        planned.append((name, detector))
    return planned


class _LazyFit:
    """The ID fit set's features, loaded on first use (detectors that learn nothing never load them)."""

    def __init__(self, fit: FeatureSet | None, backbone: str, timing: Callable[..., None]) -> None:
        self.fit, self.backbone, self.timing = fit, backbone, timing
        self._features: Features | None = None

    def get(self) -> Features:
        if self._features is None:
            started = time.perf_counter()
            self._features = self.fit.all()
            self.timing(self.backbone, "load_fit", time.perf_counter() - started, set_name="id_fit")
        return self._features

    def release(self) -> None:
        self._features = None


def _fit_run(ctx: RunContext, entry: BackboneEntry, name: str, detector: Any, fit_features: _LazyFit,
             fail: _Failures) -> _Run | None:
    """Fit one detector by its kind (timed); ``None`` when fitting failed (recorded)."""
    needs = detector.fit_needs()
    features = fit_features.get() if needs.features else None
    labels = fit_features.fit.labels if needs.labels else None
    note = ""
    if name in LABELS_FROM_CLASSIFIER and labels is not None and features.logits is not None \
            and not labels_are_logit_classes(features, ctx.classes):
        labels = np.asarray(features.logits).argmax(axis=1)
        note = "fitted with the classifier's own predictions as labels (ID labels are not its classes)"
    options = {}
    if needs.images:  # AdaSCALE, NAC-UE: the fit runs the network on the ID fit images themselves
        options = {"parts": entry.backbone.classifier_parts(),
                   "images": _image_batches(entry, ctx.sets["id_fit"].source, fit_features.fit, ctx.cfg,
                                            f"{entry.name} {name} fit")}
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        fit_detector(detector, features, labels, text_encoder=entry.backbone, **options)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        fail(name, "fit", _reason(err))
        return None
    run = _Run(name, detector, "model" if needs.model else "features", note=note)
    run.fit_seconds = time.perf_counter() - started
    run.fit_cpu = time.process_time() - cpu_started
    return run


def _score_runs(ctx: RunContext, entry: BackboneEntry, runs: list[_Run], feature_sets: dict[str, FeatureSet],
                predictor: Any, fail: _Failures) -> np.ndarray | None:
    """Every detector scores every test set batch by batch (test-time-adaptive ones: one stream per OOD
    set, :func:`_score_adaptive`); returns the shared ID predictions."""
    shared_predictions: list[np.ndarray] = []
    feature_runs = [r for r in runs if r.kind == "features"]
    for set_name in [n for n in feature_sets if n != "id_fit"]:
        for feats in feature_sets[set_name].batches():
            if set_name == "id" and predictor is not None:
                shared_predictions.append(predictor(feats))
            for run in list(feature_runs):
                try:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    if not is_adaptive(run.detector):
                        run.scores.setdefault(set_name, []).append(np.asarray(run.detector.score(feats), np.float64))
                    run.score_seconds += time.perf_counter() - started
                    run.score_cpu += time.process_time() - cpu_started
                    if set_name == "id" and ctx.cfg.id_accuracy != "off":
                        own = own_predictions(run, feats)
                        if own is not None:
                            run.predictions.append(own)
                except Exception as err:  # noqa: BLE001
                    fail(run.name, f"score ({set_name})", _reason(err))
                    feature_runs.remove(run)
                    runs.remove(run)
    for run in [r for r in feature_runs if is_adaptive(r.detector)]:
        try:
            _score_adaptive(run, feature_sets)
        except Exception as err:  # noqa: BLE001
            fail(run.name, "score (adaptive stream)", _reason(err))
            runs.remove(run)
    for run in [r for r in runs if r.kind == "model"]:
        try:
            _score_with_model(run, entry, feature_sets, ctx.sets, ctx.cfg)
        except Exception as err:  # noqa: BLE001
            fail(run.name, "score (model)", _reason(err))
            runs.remove(run)
    return np.concatenate(shared_predictions) if shared_predictions else None


def _score_adaptive(run: _Run, feature_sets: dict[str, FeatureSet]) -> None:
    """As the official AdaNeg evaluator: for each OOD set, ``reset()`` and one seeded shuffled stream of
    the ID set and that OOD set; the ID scores of each pair come from its own stream."""
    id_features = feature_sets["id"].all()
    started, cpu_started = time.perf_counter(), time.process_time()
    for set_name in [n for n in feature_sets if n not in ("id", "id_fit")]:
        s_id, s_ood = adaptive_pair_scores(run.detector, id_features, feature_sets[set_name].all(),
                                           DEFAULT_STREAM_SEED)
        run.scores[set_name] = [s_ood]
        run.pair_id_scores[set_name] = s_id
        run.scores.setdefault("id", [s_id])  # the first pair's, for plots
    run.score_seconds += time.perf_counter() - started
    run.score_cpu += time.process_time() - cpu_started
    run.note = "; ".join(x for x in (run.note, ADAPTIVE_PROTOCOL_NOTE) if x)


def _result_rows(ctx: RunContext, entry: BackboneEntry, runs: list[_Run], feature_sets: dict[str, FeatureSet],
                 shared: np.ndarray | None, predictor: Any, fail: _Failures) -> tuple[list[dict], dict[str, str]]:
    """Metrics per (detector, OOD set) and the near/far/all averages; scores saved per detector."""
    rows: list[dict[str, Any]] = []
    score_files: dict[str, str] = {}
    id_labels = feature_sets["id"].labels if ctx.labels_aligned else None
    ood_names = [n for n in feature_sets if n not in ("id", "id_fit")]
    for run in runs:
        scores = {k: np.concatenate(v) for k, v in run.scores.items()}
        scores |= {f"id@{k}": v for k, v in run.pair_id_scores.items()}
        try:
            scores, inf_note = _finite_ranks(scores)
        except ValueError as err:
            fail(run.name, "metrics", str(err))
            continue
        note = "; ".join(x for x in (run.note, *run.detector.fit_info_.get("warnings", []), inf_note) if x)
        ctx.timing(entry.name, "fit", run.fit_seconds, detector=run.name, cpu_seconds=run.fit_cpu)
        ctx.timing(entry.name, "score", run.score_seconds, detector=run.name, cpu_seconds=run.score_cpu)
        acc, acc_source = accuracy(run, shared, predictor, id_labels, ctx.classes)
        rel = Path("scores") / _slug(entry.name) / f"{_slug(run.name)}.safetensors"
        _save_scores(ctx.out / rel, scores, {"backbone": entry.name, "detector": run.name})
        score_files[run.name] = rel.as_posix()
        common = {"backbone": entry.name, "detector": run.name, "id_accuracy": acc,
                  "id_accuracy_source": acc_source, "fit_s": round(run.fit_seconds, 4),
                  "score_s": round(run.score_seconds, 4), "note": note}
        per_set = []
        for set_name in ood_names:
            m = ood_metrics(scores.get(f"id@{set_name}", scores["id"]), scores[set_name])
            row = {"backbone": entry.name, "detector": run.name, "set": set_name,
                   "kind": ctx.sets[set_name].kind or "", **{k: float(m[k]) for k in METRICS},
                   "n_id": int(m["n_id"]), "n_ood": int(m["n_ood"])} | common
            rows.append(row)
            per_set.append(row)
        for label, members in (("near", [r for r in per_set if r["kind"] == "near"]),
                               ("far", [r for r in per_set if r["kind"] == "far"]), ("all", per_set)):
            if not members or (label == "all" and len(members) < 2):
                continue
            rows.append({"backbone": entry.name, "detector": run.name, "set": f"{label}-average",
                         "kind": "average", **{k: float(np.mean([r[k] for r in members])) for k in METRICS},
                         "n_id": members[0]["n_id"], "n_ood": int(sum(r["n_ood"] for r in members))} | common)
    return rows, score_files


_FEATURE_FIELDS = {"embedding", "logits", "penultimate", "patches", "layers", "weight", "bias", "logit_scale"}


def _provided_fields(feature_set: FeatureSet) -> set[str]:
    """Features fields this backbone fills (read from the first batch of the ID set)."""
    first = next(iter(feature_set.batches()), None)
    return set() if first is None else first.available()


def _score_with_model(run: _Run, entry, feature_sets, sets, cfg) -> None:
    """Model-in-the-loop scoring: re-decode the images that extraction read, preprocess, run the network."""
    parts = entry.backbone.classifier_parts()
    started, cpu_started = time.perf_counter(), time.process_time()
    for set_name, fs in feature_sets.items():
        if set_name == "id_fit":
            continue
        batches = _image_batches(entry, sets[set_name].source, fs, cfg, f"{entry.name} {run.name} {set_name}")
        run.scores[set_name] = [run.detector.score_images(parts, batch) for batch in batches]
    run.score_seconds = time.perf_counter() - started
    run.score_cpu = time.process_time() - cpu_started


def _image_batches(entry, source, feature_set: FeatureSet, cfg, description: str):
    """The images that extraction read for ``feature_set`` (same rows), re-decoded and preprocessed for
    the backbone's network, ``cfg.model_batch_size`` at a time, with a progress bar."""
    from tqdm.auto import tqdm

    from oodscope.backbones.preprocess import preprocess

    rows = Subset(source, feature_set.extraction.indices)
    device = getattr(entry.backbone, "device", "cpu")
    with tqdm(total=len(rows), unit="img", desc=description, disable=not cfg.progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), cfg.model_batch_size):
            images = [rows.load(i) for i in range(start, min(start + cfg.model_batch_size, len(rows)))]
            yield preprocess(images, entry.backbone.input_spec, device)
            bar.update(len(images))


def _finite_ranks(scores: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """+inf ("more OOD than anything finite") becomes (largest finite score) + 1: ranks unchanged."""
    values = np.concatenate(list(scores.values()))
    if np.isnan(values).any() or np.isneginf(values).any():
        raise ValueError("scores contain NaN or -inf")
    n_inf = int(np.isposinf(values).sum())
    if not n_inf:
        return scores, ""
    finite = values[np.isfinite(values)]
    top = (finite.max() if finite.size else 0.0) + 1.0
    fixed = {k: np.where(np.isposinf(v), top, v) for k, v in scores.items()}
    return fixed, f"{n_inf} +inf score(s) ranked above every finite score"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def _save_scores(path: Path, scores: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in scores.items()}, str(path), metadata=meta)


