"""Benchmark runner: every (backbone, detector, OOD set) on one protocol, features extracted once.

``run_benchmark(config) -> BenchResult`` (CLI: ``oodscope bench``). For each backbone the images
of every set go through the network once (feature cache, :func:`oodscope.features.extract.extract`);
a backbone derived from a classifier (``conse:X``, or any object with ``classifier`` and
``from_classifier_features``) reuses the classifier's features instead of running it again. Every
detector is then fitted on the ID fit set and scores the ID test set and each OOD set from those
features. A detector that cannot run (fields the backbone lacks, no text encoder, missing
parameters, an exception) is recorded with its reason; the run goes on.

Per (backbone, detector, OOD set): AUROC, FPR@95, AUPR-In/Out and detection error (see
:mod:`oodscope.evaluation.metrics`), near/far/all averages, ID accuracy where a classifier over
the ID classes exists (:mod:`oodscope.evaluation.bench_accuracy`), and seconds per stage (extract, fit, score).

Memory: with ``stream=True`` features go to the cache and are read back in batches of
``stream_batch`` rows; every detector scores each batch, so memory does not grow with the size of
the test sets. The ID *fit* set is always loaded whole (fitting needs it in memory).

Outputs in ``output`` (:mod:`oodscope.evaluation.bench_output`): ``results.csv`` (tidy;
``results.parquet`` too when pyarrow imports), ``results.md``, ``results.json`` (config, environment,
datasets, rows, failures, timings),
``timings.csv``, ``failures.csv``, ``scores/<backbone>/<detector>.safetensors`` (one float64 vector
per set: ``id`` and each OOD set name) and ``report.html``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import Features, derived_from, is_vision_language
from oodscope.detectors import DetectorError
from oodscope.detectors.fitting import build_detector, fit_detector, fit_problems
from oodscope.evaluation.bench_accuracy import accuracy, id_predictor, labels_are_logit_classes, own_predictions
from oodscope.evaluation.bench_config import (
    BenchConfig,
    OODSet,
    describe,
    load_config,
    parse_ood_flag,
    spread,
)
from oodscope.evaluation.bench_output import environment, write_results
from oodscope.evaluation.metrics import ood_metrics
from oodscope.evaluation.tables import METRICS, markdown, ranked_tables
from oodscope.features.extract import ExtractionResult, backbone_config, extract
from oodscope.io import ImageSource, Subset, resolve_images

__all__ = [  # the runner, and the names of its sibling modules that callers import from here
    "BenchConfig",
    "BenchResult",
    "OODSet",
    "environment",
    "load_config",
    "load_scores",
    "markdown",
    "parse_ood_flag",
    "ranked_tables",
    "run_benchmark",
    "spread",
    "write_results",
]

#: SHE stores one pattern per *classifier* class and looks it up with argmax(logits): when the ID
#: labels are not the classifier's classes, the classifier's own predictions are its labels.
LABELS_FROM_CLASSIFIER = {"she"}


@dataclass
class _Set:
    name: str
    role: str  # "id", "id_fit" or "ood"
    kind: str | None
    source: ImageSource
    description: Any


def _plan_sets(cfg: BenchConfig) -> tuple[dict[str, _Set], list[str] | None]:
    classes = cfg.classes
    id_spec, fit_spec, oods = cfg.id, cfg.id_fit, list(cfg.ood)
    if cfg.benchmark:
        from oodscope.io.registry import get_benchmark

        bench = get_benchmark(cfg.benchmark)
        id_spec = id_spec if id_spec is not None else bench.id
        fit_spec = fit_spec if fit_spec is not None else bench.id_fit
        given = {o.name for o in oods}
        oods += [OODSet(n, d, "near") for n, d in bench.near.items() if n not in given]
        oods += [OODSet(n, d, "far") for n, d in bench.far.items() if n not in given]
        if classes is None and bench.classes is not None:
            classes = list(bench.classes())
    if id_spec is None:
        raise ValueError("no ID test set: give id (--id) or a benchmark")
    if not oods:
        raise ValueError("no OOD set: give ood (--ood NAME=DATA) or a benchmark")
    names = [o.name for o in oods]
    if len(set(names)) != len(names) or {"id", "id_fit"} & set(names):
        raise ValueError(f"OOD set names must be unique and not 'id'/'id_fit': {names}")
    sets = {"id": _Set("id", "id", None, _limited(resolve_images(id_spec), cfg.limit), describe(id_spec))}
    if fit_spec is not None:
        limit = cfg.fit_limit if cfg.fit_limit is not None else cfg.limit
        sets["id_fit"] = _Set("id_fit", "id_fit", None, _limited(resolve_images(fit_spec), limit), describe(fit_spec))
    for o in oods:
        if o.kind not in (None, "near", "far"):
            raise ValueError(f"OOD set {o.name}: kind must be 'near', 'far' or empty, got {o.kind!r}")
        sets[o.name] = _Set(o.name, "ood", o.kind, _limited(resolve_images(o.data), cfg.limit), describe(o.data))
    if classes is None:
        classes = sets["id"].source.class_names
    return sets, (list(classes) if classes is not None else None)


def _limited(source: ImageSource, limit: int | None) -> ImageSource:
    idx = spread(len(source), limit)
    return source if len(idx) == len(source) else Subset(source, idx)


# ============================================================================ backbones
@dataclass
class _BackboneEntry:
    name: str
    backbone: Any
    network: Any  # what runs on images (the classifier under a derived backbone such as ConSE)
    derive: Callable[[Features], Features] | None  # network features -> this backbone's features


def _plan_backbones(cfg: BenchConfig) -> list[_BackboneEntry]:
    from oodscope.backbones import create

    if not cfg.backbones:
        raise ValueError("no backbone: give backbones (--backbone B)")
    entries = []
    for item in cfg.backbones:
        if isinstance(item, str):
            backbone = create(item, device=cfg.device, **cfg.backbone_options.get(item, {}))
            name = item
        else:
            backbone, name = item, item.id
        network, derive = derived_from(backbone)
        entries.append(_BackboneEntry(name, backbone, network, derive))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"backbones listed twice: {names}")
    return entries


def _network_key(network: Any) -> str:
    """Backbones whose networks compute the same features share one extraction (and its cache)."""
    return repr(sorted(backbone_config(network).items()))


# ============================================================================ features
class _FeatureSet:
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


# ============================================================================ results
@dataclass
class BenchResult:
    output: Path
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    timings: list[dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    config: dict[str, Any]
    environment: dict[str, Any]
    scores: dict[str, dict[str, str]]  # backbone -> detector -> scores file (relative to output)

    def metric(self, backbone: str, detector: str, ood_set: str, name: str = "auroc") -> float:
        for row in self.rows:
            if (row["backbone"], row["detector"], row["set"]) == (backbone, detector, ood_set):
                return row[name]
        raise KeyError((backbone, detector, ood_set))

    def seconds(self, stage: str, backbone: str | None = None, detector: str | None = None) -> float:
        return float(sum(t["seconds"] for t in self.timings if t["stage"] == stage
                         and (backbone is None or t["backbone"] == backbone)
                         and (detector is None or t["detector"] == detector)))

    def load_scores(self, backbone: str, detector: str) -> dict[str, np.ndarray]:
        return load_scores(self.output / self.scores[backbone][detector])


def load_scores(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


# ============================================================================ the run
def run_benchmark(config: BenchConfig | Mapping[str, Any]) -> BenchResult:
    """Run the benchmark described by ``config`` and write its results (see the module docstring)."""
    cfg = config if isinstance(config, BenchConfig) else BenchConfig.from_dict(config)
    from oodscope.detectors import registered

    started_at = dt.datetime.now(dt.timezone.utc)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    sets, classes = _plan_sets(cfg)
    entries = _plan_backbones(cfg)
    plan = _detector_plan(cfg.detectors, [e.name for e in entries], registered())
    labels_aligned = _labels_aligned(sets, classes)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else (out / "feature-cache" if cfg.stream else None)
    if cfg.stream:
        _return_large_buffers_to_the_os()
    log = _Log(cfg.progress)

    timings: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    score_files: dict[str, dict[str, str]] = {}
    datasets_info: dict[str, dict[str, Any]] = {}
    extractions: dict[tuple[int, str], Any] = {}

    def timing(backbone: str, stage: str, seconds: float, detector: str = "", set_name: str = "",
               cpu_seconds: float | None = None) -> None:
        timings.append({"backbone": backbone, "stage": stage, "detector": detector, "set": set_name,
                        "seconds": round(float(seconds), 6),
                        "cpu_seconds": None if cpu_seconds is None else round(float(cpu_seconds), 6)})

    ctx = _Context(cfg, sets, classes, labels_aligned, out, timing, log)
    for position, entry in enumerate(entries):
        log(f"backbone {entry.name}")
        network = _network_key(entry.network)
        feature_sets: dict[str, _FeatureSet] = {}
        for set_name, s in sets.items():
            key = (network, set_name)
            if key not in extractions:
                result = extract(entry.network, s.source, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 cache_dir=cache_dir, keep_in_memory=not cfg.stream, progress=cfg.progress,
                                 description=f"{entry.network.id} {set_name}")
                extractions[key] = result
                timing(entry.name, "extract", result.seconds, set_name=set_name)
                info = datasets_info.setdefault(set_name, {
                    "role": s.role, "kind": s.kind, "data": s.description, "images": len(s.source),
                    "class_names": s.source.class_names, "failed_images": {}})
                info["failed_images"][entry.network.id] = [f.__dict__ for f in result.failures[:20]]
                info["n_failed"] = max(info.get("n_failed", 0), len(result.failures))
            else:
                timing(entry.name, "extract", 0.0, set_name=set_name)  # shared with another backbone
            feature_sets[set_name] = _FeatureSet(extractions[key].as_derived(entry.derive), cfg.stream_batch,
                                                 cfg.stream)
        bb_rows, bb_failures, bb_scores = _run_backbone(ctx, entry, plan[entry.name], feature_sets)
        for set_name, fs in feature_sets.items():
            if fs.extraction.derive_seconds:
                timing(entry.name, "derive", fs.extraction.derive_seconds, set_name=set_name)
        rows += bb_rows
        failures += bb_failures
        score_files[entry.name] = bb_scores
        if all(_network_key(e.network) != network for e in entries[position + 1:]):
            for key in [k for k in extractions if k[0] == network]:
                del extractions[key]  # no later backbone shares these features: free them

    result = BenchResult(
        output=out, rows=rows, failures=failures, timings=timings, datasets=datasets_info,
        config=cfg.to_dict() | {"classes": classes}, environment=environment(started_at), scores=score_files)
    write_results(result)
    return result


def _labels_aligned(sets: dict[str, _Set], classes: list[str] | None) -> bool:
    """Whether ID test labels, ID fit labels and ``classes`` index the same classes (for ID accuracy)."""
    names = sets["id"].source.class_names
    if "id_fit" in sets:
        fit_names = sets["id_fit"].source.class_names
        if names is not None and fit_names is not None and list(names) != list(fit_names):
            return False
    # classes may be prompt-friendly renamings of the ID class names: same length = same order.
    return classes is None or names is None or len(classes) == len(names)


def _detector_plan(selection: Any, backbones: Sequence[str], available: Mapping[str, type]) -> dict[str, list[str]]:
    """Detector names per backbone name, from one selection for all or a mapping per backbone."""
    if not isinstance(selection, Mapping):
        names = _detector_names(selection, available)
        return {b: names for b in backbones}
    problems = [f"no backbone named {k!r}" for k in selection if k not in backbones]
    problems += [f"no detectors given for {b!r}" for b in backbones if b not in selection]
    if problems:
        raise ValueError("detectors per backbone: " + "; ".join(problems) + f" (backbones: {list(backbones)})")
    return {b: _detector_names(selection[b], available) for b in backbones}


def _detector_names(selection: Sequence[str] | str, available: Mapping[str, type]) -> list[str]:
    if isinstance(selection, str):
        selection = [s.strip() for s in selection.split(",") if s.strip()]
    if list(selection) == ["all"]:
        return list(available)
    unknown = [n for n in selection if n not in available]
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; registered: {', '.join(available)}")
    return list(dict.fromkeys(selection))


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


@dataclass
class _Context:
    """What every backbone's detectors share in one benchmark run."""

    cfg: BenchConfig
    sets: dict[str, _Set]
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


def _run_backbone(ctx: _Context, entry: _BackboneEntry, names: list[str],
                  feature_sets: dict[str, _FeatureSet]) -> tuple[list[dict], list[dict], dict[str, str]]:
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


def _plan_detectors(ctx: _Context, entry: _BackboneEntry, names: list[str], feature_sets: dict[str, _FeatureSet],
                    fail: _Failures) -> list[tuple[str, Any]]:
    """Each detector created and checked against what this backbone and the data provide."""
    provided = _provided_fields(feature_sets["id"])
    fit = feature_sets.get("id_fit")
    have_labels = fit is not None and fit.labels is not None and not (fit.labels < 0).any()
    planned = []
    for name in names:
        try:
            detector = build_detector(name, ctx.cfg.detector_params.get(name, {}), ctx.classes)
        except DetectorError as err:
            fail(name, "plan" if "class names" in str(err) or "parameter" in str(err) else "create", str(err))
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

    def __init__(self, fit: _FeatureSet | None, backbone: str, timing: Callable[..., None]) -> None:
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


def _fit_run(ctx: _Context, entry: _BackboneEntry, name: str, detector: Any, fit_features: _LazyFit,
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
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        fit_detector(detector, features, labels, text_encoder=entry.backbone)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        fail(name, "fit", _reason(err))
        return None
    run = _Run(name, detector, "model" if needs.model else "features", note=note)
    run.fit_seconds = time.perf_counter() - started
    run.fit_cpu = time.process_time() - cpu_started
    return run


def _score_runs(ctx: _Context, entry: _BackboneEntry, runs: list[_Run], feature_sets: dict[str, _FeatureSet],
                predictor: Any, fail: _Failures) -> np.ndarray | None:
    """Every detector scores every test set batch by batch; returns the shared ID predictions."""
    shared_predictions: list[np.ndarray] = []
    feature_runs = [r for r in runs if r.kind == "features"]
    for set_name in [n for n in feature_sets if n != "id_fit"]:
        for feats in feature_sets[set_name].batches():
            if set_name == "id" and predictor is not None:
                shared_predictions.append(predictor(feats))
            for run in list(feature_runs):
                try:
                    started, cpu_started = time.perf_counter(), time.process_time()
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
    for run in [r for r in runs if r.kind == "model"]:
        try:
            _score_with_model(run, entry, feature_sets, ctx.sets, ctx.cfg)
        except Exception as err:  # noqa: BLE001
            fail(run.name, "score (model)", _reason(err))
            runs.remove(run)
    return np.concatenate(shared_predictions) if shared_predictions else None


def _result_rows(ctx: _Context, entry: _BackboneEntry, runs: list[_Run], feature_sets: dict[str, _FeatureSet],
                 shared: np.ndarray | None, predictor: Any, fail: _Failures) -> tuple[list[dict], dict[str, str]]:
    """Metrics per (detector, OOD set) and the near/far/all averages; scores saved per detector."""
    rows: list[dict[str, Any]] = []
    score_files: dict[str, str] = {}
    id_labels = feature_sets["id"].labels if ctx.labels_aligned else None
    ood_names = [n for n in feature_sets if n not in ("id", "id_fit")]
    for run in runs:
        scores = {k: np.concatenate(v) for k, v in run.scores.items()}
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
            m = ood_metrics(scores["id"], scores[set_name])
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


def _return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``; no-op off glibc).

    By default glibc raises the threshold whenever a large buffer is freed, so after the first batch
    the per-batch feature arrays of a streaming run come from the heap, whose freed pages glibc
    keeps: the resident size then creeps up with the number of batches although the live data do
    not grow (measured in docs/scale.md). With a fixed threshold every buffer above 1 MiB is
    mmap-ed and handed back when freed. This changes the allocator for the whole process; it is
    done only for streaming runs, whose point is bounded memory.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 20))  # M_MMAP_THRESHOLD = -3 in malloc.h
    except (OSError, AttributeError):
        pass


def _provided_fields(feature_set: _FeatureSet) -> set[str]:
    """Features fields this backbone fills (read from the first batch of the ID set)."""
    first = next(iter(feature_set.batches()), None)
    return set() if first is None else first.available()


def _score_with_model(run: _Run, entry, feature_sets, sets, cfg) -> None:
    """Model-in-the-loop scoring: re-decode the images that extraction read, preprocess, run the network."""
    from tqdm.auto import tqdm

    from oodscope.backbones.preprocess import preprocess

    parts = entry.backbone.classifier_parts()
    started, cpu_started = time.perf_counter(), time.process_time()
    for set_name, fs in feature_sets.items():
        if set_name == "id_fit":
            continue
        source = Subset(sets[set_name].source, fs.extraction.indices)
        out = []
        with tqdm(total=len(source), unit="img", desc=f"{entry.name} {run.name} {set_name}",
                  disable=not cfg.progress, dynamic_ncols=True) as bar:
            for start in range(0, len(source), cfg.model_batch_size):
                images = [source.load(i) for i in range(start, min(start + cfg.model_batch_size, len(source)))]
                batch = preprocess(images, entry.backbone.input_spec, parts.device)
                out.append(run.detector.score_images(parts, batch))
                bar.update(len(images))
        run.scores[set_name] = out
    run.score_seconds = time.perf_counter() - started
    run.score_cpu = time.process_time() - cpu_started


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


