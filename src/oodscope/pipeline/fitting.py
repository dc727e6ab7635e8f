"""How an :class:`~oodscope.pipeline.model.OODModel` is configured and fitted: its settings checked at
construction (before any image is read), then its detector and class head fitted — from the class
names alone (zero-shot kinds) or from ID features — through the one fit path of
:mod:`oodscope.detectors.fitting`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oodscope.detectors import DetectorError, registered
from oodscope.detectors.base import Detector, check_params
from oodscope.detectors.fitting import build_detector, class_needs, fit_detector
from oodscope.pipeline.decisions import calibrate_on, unmatched_notes
from oodscope.pipeline.heads import LogitsHead, fit_head, zero_shot_head
from oodscope.pipeline.inputs import ModelData, OODModelError, map_labels

if TYPE_CHECKING:
    from oodscope.pipeline.model import OODModel

SET_METHODS = ("aps", "raps", "lac")
HEADS = ("auto", "zeroshot", "linear_probe", "logits")


def resolved_params(method: str, preset: str | None, method_params: dict[str, Any] | None) -> dict[str, Any]:
    """``method``'s parameters under ``preset`` (:mod:`oodscope.detectors.presets`), ``method_params`` on top;
    an unknown preset is an :class:`OODModelError` listing the valid ones."""
    from oodscope.detectors.presets import resolve_params

    try:
        return resolve_params(method, preset, method_params)
    except DetectorError as err:
        raise OODModelError(str(err)) from None


def check_settings(method: str, method_params: dict[str, Any], *, alpha: float, prediction_sets: str | None,
                   set_alpha: float | None, head: str | None, calibration_fraction: float) -> type[Detector]:
    """The detector class of ``method`` once every setting is valid; else an :class:`OODModelError`.

    Unknown method parameters fail here; required ones (``classes`` of zero-shot methods) may still
    come at fit time."""
    detectors = registered()
    if method not in detectors:
        raise OODModelError(f"unknown method {method!r}; registered: {', '.join(detectors)}")
    cls = detectors[method]
    needs = class_needs(cls)
    if needs.model:
        raise OODModelError(f"{method} runs the network itself (gradients) and cannot score cached features; "
                            "OODModel supports feature-based detectors only")
    if needs.adaptive:
        raise OODModelError(f"{method} adapts to the test stream (its scores depend on the images scored before), "
                            "so conformal calibration does not apply to it")
    if not 0.0 < alpha < 1.0:
        raise OODModelError(f"alpha must be in (0, 1), got {alpha}")
    if prediction_sets is not None and prediction_sets not in SET_METHODS:
        raise OODModelError(f"prediction_sets must be one of {SET_METHODS} or None, got {prediction_sets!r}")
    if head is not None and head not in HEADS:
        raise OODModelError(f"head must be one of {HEADS} or None, got {head!r}")
    if set_alpha is not None and not 0.0 < set_alpha < 1.0:
        raise OODModelError(f"set_alpha must be in (0, 1), got {set_alpha}")
    if not 0.0 < calibration_fraction < 1.0:
        raise OODModelError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    try:
        check_params(cls, dict(method_params), partial=True)
    except DetectorError as err:
        raise OODModelError(str(err)) from None
    return cls


def fit_class_names(model: OODModel, classes: Any) -> None:
    """A zero-shot model's detector (from the class names and the backbone's text encoder) and head."""
    if model.head == "linear_probe":
        raise OODModelError("a zero-shot model has no labelled fit images for a linear probe")
    try:
        detector = build_detector(model.method, model.method_params, classes, override_classes=True,
                                  preset=model.preset)
        fit_detector(detector, text_encoder=model.backbone)
    except DetectorError as err:
        raise OODModelError(str(err)) from None
    model.detector_ = detector
    model.class_names_ = list(detector.classes)
    model.fit_ids_ = []
    model.head_, model._head_scale_from_features = None, False
    if model.head in ("auto", "zeroshot"):
        model.head_ = zero_shot_head(model.backbone, model.class_names_, model.head_params,
                                     detector.state_["class_text"].numpy())
        model._head_scale_from_features = "logit_scale" not in model.head_params
    elif model.head == "logits":
        model.head_ = LogitsHead(model.class_names_)


def fit_features(model: OODModel, data: ModelData, names: list[str] | None) -> None:
    """A model's detector and head fitted on ID features (``names``: the classes of the labels)."""
    labels = data.labels
    try:
        detector = build_detector(model.method, model.method_params, names, preset=model.preset)
        if detector.fit_needs().labels and (labels is None or (labels < 0).any()):
            raise OODModelError(f"{model.method} needs a class label for every ID fit image (class sub-folders)")
        fit_detector(detector, data.features, labels, text_encoder=model.backbone)
    except DetectorError as err:
        raise OODModelError(str(err)) from None
    model.detector_ = detector
    model.fit_ids_ = list(data.hashes)
    model.head_, model.class_names_, model._head_scale_from_features = fit_head(
        model.head, data.features, labels, names, model.backbone, model.head_params)


def fit_zero_shot(model: OODModel, id_data: Any, classes: Any, calibration: Any, labels: Any, calibration_labels: Any,
                  ids: Any, calibration_ids: Any) -> None:
    """A zero-shot model: fitted on the class names (from ``classes``, the method parameters or the
    calibration folders' names), then calibrated on every ID image given, if any."""
    if id_data is not None and calibration is not None:
        raise OODModelError(
            f"{model.method} learns nothing from images: pass the ID images once, as calibration= "
            "(all of them calibrate the model)"
        )
    cal_input = calibration if calibration is not None else id_data
    cal_labels = calibration_labels if calibration is not None else labels
    cal_ids = calibration_ids if calibration is not None else ids
    cal_part = None
    if cal_input is not None:
        cal_part = model._data(cal_input, "calibration: ID images", labels=cal_labels, ids=cal_ids)
    if classes is None and not model.method_params.get("classes"):
        if cal_part is None or cal_part.labels is None or not cal_part.class_names:
            raise OODModelError(
                f"{model.method} is a zero-shot method: give the ID class names (classes=[...]), or ID "
                "images in class sub-folders"
            )
        classes = cal_part.class_names
    fit_class_names(model, classes)
    model._reset_calibration()
    model.info_["fit"] = {"n": 0, "source": "class names only", "failed": 0}
    if cal_part is not None:
        if cal_part.features is None:
            raise OODModelError(f"none of the {cal_part.n} calibration images could be read")
        notes = []
        if cal_labels is None and cal_part.labels is not None:
            notes = unmatched_notes(cal_part.class_names, model.class_names_)
            cal_part.labels = map_labels(cal_part.labels, cal_part.class_names, model.class_names_)
        calibrate_on(model, cal_part, notes)
