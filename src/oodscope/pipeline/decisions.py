"""From scores to decisions: calibrating an :class:`~oodscope.pipeline.model.OODModel` on held-out ID
data and turning a chunk of scored images into :class:`Predictions`.

Calibration fits conformal p-values and the threshold at ID acceptance ``1 - alpha`` from the
detector's scores of held-out ID images (never its fit images: refused by content id), and, when the
model has a class head and enough labelled calibration images, conformal prediction sets. Randomized
set scores (APS/RAPS) draw each image's uniform from its content
(:func:`~oodscope.calibration.split.content_uniforms`), so an image gets the same set at calibration
and at test time, in any batch and after save -> load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from oodscope.calibration import (
    ConformalPValues,
    PredictionSetCalibrator,
    check_disjoint,
    fit_threshold,
    min_calibration_size,
)
from oodscope.calibration.split import content_uniforms
from oodscope.pipeline.heads import ZeroShotHead
from oodscope.pipeline.inputs import ModelData, OODModelError, unmatched_names
from oodscope.pipeline.predictions import Predictions

if TYPE_CHECKING:
    from oodscope.pipeline.model import OODModel


def unmatched_notes(folder_names: list[str] | None, classes: list[str] | None) -> list[str]:
    """Which class names and calibration folders did not match (their images get no class)."""
    folders, names = unmatched_names(folder_names, classes)
    notes = []
    if names:
        notes.append(f"class name(s) {', '.join(names)} match no calibration folder: no calibration image of "
                     "theirs has a known class")
    if folders:
        notes.append(f"calibration folder(s) {', '.join(folders)} match no class name: their images calibrate "
                     "the OOD threshold but not the prediction sets")
    return notes


def calibrate_on(model: OODModel, data: ModelData, notes: list[str] | None = None) -> None:
    """Conformal p-values, threshold and prediction sets of ``model`` from held-out ID data."""
    fit_hex = [h.hex() for h in model.fit_ids_]
    cal_hex = [h.hex() for h in data.hashes]
    try:
        check_disjoint(fit_hex, cal_hex)
    except ValueError as err:
        shared = set(fit_hex) & set(cal_hex)
        examples = [n for n, h in zip(data.item_ids, cal_hex, strict=True) if h in shared][:5]
        raise OODModelError(f"{err} Calibration images with the content of a fit image: {', '.join(examples)}") \
            from None
    features, labels = data.features, data.labels
    n = len(features)
    need = min_calibration_size(1.0 - model.alpha)
    if n < need:
        raise OODModelError(
            f"{n} calibration image(s) are too few for alpha = {model.alpha:g}: the conformal threshold needs "
            f"n >= (1 - alpha) / alpha, i.e. at least {need} held-out ID images"
        )
    if isinstance(model.head_, ZeroShotHead) and model._head_scale_from_features and features.logit_scale is not None:
        model.head_.logit_scale = float(features.logit_scale)  # the backbone's own temperature
    scores = model.detector_scores(features)
    if not np.isfinite(scores).all():
        raise OODModelError(f"the detector gave {int((~np.isfinite(scores)).sum())} non-finite calibration "
                            "score(s); calibration scores must be finite")
    model.pvalues_ = ConformalPValues.fit(scores)
    model.threshold_ = fit_threshold(scores, 1.0 - model.alpha)
    model.set_calibrator_ = None
    model.notes_ = list(notes or [])
    n_labelled = 0 if labels is None else int((labels >= 0).sum())
    if model.prediction_sets and model.head_ is not None:
        need_sets = min_calibration_size(1.0 - model.set_alpha)
        if n_labelled < need_sets:
            model.notes_.append(
                f"no prediction sets: {n_labelled} calibration image(s) have a known ID class, "
                f"{need_sets} are needed for set_alpha = {model.set_alpha:g}"
            )
        else:
            rows = np.flatnonzero(labels >= 0)
            calibrator = PredictionSetCalibrator(model.prediction_sets, model.set_alpha,
                                                 **model.prediction_set_params)
            model.set_calibrator_ = calibrator.fit(model.head_.probabilities(features.subset(rows)), labels[rows],
                                                   rng=content_uniforms(model.seed, [data.keys[i] for i in rows]))
    elif model.prediction_sets and model.head_ is None:
        model.notes_.append("no prediction sets: the model has no class head")
    model.info_["calibration"] = {
        "n": n, "n_labelled": n_labelled, "source": data.description, "failed": len(data.failures),
        "fraction": None, "failures": [[f.item_id, f.reason] for f in data.failures[:20]], "seed": model.seed,
    }


def predict_chunk(model: OODModel, data: ModelData, precomputed: np.ndarray | None = None) -> Predictions:
    """Predictions for one chunk: scored rows and error rows, in input order (``precomputed``: the detector's
    scores of ``data.features`` when already computed, e.g. with the anomaly maps)."""
    n, k = data.n, len(model.class_names_) if model.class_names_ else 0
    scores, p = np.full(n, np.nan), np.full(n, np.nan)
    ood = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    probs = np.full((n, k), np.nan) if model.head_ is not None else None
    mask = np.zeros((n, k), dtype=bool) if model.set_calibrator_ is not None else None
    for f in data.failures:
        errors[f.index] = f.reason
    if data.features is not None:
        idx = data.indices
        s = model.detector_scores(data.features) if precomputed is None else np.asarray(precomputed, np.float64)
        scores[idx] = s
        for j in np.flatnonzero(np.isnan(s)):
            errors[idx[j]] = "the detector returned NaN"
        ok = ~np.isnan(s)
        if model.is_calibrated and ok.any():
            p[idx[ok]] = model.pvalues_.p_values(s[ok])
            ood[idx[ok]] = model.pvalues_.decide(s[ok], model.alpha)
        if probs is not None:
            probs[idx] = model.head_.probabilities(data.features)
            if mask is not None:
                mask[idx] = model.set_calibrator_.predict_sets(probs[idx], rng=content_uniforms(model.seed, data.keys))
    return Predictions(item_ids=_row_ids(data), scores=scores, p_values=p, ood=ood, errors=errors,
                       alpha=model.alpha, class_names=model.class_names_, probabilities=probs, set_mask=mask,
                       calibrated=model.is_calibrated)


def _row_ids(data: ModelData) -> list[str]:
    """Item ids of every row of the chunk, read or not, in input order."""
    ids = [""] * data.n
    for i, name in zip(data.indices, data.item_ids, strict=True):
        ids[i] = name
    for f in data.failures:
        ids[f.index] = f.item_id
    return ids
