"""Convenience constructors over :class:`~oodscope.pipeline.OODModel`.

``ZeroShotDetector`` (ID class names + a vision-language backbone) and ``FewShotDetector`` (ID
images + a feature-space detector) are thin wrappers: each holds an ``OODModel`` in ``.model`` and
forwards to it, so everything (calibration, prediction sets, save/load) is the OODModel contract.

The detectors these build on have their own base classes (``PromptDetector`` for MCM, NegLabel, ...;
``FewShotPromptDetector`` for GDA, Tip-Adapter, ...); these two are the public end-to-end pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones import DEFAULT_ZERO_SHOT_BACKBONE
from oodscope.calibration import Threshold
from oodscope.detectors import registered
from oodscope.detectors.fitting import class_needs
from oodscope.pipeline.model import OODModel, OODModelError
from oodscope.pipeline.predictions import Predictions


class _Wrapper:
    model: OODModel
    _zero_shot: bool

    def score(self, images: Any) -> np.ndarray:
        """Raw OOD scores, higher = more OOD (NaN where an image could not be read)."""
        return self.model.score(images)

    def predict(self, images: Any, *, fdr: float | None = None) -> Predictions:
        """Per image: score, p-value, OOD decision at alpha, predicted ID class, prediction set, error."""
        return self.model.predict(images, fdr=fdr)

    def calibrate(self, id_images: Any, labels: Any = None) -> _Wrapper:
        """Re-calibrate on held-out ID images (never the fit images: that is refused)."""
        self.model.calibrate(id_images, labels=labels)
        return self

    @property
    def threshold(self) -> Threshold:
        return self.model.threshold

    @property
    def classes(self) -> list[str] | None:
        return self.model.class_names_

    def describe(self) -> str:
        return self.model.describe()

    def save(self, directory: str | os.PathLike) -> Path:
        return self.model.save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, **options: Any) -> _Wrapper:
        """Load a saved model (``options`` go to :meth:`OODModel.load`)."""
        model = OODModel.load(directory, **options)
        if model.zero_shot != cls._zero_shot:
            kind = "zero-shot" if model.zero_shot else "feature-space"
            raise OODModelError(f"{directory} holds a {kind} model ({model.method}); load it with "
                                f"{'ZeroShotDetector' if model.zero_shot else 'FewShotDetector'} or OODModel.load")
        obj = cls.__new__(cls)
        obj.model = model
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"


class ZeroShotDetector(_Wrapper):
    """OOD detection from ID class names only, calibrated on a few ID images.

    ``method``: a zero-shot detector (``mcm`` default, ``glmcm``, ``neglabel``, ``eoe``, ``clipn``);
    ``method_params`` go to it (e.g. ``templates="ensemble"``, ``temperature=...``), over the values of
    ``preset`` (:mod:`oodscope.detectors.presets`, e.g. ``"paper-imagenet"``). MCM is the
    default because it needs nothing but the class names; NegLabel's first fit embeds its whole
    WordNet corpus (about 23 min with the packaged text encoder on 2 CPU cores, then cached with
    ``OODSCOPE_TEXT_CACHE``).

    Example::

        det = ZeroShotDetector("conse:effnet-lite1", classes=["dress", "sandal", "bag"])
        det.fit(calibration="id_photos/")          # held-out ID images; nothing is trained on them
        preds = det.predict("incoming/")           # p-values, OOD at alpha, class, prediction set
    """

    _zero_shot = True

    def __init__(
        self,
        backbone: Any = DEFAULT_ZERO_SHOT_BACKBONE,
        classes: list[str] | None = None,
        method: str = "mcm",
        *,
        preset: str | None = None,
        alpha: float = 0.05,
        prediction_sets: str | None = "aps",
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        **method_params: Any,
    ) -> None:
        if method in registered() and class_needs(method).features:
            raise OODModelError(f"{method} is not a zero-shot method; use FewShotDetector (or OODModel)")
        if classes is not None:
            method_params["classes"] = list(classes)
        self.model = OODModel(backbone, method, method_params, preset=preset, alpha=alpha,
                              prediction_sets=prediction_sets, cache_dir=cache_dir, progress=progress)

    def fit(self, calibration: Any = None, *, classes: list[str] | None = None,
            labels: Any = None) -> ZeroShotDetector:
        """Encode the class names; calibrate on ``calibration`` (ID images) when given.

        Without calibration images only :meth:`score` works; :meth:`predict` needs :meth:`calibrate`.
        """
        if calibration is None:
            self.model.fit(classes=classes)
        else:
            self.model.fit(classes=classes, calibration=calibration, labels=labels)
        return self


class FewShotDetector(_Wrapper):
    """OOD detection from a (small) set of ID images with a feature-space detector.

    ``method``: ``knn`` (default), ``mahalanobis`` (class-conditional Gaussians with a tied
    covariance, i.e. the GDA score), ``relative_mahalanobis``, ``gmm``, ``vim``, ... with
    ``method_params`` (e.g. ``k=5``: KNN needs at least ``k`` fit images), over the values of ``preset``
    (:mod:`oodscope.detectors.presets`). ``fit(ID)`` keeps
    ``calibration_fraction`` of the images (stratified by class, seeded) for calibration and fits on
    the rest; a linear probe on the fit part predicts the ID class.
    """

    _zero_shot = False

    def __init__(
        self,
        backbone: Any = "effnet-lite0",
        method: str = "knn",
        *,
        preset: str | None = None,
        alpha: float = 0.05,
        calibration_fraction: float = 0.3,
        prediction_sets: str | None = "aps",
        head: str | None = "auto",
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        **method_params: Any,
    ) -> None:
        self.model = OODModel(backbone, method, method_params, preset=preset, alpha=alpha,
                              prediction_sets=prediction_sets, head=head, calibration_fraction=calibration_fraction,
                              seed=seed, cache_dir=cache_dir, progress=progress)
        if self.model.zero_shot:
            raise OODModelError(f"{method} is a zero-shot method; use ZeroShotDetector")

    def fit(self, id_data: Any, *, calibration: Any = None, calibration_fraction: float | None = None,
            labels: Any = None) -> FewShotDetector:
        self.model.fit(id_data, calibration=calibration, calibration_fraction=calibration_fraction, labels=labels)
        return self
