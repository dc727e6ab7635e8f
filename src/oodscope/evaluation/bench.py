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
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import derived_from
from oodscope.evaluation.bench_config import (
    BenchConfig,
    OODSet,
    describe,
    load_config,
    parse_ood_flag,
    spread,
)
from oodscope.evaluation.bench_output import environment, write_results
from oodscope.evaluation.bench_run import (
    BackboneEntry,
    FeatureSet,
    RunContext,
    SetPlan,
    run_backbone,
)
from oodscope.evaluation.tables import markdown, ranked_tables
from oodscope.features.extract import backbone_config, extract
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

def _plan_sets(cfg: BenchConfig) -> tuple[dict[str, SetPlan], list[str] | None]:
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
    sets = {"id": SetPlan("id", "id", None, _limited(resolve_images(id_spec), cfg.limit), describe(id_spec))}
    if fit_spec is not None:
        limit = cfg.fit_limit if cfg.fit_limit is not None else cfg.limit
        fit_source = _limited(resolve_images(fit_spec), limit)
        sets["id_fit"] = SetPlan("id_fit", "id_fit", None, fit_source, describe(fit_spec))
    for o in oods:
        if o.kind not in (None, "near", "far"):
            raise ValueError(f"OOD set {o.name}: kind must be 'near', 'far' or empty, got {o.kind!r}")
        sets[o.name] = SetPlan(o.name, "ood", o.kind, _limited(resolve_images(o.data), cfg.limit), describe(o.data))
    if classes is None:
        classes = sets["id"].source.class_names
    return sets, (list(classes) if classes is not None else None)


def _limited(source: ImageSource, limit: int | None) -> ImageSource:
    idx = spread(len(source), limit)
    return source if len(idx) == len(source) else Subset(source, idx)


# ============================================================================ backbones
def _plan_backbones(cfg: BenchConfig) -> list[BackboneEntry]:
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
        entries.append(BackboneEntry(name, backbone, network, derive, _network_key(network)))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"backbones listed twice: {names}")
    return entries


def _network_key(network: Any) -> str:
    """Backbones whose networks compute the same features share one extraction (and its cache)."""
    return repr(sorted(backbone_config(network).items()))


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
    if cfg.anomaly:  # anomaly mode: categories of good train / mixed test images, no ID / OOD sets
        from oodscope.evaluation.bench_anomaly import run_anomaly_benchmark

        return run_anomaly_benchmark(cfg)
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

    ctx = RunContext(cfg, sets, classes, labels_aligned, out, timing, log)
    for position, entry in enumerate(entries):
        log(f"backbone {entry.name}")
        network = entry.network_key
        feature_sets: dict[str, FeatureSet] = {}
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
            feature_sets[set_name] = FeatureSet(extractions[key].as_derived(entry.derive), cfg.stream_batch,
                                                 cfg.stream)
        bb_rows, bb_failures, bb_scores = run_backbone(ctx, entry, plan[entry.name], feature_sets)
        for set_name, fs in feature_sets.items():
            if fs.extraction.derive_seconds:
                timing(entry.name, "derive", fs.extraction.derive_seconds, set_name=set_name)
        rows += bb_rows
        failures += bb_failures
        score_files[entry.name] = bb_scores
        if all(e.network_key != network for e in entries[position + 1:]):
            for key in [k for k in extractions if k[0] == network]:
                del extractions[key]  # no later backbone shares these features: free them

    result = BenchResult(
        output=out, rows=rows, failures=failures, timings=timings, datasets=datasets_info,
        config=cfg.to_dict() | {"classes": classes}, environment=environment(started_at), scores=score_files)
    write_results(result)
    return result


def _labels_aligned(sets: dict[str, SetPlan], classes: list[str] | None) -> bool:
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


