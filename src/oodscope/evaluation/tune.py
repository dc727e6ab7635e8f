"""Hyper-parameter selection on validation ID/OOD data (OpenOOD's "automatic parameter search").

For every combination of a grid, :func:`tune` creates the detector, fits it on ``id_fit`` (the
in-distribution *training* features) when the method needs fitting, scores the validation ID and
validation OOD features, and keeps the combination with the best validation metric. Test data is
never an argument: selecting on the data you report on inflates the result.

Conventions, as in OpenOOD v1.5 (``evaluation_api/evaluator.py``: ``hyperparam_search``):

- the grid is a Cartesian product, enumerated with :func:`itertools.product` over the grid's keys
  in order (first key varies slowest);
- the default metric is AUROC; ties keep the first combination in that order;
- default grids are the ``postprocessor_sweep`` lists of OpenOOD v1.5's
  ``configs/postprocessors/*.yml`` where they exist (see :data:`GRID_SOURCES` for each entry).

Model-in-the-loop detectors (ODIN, GradNorm, RankFeat) need images and the classifier:
:func:`tune_model_based` runs the same search with ``score_images``.

This module registers no detector.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodscope.detectors.base import ArrayLike, Detector, DetectorError, FeatureInput, create, registered
from oodscope.detectors.fitting import class_needs, fit_detector
from oodscope.evaluation.metrics import ood_metrics

__all__ = [
    "DEFAULT_GRIDS",
    "GRID_SOURCES",
    "METRICS",
    "TuneResult",
    "default_grid",
    "tune",
    "tune_model_based",
]

_OPENOOD = "OpenOOD v1.5 configs/postprocessors/{}.yml postprocessor_sweep"
_ASH_PERCENTILES = [65, 70, 75, 80, 85, 90, 95]

#: Default search space per detector name: parameter -> candidate values.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "energy": {"temperature": [1]},
    "temperature_msp": {"temperature": [1, 10, 100, 1000]},
    "odin": {"temperature": [1, 10, 100, 1000], "epsilon": [0.0014, 0.0028]},
    "gen": {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]},
    "react": {"percentile": [85, 90, 95, 99]},
    "ash_p": {"percentile": list(_ASH_PERCENTILES)},
    "ash_b": {"percentile": list(_ASH_PERCENTILES)},
    "ash_s": {"percentile": list(_ASH_PERCENTILES)},
    "scale": {"percentile": [65, 70, 75, 80, 85, 90, 95]},
    "dice": {"p": [90]},
    "knn": {"k": [50, 100, 200, 500, 1000]},
    "vim": {"dim": [256, 1000]},
    "nnguide": {"k": [10, 100]},
    "nci": {"alpha": [0.0001, 0.001, 0.01, 0.1]},
    "gmm": {"n_components": [1, 5, 10, 20, 50]},
    "mahalanobis": {},
    "relative_mahalanobis": {},
    "gradnorm": {},
    "rankfeat": {},
}

#: Where each default grid comes from.
GRID_SOURCES: dict[str, str] = {
    "energy": _OPENOOD.format("ebo"),
    "temperature_msp": "OpenOOD v1.5 odin.yml temperature sweep (temp_scaling.yml has none)",
    "odin": _OPENOOD.format("odin") + " (its 'noise' is our 'epsilon')",
    "gen": _OPENOOD.format("gen"),
    "react": _OPENOOD.format("react"),
    "ash_p": _OPENOOD.format("ash") + " (one list for all ASH variants)",
    "ash_b": _OPENOOD.format("ash") + " (one list for all ASH variants)",
    "ash_s": _OPENOOD.format("ash") + " (one list for all ASH variants)",
    "scale": _OPENOOD.format("scale"),
    "dice": _OPENOOD.format("dice") + " (a single value: APS_mode is off there)",
    "knn": _OPENOOD.format("knn") + " (its 'K' is our 'k')",
    "vim": _OPENOOD.format("vim"),
    "nnguide": (
        "OpenOOD v1.5 nnguide.yml K=100 plus the authors' k=10; OpenOOD's alpha=0.01 (our 'subsample') "
        "suits the 1.28M-image ImageNet train set, so the bank keeps its default (all of id_fit)"
    ),
    "nci": _OPENOOD.format("nci"),
    "gmm": "oodscope choice around OpenOOD gmm.yml's 50 components (gmm.yml has no sweep)",
    "mahalanobis": "no hyper-parameters (OpenOOD mds.yml has no sweep)",
    "relative_mahalanobis": "no hyper-parameters (OpenOOD rmds.yml has no sweep)",
    "gradnorm": "no sweep in OpenOOD gradnorm.yml (temperature 1, as in the paper)",
    "rankfeat": "no sweep in OpenOOD rankfeat.yml (temperature 1, as in the paper)",
}

#: Metric name -> True when higher is better (values from ``oodscope.evaluation.metrics.ood_metrics``).
METRICS: dict[str, bool] = {
    "auroc": True,
    "aupr_in": True,
    "aupr_out": True,
    "fpr95": False,
    "detection_error": False,
}


@dataclass
class TuneResult:
    """Outcome of a search: the winner, every row of the grid, and the winner fitted."""

    name: str
    metric: str
    best_params: dict[str, Any]
    best_value: float
    #: One dict per combination in search order: ``params``, every metric in :data:`METRICS`
    #: (NaN when the combination failed) and ``error`` (None, or why the combination failed).
    table: list[dict[str, Any]]
    detector: Detector
    fixed: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (everything but the fitted detector)."""
        return {
            "name": self.name,
            "metric": self.metric,
            "best_params": self.best_params,
            "best_value": self.best_value,
            "fixed": self.fixed,
            "table": self.table,
        }


def default_grid(detector_name: str) -> dict[str, list[Any]]:
    """The default search space of a detector (a copy); ``{}`` for methods without hyper-parameters."""
    if detector_name in DEFAULT_GRIDS:
        return {k: list(v) for k, v in DEFAULT_GRIDS[detector_name].items()}
    params = _init_params(_detector_class(detector_name))
    if not params:
        return {}
    raise DetectorError(
        f"tune: no default grid for {detector_name!r} (parameters: {', '.join(params)}); pass grid={{...}}"
    )


def tune(
    detector_name: str,
    id_val: FeatureInput,
    ood_val: FeatureInput,
    *,
    id_fit: FeatureInput | None = None,
    fit_labels: ArrayLike | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    fixed: Mapping[str, Any] | None = None,
    metric: str = "auroc",
    text_encoder: Any = None,
) -> TuneResult:
    """Pick a feature-based detector's hyper-parameters on validation ID / OOD features.

    ``id_fit`` (and ``fit_labels`` for methods that need labels) is what each candidate is fitted
    on; it is required for methods that need fitting, and it should be training data, disjoint from
    ``id_val``. Zero-shot and few-shot methods also need ``text_encoder`` (the vision-language
    backbone; its text embeddings are cached, so a grid does not re-encode the class names) and
    their ``classes`` in ``fixed``; zero-shot methods need no ``id_fit``. ``grid`` maps parameter
    names to candidate values (default: :func:`default_grid`); ``fixed`` holds parameters passed
    unchanged to every candidate. ``metric`` is one of :data:`METRICS`. Returns a
    :class:`TuneResult` whose ``detector`` is the best one, fitted.
    """
    needs = class_needs(_detector_class(detector_name))
    if needs.model:
        raise DetectorError(
            f"tune: {detector_name} scores images through the classifier, not cached features; "
            "use tune_model_based(detector_name, parts, id_images, ood_images, ...)"
        )
    if id_fit is not None and (id_fit is id_val or id_fit is ood_val):
        raise DetectorError("tune: id_fit must not be the validation data (the selection would be biased)")
    if needs.text_encoder and text_encoder is None:
        raise DetectorError(f"tune: {detector_name} needs text_encoder=... (a vision-language backbone)")
    if needs.features and id_fit is None:
        raise DetectorError(
            f"tune: {detector_name} must be fitted on in-distribution training data: pass id_fit=... "
            "(it is never fitted on the validation data)"
        )
    if needs.labels and fit_labels is None:
        raise DetectorError(f"tune: {detector_name} needs the class labels of id_fit: pass fit_labels=...")

    def build_and_score(params: dict[str, Any]) -> tuple[Detector, np.ndarray, np.ndarray]:
        detector = fit_detector(create(detector_name, **params), id_fit, fit_labels, text_encoder=text_encoder)
        return detector, detector.score(id_val), detector.score(ood_val)

    return _search(detector_name, grid, fixed, metric, build_and_score)


def tune_model_based(
    detector_name: str,
    parts: Any,
    id_images: Any,
    ood_images: Any,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    fixed: Mapping[str, Any] | None = None,
    metric: str = "auroc",
    batch_size: int | None = None,
) -> TuneResult:
    """:func:`tune` for model-in-the-loop detectors (``requires == ("model",)``).

    ``parts`` is ``backbone.classifier_parts()``; ``id_images`` / ``ood_images`` are validation
    batches, normalized as the backbone receives them (anything ``score_images`` accepts, but not a
    one-shot iterator: every combination reads them again).
    """
    if not class_needs(_detector_class(detector_name)).model:
        raise DetectorError(f"tune_model_based: {detector_name} works on features; use tune(...)")

    def build_and_score(params: dict[str, Any]) -> tuple[Detector, np.ndarray, np.ndarray]:
        detector = fit_detector(create(detector_name, **params))
        return (
            detector,
            detector.score_images(parts, id_images, batch_size=batch_size),
            detector.score_images(parts, ood_images, batch_size=batch_size),
        )

    return _search(detector_name, grid, fixed, metric, build_and_score)


# --------------------------------------------------------------------- search
def _search(
    name: str,
    grid: Mapping[str, Sequence[Any]] | None,
    fixed: Mapping[str, Any] | None,
    metric: str,
    build_and_score: Callable[[dict[str, Any]], tuple[Detector, np.ndarray, np.ndarray]],
) -> TuneResult:
    if metric not in METRICS:
        raise DetectorError(f"tune: metric must be one of {sorted(METRICS)}, got {metric!r}")
    higher_is_better = METRICS[metric]
    grid = default_grid(name) if grid is None else {k: list(v) for k, v in grid.items()}
    fixed = dict(fixed or {})
    _check_grid(name, grid, fixed)

    keys = list(grid)
    table: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], Detector] | None = None
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        row: dict[str, Any] = {"params": params, **{m: math.nan for m in METRICS}, "error": None}
        table.append(row)
        try:
            detector, id_scores, ood_scores = build_and_score({**fixed, **params})
        except DetectorError as err:  # e.g. a grid value this data cannot take (vim dim > D)
            row["error"] = str(err)
            continue
        if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
            row["error"] = "non-finite scores"
            continue
        values_ = ood_metrics(id_scores, ood_scores)
        row.update({m: float(values_[m]) for m in METRICS})
        value = row[metric]
        if best is None or (value > best[0] if higher_is_better else value < best[0]):
            best = (value, params, detector)

    if best is None:
        errors = "; ".join(f"{r['params']}: {r['error']}" for r in table[:5])
        raise DetectorError(f"tune: every combination failed for {name!r}: {errors}")
    return TuneResult(
        name=name,
        metric=metric,
        best_params=dict(best[1]),
        best_value=best[0],
        table=table,
        detector=best[2],
        fixed=fixed,
    )


def _check_grid(name: str, grid: dict[str, list[Any]], fixed: dict[str, Any]) -> None:
    accepted = _init_params(_detector_class(name))
    unknown = [k for k in [*grid, *fixed] if k not in accepted]
    if unknown:
        raise DetectorError(
            f"tune: {name} has no parameter(s) {unknown}; its parameters are {accepted or 'none'}"
        )
    both = sorted(set(grid) & set(fixed))
    if both:
        raise DetectorError(f"tune: {both} are both in grid and fixed")
    empty = [k for k, v in grid.items() if len(v) == 0]
    if empty:
        raise DetectorError(f"tune: grid entries {empty} have no candidate values")


def _detector_class(name: str) -> type[Detector]:
    classes = registered()
    if name not in classes:
        raise DetectorError(f"unknown detector {name!r}; registered: {', '.join(classes)}")
    return classes[name]


def _init_params(cls: type[Detector]) -> list[str]:
    signature = inspect.signature(cls.__init__)
    return [
        n
        for n, p in signature.parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
