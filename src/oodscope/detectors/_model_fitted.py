"""Model-in-the-loop detectors that learn from in-distribution data before they score.

ODIN, GradNorm and RankFeat learn nothing, so the shared ``Detector.fit`` hands model kinds no
inputs. The detectors here do learn, in one of two ways:

* :class:`FeatureFittedModelDetector` (Mahalanobis with input pre-processing, its layer ensemble):
  the statistics come from the ID ``Features`` through the one fit path (``fit_detector(detector,
  features, labels)``, as for any feature-space method: the fit needs ID features); only scoring
  runs the network (``score_images``), which must compute the same features (``ClassifierParts``
  ``pool(feature_map(x))`` for ``penultimate``, ``layers(x)`` for ``Features.layers``).
* :class:`ImageFittedModelDetector` (AdaSCALE, NAC-UE): the fit itself needs the network (input
  gradients, a perturbed forward pass, per-layer gradients), so it takes the fit options
  ``parts=backbone.classifier_parts()`` and ``images=`` (normalized ID images, as ``score_images``
  takes them): ``detector.fit(parts=parts, images=id_images)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors._model_based import ImageInput, ModelBasedDetector, _batches, _check_parts
from oodscope.detectors.base import (
    DetectorError,
    FeatureInput,
    _device_of,
    _label_tensor,
    _rows,
)
from oodscope.detectors.kinds import FitNeeds


class _Fitted(ModelBasedDetector):
    needs_fit: ClassVar[bool] = True

    def score_images(
        self, parts: ClassifierParts, images: ImageInput, *, batch_size: int | None = None
    ) -> np.ndarray:
        if not self.is_fitted_:
            raise DetectorError(f"{self.name}: call fit(...) with in-distribution data before score_images(...)")
        return super().score_images(parts, images, batch_size=batch_size)


class FeatureFittedModelDetector(_Fitted):
    """Fitted on ID ``Features`` (the fields of ``requires`` besides ``"model"``), scored through the network."""

    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        return FitNeeds(features=True, labels=cls.needs_labels, model=True)

    def fit_fields(self) -> tuple[str, ...]:
        """The Features fields the fit reads: ``requires`` (e.g. ``("model", "layers")``) but ``model``."""
        return tuple(r for r in self.fields() if r != "model")

    def fit(
        self,
        features: FeatureInput | None = None,
        labels: Any = None,
        *,
        text_encoder: Any = None,
        cache: Any = None,
        **options: Any,
    ) -> FeatureFittedModelDetector:
        # Detector.fit passes model kinds no inputs; keep them for _fit_from (its checks run first).
        self._id_data = (features, labels)
        try:
            super().fit(features, labels, text_encoder=text_encoder, cache=cache, **options)
        finally:
            self._id_data = None
        return self

    def _fit_from(self, inputs: Any, labels: Any, **options: Any) -> None:
        features, raw_labels = self._id_data
        inputs = self._inputs(features, self.fit_fields())
        label_tensor = None
        if raw_labels is not None:
            label_tensor = _label_tensor(raw_labels, _rows(inputs), _device_of(inputs), self.name)
        self._fit(inputs, label_tensor)


class ImageFittedModelDetector(_Fitted):
    """Fitted on ID images through the network: ``fit(parts=..., images=...)``."""

    fit_options: ClassVar[tuple[str, ...]] = ("parts", "images")

    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        return FitNeeds(model=True, images=True)

    def _fit_from(self, inputs: Any, labels: Any, *, parts: Any = None, images: Any = None, **_: Any) -> None:
        if parts is None or images is None:
            raise DetectorError(
                f"{self.name} is fitted on in-distribution images through the network: call "
                "fit(parts=backbone.classifier_parts(), images=id_images) with the normalized, "
                "preprocessed ID images (as score_images takes them)"
            )
        _check_parts(parts, self.name)
        batches = []
        for batch in _batches(images, self.image_batch_size, self.name):
            x = batch.to(parts.device)
            if not torch.is_floating_point(x) or x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            if not torch.isfinite(x).all():
                raise DetectorError(f"{self.name}: fit images contain NaN or infinite values")
            batches.append(self._fit_statistics(parts, x))
        if not batches:
            raise DetectorError(f"{self.name}: fit got no images")
        self._fit_images(parts, batches)

    def _fit_statistics(self, parts: ClassifierParts, images: torch.Tensor) -> Any:  # pragma: no cover
        """Per-batch statistics of the ID images (called under ``torch.no_grad``)."""
        raise NotImplementedError

    def _fit_images(self, parts: ClassifierParts, batches: list[Any]) -> None:  # pragma: no cover
        """Turn the per-batch statistics into ``state_`` / ``fit_info_``."""
        raise NotImplementedError
