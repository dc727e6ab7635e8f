"""Choosing which ``Features`` field a feature-space detector reads.

Feature-space methods were defined on a classifier's penultimate activations, but the same
density/distance scores also make sense on a vision-language model's image embedding. Detectors
that mix in :class:`FeatureField` take a ``feature`` parameter:

- ``"penultimate"`` / ``"embedding"``: read that field;
- ``"auto"``: ``penultimate`` when the fitted features provide it, otherwise ``embedding``. The
  choice is made once, at fit time, recorded in ``fit_info_["feature"]`` (so it is saved), and the
  same field is then required at score time.

Because the field is a parameter, what an instance reads is answered by ``fields()`` (the class
attribute ``requires`` states the minimum the method needs before fitting — for ``"auto"``:
``embedding``, which every backbone provides — and is never rewritten). After fitting,
``fields()`` is the exact list recorded by the fit. Inside ``_fit`` / ``_score`` the selected
matrix is available as ``inputs["x"]``.

``optional_fields`` (e.g. ``bias``) are read when present at fit time; whether they were present
is recorded in ``fit_info_["optional"]`` and the same fields are then required at score time.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.backbones.base import Features
from oodscope.detectors.base import DetectorError

FEATURE_CHOICES = ("auto", "penultimate", "embedding")


def has_field(features: Any, name: str) -> bool:
    if isinstance(features, Features):
        return name in features.available()
    if isinstance(features, dict):
        return features.get(name) is not None
    return False


def check_weight(weight: torch.Tensor, classes: int, width: int, who: str) -> None:
    """The last-layer matrix must be (C, D): one row per logit, one column per feature unit."""
    if weight.ndim != 2 or tuple(weight.shape) != (classes, width):
        raise DetectorError(f"{who}: weight must be (C, D) = ({classes}, {width}), got {tuple(weight.shape)}")


class FeatureField:
    """Mixin placed before :class:`~oodscope.detectors.base.Detector` in the bases."""

    #: Fields needed besides the selected feature matrix (e.g. ``("logits", "weight")``).
    extra_requires: ClassVar[tuple[str, ...]] = ()
    #: Per-model fields used when present (recorded at fit time).
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: Allowed values of the ``feature`` parameter.
    feature_choices: ClassVar[tuple[str, ...]] = FEATURE_CHOICES

    feature: str

    def _check_feature(self, feature: str) -> None:
        if feature not in self.feature_choices:
            raise DetectorError(
                f"{self.name}: feature must be one of {list(self.feature_choices)}, got {feature!r}"
            )

    def fields(self) -> tuple[str, ...]:
        if self.is_fitted_ and "feature" in self.fit_info_:
            return (self.fit_info_["feature"], *self.extra_requires, *self.fit_info_.get("optional", ()))
        # Before fitting, advertise the field that will be read (auto: embedding, always present).
        first = "embedding" if self.feature == "auto" else self.feature
        return (first, *self.extra_requires)

    def _selected_field(self, features: Any) -> str:
        if self.feature != "auto":
            return self.feature
        if self._fitting or not self.is_fitted_:
            if isinstance(features, np.ndarray | torch.Tensor):
                return "embedding"  # a bare matrix: the name only matters for error messages
            return "penultimate" if has_field(features, "penultimate") else "embedding"
        return self.fit_info_.get("feature", "embedding")

    def _inputs(self, features: Any, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        field = self._selected_field(features)
        if self._fitting:
            optional = tuple(f for f in self.optional_fields if has_field(features, f))
        else:
            optional = tuple(self.fit_info_.get("optional", ()))
        self._field_now = field
        self._optional_now = optional
        inputs = super()._inputs(features, (field, *self.extra_requires, *optional))
        inputs["x"] = inputs.pop(field)
        if inputs["x"].ndim != 2:
            raise DetectorError(
                f"{self.name}: {field} must be an (N, D) matrix, got shape {tuple(inputs['x'].shape)}"
            )
        return inputs

    def _record_fields(self) -> None:
        """Call at the start of ``_fit``: remember the field and optional fields that were used."""
        self.fit_info_["feature"] = self._field_now
        self.fit_info_["optional"] = list(self._optional_now)

    def _check_width(self, x: torch.Tensor, width: int) -> None:
        if x.shape[1] != width:
            raise DetectorError(
                f"{self.name}: fitted on {width}-d {self.fit_info_.get('feature', 'features')}, "
                f"got {x.shape[1]}-d"
            )
