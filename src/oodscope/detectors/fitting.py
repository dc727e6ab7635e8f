"""The one fit path: create a detector for the data at hand and fit it by what its kind needs.

Every caller above the detectors (the deployable model, the benchmark runner, the audits, tuning,
the command line) goes through these three functions instead of probing flags:

* :func:`build_detector` creates a detector by name, adding the ID class names when its kind needs
  them, and refuses unknown parameters before any work starts;
* :func:`fit_problems` says, before any feature is extracted, what a fit would lack;
* :func:`fit_detector` fits it, passing exactly the inputs its kind uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from oodscope.detectors.base import (
    ArrayLike,
    Detector,
    DetectorError,
    FeatureInput,
    check_params,
    create,
    registered,
)
from oodscope.detectors.kinds import FitNeeds, missing_fit_inputs

__all__ = ["build_detector", "class_needs", "fit_detector", "fit_problems", "planned_params"]


def class_needs(name_or_cls: str | type[Detector]) -> FitNeeds:
    """The fit needs a detector class declares (an instance may add to them: see ``Detector.fit_needs``)."""
    return _class(name_or_cls).class_fit_needs()


def build_detector(name: str, params: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None,
                   *, override_classes: bool = False, preset: str | None = None) -> Detector:
    """``create(name, preset=preset, **params)``, with ``classes`` filled in for kinds built from class names.

    ``classes`` fills the ``classes`` parameter when it is not in ``params`` (or always, with
    ``override_classes``). A kind that needs class names and gets none is refused with a message
    that says how to give them. ``preset``: see :mod:`oodscope.detectors.presets` (``params`` win).
    """
    planned = planned_params(name, params, classes, override_classes=override_classes, preset=preset)
    return create(name, preset=preset, **planned)


def planned_params(name: str, params: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None,
                   *, override_classes: bool = False, preset: str | None = None) -> dict[str, Any]:
    """The parameters :func:`build_detector` creates ``name`` with (``preset``'s values, then ``params``),
    checked (an unknown preset, unknown or missing parameters, missing class names) without creating it;
    the constructor's own value checks come at creation."""
    from oodscope.detectors.presets import resolve_params

    cls = _class(name)
    params = resolve_params(name, preset, dict(params or {}))
    if class_needs(cls).classes:
        if classes is not None and (override_classes or not params.get("classes")):
            params["classes"] = list(classes)
        if not params.get("classes"):
            raise DetectorError(
                f"{name} ({cls.kind.label}) needs the ID class names: give classes (--classes), or ID images "
                "in class sub-folders"
            )
    check_params(cls, params)
    return params


def fit_problems(detector: Detector, *, features: bool, labels: bool, text_encoder: bool,
                 classifier: bool = True) -> list[str]:
    """What fitting and applying ``detector`` would lack, in words (empty: it can run).

    ``features`` / ``labels``: ID fit features (with a label for every image) will be there;
    ``text_encoder``: the backbone encodes texts; ``classifier``: the backbone exposes
    ``classifier_parts()`` (model-in-the-loop kinds).
    """
    needs = detector.fit_needs()
    problems = missing_fit_inputs(needs, features=features, labels=labels, text_encoder=text_encoder)
    if needs.images and not features:
        problems.append("ID fit images (the fit runs the network on them)")
    if needs.model and not classifier:
        problems.append("a classifier backbone with classifier_parts() (it runs the network itself)")
    return problems


def fit_detector(
    detector: Detector,
    features: FeatureInput | None = None,
    labels: ArrayLike | None = None,
    *,
    text_encoder: Any = None,
    cache: Any = None,
    **options: Any,
) -> Detector:
    """Fit ``detector`` with the inputs its kind uses (the others are dropped); returns it.

    Missing inputs raise a :class:`DetectorError` naming them. ``options`` are the detector's own
    ``fit_options`` (e.g. the score ensemble's ``calibration``).
    """
    needs = detector.fit_needs()
    return detector.fit(
        features if needs.features else None,
        labels if needs.labels else None,
        text_encoder=text_encoder if needs.text_encoder else None,
        cache=cache,
        **options,
    )


def _class(name_or_cls: str | type[Detector]) -> type[Detector]:
    if not isinstance(name_or_cls, str):
        return name_or_cls
    reg = registered()
    if name_or_cls not in reg:
        create(name_or_cls)  # raises with the list of registered names
    return reg[name_or_cls]
