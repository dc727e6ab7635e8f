"""Saving, loading and describing an :class:`~oodscope.pipeline.model.OODModel`.

A model directory holds ``model.json`` (backbone id and weights fingerprint, method and
parameters, classes, settings, calibration summary), ``calibration.safetensors`` (the calibration
scores and the content ids of the fit images), ``detector/`` and ``head/`` — JSON and safetensors
only, nothing is unpickled. It may also carry exported networks, ``export/<runtime>/`` (written by
``oodscope export``, read by ``OODModel.load(..., runtime=...)``; see
:mod:`oodscope.backbones.exported`).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodscope.calibration import ConformalPValues, PredictionSetCalibrator, Threshold, fit_threshold
from oodscope.calibration.split import DIGEST_BYTES
from oodscope.pipeline.heads import HEAD_ARRAYS, HEAD_CONFIG, load_head
from oodscope.pipeline.inputs import OODModelError

if TYPE_CHECKING:
    from oodscope.pipeline.model import OODModel

FORMAT = "oodscope-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
ARRAYS_FILE = "calibration.safetensors"
DETECTOR_DIR = "detector"
HEAD_DIR = "head"

#: Constructor settings written to ``model.json`` and read back by :func:`load_model`.
SETTINGS = ("prediction_sets", "set_alpha", "prediction_set_params", "head", "head_params",
            "calibration_fraction", "seed", "preset")


def summary(model: OODModel) -> dict[str, Any]:
    """JSON-able description: backbone, method, classes, data sizes, calibration."""
    from oodscope import __version__

    backbone = {"spec": model.backbone_spec, "id": None, "fingerprint": None}
    if model._backbone is not None or model.backbone_spec is not None:
        backbone["id"] = model.backbone_id
        backbone["fingerprint"] = model._saved_fingerprint or model.backbone.weights_fingerprint()
    detector = model.detector_
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "oodscope_version": model.info_.get("oodscope_version", __version__),
        "created": model.info_.get("created"),
        "backbone": backbone,
        "method": model.method,
        "preset": model.preset,  # the method_params below are already resolved from it
        "method_params": detector.get_params() if detector is not None else model.method_params,
        "kind": model.kind.value,
        "zero_shot": model.zero_shot,
        "fit_choices": None if detector is None else detector.fit_info_.get("auto"),
        "classes": model.class_names_,
        "alpha": model.alpha,
        "head": None if model.head_ is None else model.head_.kind,
        "head_description": None if model.head_ is None else model.head_.describe(),
        "fit": model.info_.get("fit"),
        "calibration": model.info_.get("calibration"),
        "threshold": None if model.threshold_ is None else model.threshold_.to_dict(),
        "prediction_sets": None if model.set_calibrator_ is None else model.set_calibrator_.to_dict(),
        "notes": list(model.notes_),
    }


def save_model(model: OODModel, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``model.json``, ``calibration.safetensors``, ``detector/`` and ``head/``.

    With ``overwrite=False`` a directory that already holds files is refused.
    """
    from safetensors.numpy import save_file

    from oodscope import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OODModelError(f"{directory} exists and is not a directory")
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise OODModelError(f"{directory} is not empty; choose another directory or overwrite it explicitly")
    directory.mkdir(parents=True, exist_ok=True)
    model.info_.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    model.info_.setdefault("oodscope_version", __version__)
    model.detector_.save(directory / DETECTOR_DIR, backbone_id=model.backbone_id)
    if model.head_ is not None:
        model.head_.save(directory / HEAD_DIR)
    else:  # a head left by an earlier model saved here must not look like part of this one
        for name in (HEAD_CONFIG, HEAD_ARRAYS):
            (directory / HEAD_DIR / name).unlink(missing_ok=True)
    fit_ids = np.frombuffer(b"".join(model.fit_ids_), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    arrays = {"fit_ids": np.ascontiguousarray(fit_ids)}
    if model.pvalues_ is not None:
        arrays["calibration_scores"] = model.pvalues_.cal_scores
    save_file(arrays, str(directory / ARRAYS_FILE))
    config = summary(model)
    config.update(method_params=model.detector_.get_params(),
                  settings={name: getattr(model, name) for name in SETTINGS})
    (directory / MODEL_FILE).write_text(json.dumps(config, indent=2))
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a saved model, checked for format and version."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise OODModelError(f"{directory}: no {MODEL_FILE}; not a saved oodscope model")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise OODModelError(f"{path}: not readable as JSON ({err})") from None
    if config.get("format") != FORMAT:
        raise OODModelError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise OODModelError(f"{path}: format version {config.get('format_version')} is not supported "
                            f"(this oodscope reads version {FORMAT_VERSION})")
    return config


def load_model(cls: type[OODModel], directory: str | os.PathLike, *, backbone: Any = None,
               verify_backbone: bool = True, runtime: str = "torch", **options: Any) -> OODModel:
    """Load a saved model (see :meth:`OODModel.load`)."""
    from safetensors.numpy import load_file

    from oodscope.detectors import load as load_detector
    from oodscope.detectors import registered

    directory = Path(directory)
    config = read_config(directory)
    saved = config["backbone"]
    if backbone is None:
        backbone = saved.get("spec")
        if backbone is None:
            raise OODModelError(
                f"{directory} was fitted with a backbone object (id {saved['id']!r}); pass that backbone "
                "to OODModel.load(..., backbone=...)"
            )
    settings = {k: v for k, v in config.get("settings", {}).items() if k in SETTINGS}
    device = options.pop("device", None)
    # A model.json written before presets has no "preset" setting (None); parameters a later version
    # renamed are translated by the detector class (upgrade_params).
    method_params = config["method_params"]
    detector_cls = registered().get(config["method"])
    if detector_cls is not None:
        method_params = detector_cls.upgrade_params(method_params)
    model = cls(backbone=backbone, method=config["method"], method_params=method_params,
                alpha=config["alpha"], backbone_options={"device": device} if device else None,
                **settings, **options)
    if runtime not in (None, "torch"):  # the network runs from export/<runtime>, checked against model.json
        from oodscope.backbones.exported import ExportError, attach_saved_export

        try:
            model._backbone, model.info_["runtime"] = attach_saved_export(model.backbone, directory, runtime,
                                                                           saved["id"], saved.get("fingerprint"))
        except ExportError as err:
            raise OODModelError(str(err)) from None
        verify_backbone = False
    if model.backbone_id != saved["id"]:
        raise OODModelError(
            f"{directory} was fitted on backbone {saved['id']!r} (weights fingerprint {saved['fingerprint']}), "
            f"not {model.backbone_id!r}: its scores and calibration are meaningless on another backbone"
        )
    if verify_backbone:
        fingerprint = model.backbone.weights_fingerprint()
        if fingerprint != saved["fingerprint"]:
            raise OODModelError(
                f"{directory} was fitted on backbone {saved['id']!r} with weights fingerprint "
                f"{saved['fingerprint']}, but the backbone here has weights {fingerprint}: different weights "
                "give different scores, so the calibration would not hold"
            )
    model._saved_fingerprint = saved["fingerprint"]
    model.detector_ = load_detector(directory / DETECTOR_DIR, expected_backbone_id=saved["id"])
    model.class_names_ = config.get("classes")
    model.head_ = load_head(directory / HEAD_DIR) if config.get("head") else None
    arrays = load_file(str(directory / ARRAYS_FILE))
    model.fit_ids_ = [bytes(row) for row in arrays["fit_ids"]]
    if "calibration_scores" in arrays:
        scores = arrays["calibration_scores"]
        model.pvalues_ = ConformalPValues.fit(scores)
        model.threshold_ = fit_threshold(scores, 1.0 - model.alpha)
    if config.get("prediction_sets"):
        model.set_calibrator_ = PredictionSetCalibrator.from_dict(config["prediction_sets"])
    model.info_ = {**model.info_, "fit": config.get("fit"), "created": config.get("created"),
                   "oodscope_version": config.get("oodscope_version")}
    if config.get("calibration"):
        model.info_["calibration"] = config["calibration"]
    model.notes_ = list(config.get("notes", []))
    return model


# ------------------------------------------------------------------------------------------ text
def _format_threshold(t: Threshold, alpha: float) -> list[str]:
    lo, hi = t.value_interval
    lo_text = "-inf" if lo is None else f"{lo:.6g}"
    hi_text = "+inf" if hi is None else f"{hi:.6g}"
    return [
        f"threshold      t = {t.value:.6g}: score > t (p-value <= alpha = {alpha:g}) is flagged OOD",
        f"               the k-th smallest of n = {t.n} ID calibration scores, k = ceil((n+1)(1-alpha)) = {t.rank}",
        f"ID acceptance  {t.acceptance_mean:.4f} on average over calibration sets (target >= {t.target:g}); "
        f"for {t.acceptance_level:.0%} of calibration sets between {t.acceptance_interval[0]:.4f} and "
        f"{t.acceptance_interval[1]:.4f} (Beta({t.rank}, {t.n + 1 - t.rank}))",
        f"t estimates    the ID score {t.target:g}-quantile: {t.value_interval_coverage:.1%} interval "
        f"[{lo_text}, {hi_text}] (order statistics {_rank(t.value_interval_ranks[0])}, "
        f"{_rank(t.value_interval_ranks[1])})",
    ]


def _rank(k: Any) -> str:
    return "unbounded" if k is None else str(k)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v, sort_keys=True) if v is not None else "(not set)"


def _kind_label(kind: str) -> str:
    from oodscope.detectors.kinds import DetectorKind

    try:
        return DetectorKind(kind).label
    except ValueError:
        return kind.replace("_", "-")


def describe_summary(s: dict[str, Any]) -> str:
    """Human-readable text of a model summary (or of a saved ``model.json``, fields may be missing);
    never prints ``None``."""
    bb = s.get("backbone") or {}
    params = {k: v for k, v in (s.get("method_params") or {}).items() if k != "classes" and v is not None}
    kind = s.get("kind")
    alpha = s.get("alpha")
    at_alpha = f"alpha = {alpha:g}" if isinstance(alpha, int | float) else "alpha"
    lines = [
        f"backbone       {bb.get('id') or bb.get('spec') or 'a backbone object'}"
        + (f" (weights fingerprint {bb['fingerprint']})" if bb.get("fingerprint") else ""),
        f"method         {s.get('method') or 'unknown'} {json.dumps(params, sort_keys=True)}"
        + (f"  [{_kind_label(kind)}]" if kind else ("  [zero-shot]" if s.get("zero_shot") else "")),
    ]
    if s.get("preset"):
        lines.append(f"preset         {s['preset']} (parameters above: its values, explicit ones on top)")
    choices = s.get("fit_choices")
    if choices:
        shown = ", ".join(f"{k} = {_value(v)}" for k, v in choices.items())
        lines.append(f"chosen at fit  {shown} (default rules for the fit-set size; an explicit value wins)")
    classes = s.get("classes")
    if classes:
        shown = ", ".join(map(str, classes[:20])) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
        lines.append(f"ID classes     {shown}")
    lines.append(f"class head     {s.get('head_description') or 'none'}")
    fit = s.get("fit") or {}
    if not fit.get("n") and fit.get("source") == "class names only":
        lines.append("fit set        none: the detector is built from the class names alone")
    else:
        lines.append(f"fit set        {fit.get('n') or 0} image(s) from {fit.get('source') or 'nothing yet'}"
                     + (f" ({fit['failed']} unreadable, skipped)" if fit.get("failed") else ""))
    cal = s.get("calibration")
    threshold = _threshold_lines(s.get("threshold"), alpha) if cal else None
    if cal and threshold:
        lines.append(f"calibration    {cal.get('n') or 0} held-out ID image(s) from {cal.get('source') or 'unknown'}"
                     + (f" ({cal['failed']} unreadable, skipped)" if cal.get("failed") else ""))
        lines.extend(threshold)
        sets = s.get("prediction_sets")
        if sets and all(sets.get(k) is not None for k in ("method", "alpha", "qhat", "n")):
            lines.append(f"prediction sets {str(sets['method']).upper()} at set_alpha = {sets['alpha']:g} (q-hat = "
                         f"{sets['qhat']:.6g}, {sets['n']} labelled calibration images); empty when flagged OOD")
    else:
        lines.append(f"calibration    none yet: the model gives scores only; p-values and OOD decisions at "
                     f"{at_alpha} need held-out ID images (calibrate / --calibration-dir)")
    lines.extend(f"note           {n}" for n in s.get("notes") or [])
    lines.append(f"created        {s.get('created') or 'not saved yet'} with oodscope "
                 f"{s.get('oodscope_version') or 'unknown version'}")
    return "\n".join(lines)


def _threshold_lines(threshold: Any, alpha: Any) -> list[str] | None:
    """The threshold's lines, or None when ``model.json`` holds no readable threshold."""
    if not threshold or not isinstance(alpha, int | float):
        return None
    try:
        return _format_threshold(Threshold.from_dict(threshold), alpha)
    except (KeyError, TypeError, ValueError):
        return None
