"""OODModel: a deployable OOD detector with calibrated decisions.

An :class:`OODModel` is a backbone (spec string or object) + a registered detector (name + params)
+ an optional class head + a calibration: conformal p-values against held-out ID scores, the
matching threshold at ID acceptance ``1 - alpha`` (with its uncertainty report), and conformal
prediction sets over the ID classes when the head gives probabilities.

Every public method takes images (a folder, list file, image, registry name, list of paths or an
:class:`~oodscope.io.ImageSource`) or precomputed :class:`Features`; the front end
(:mod:`oodscope.pipeline.inputs`) turns either into one :class:`~oodscope.pipeline.inputs.ModelData`,
and the core below works on that alone. The detector is built and fitted through the one fit path
(:mod:`oodscope.detectors.fitting`), by what its kind needs.

Ways to fit (see ``docs/pipeline.md``):

* zero-shot (MCM, NegLabel, ...): ``fit(classes=[...])`` — the detector learns from the class names
  only; it then scores. Decisions need calibration: ``fit(classes=..., calibration=ID_IMAGES)`` or
  ``calibrate(ID_IMAGES)`` (every ID image given can calibrate);
* few-shot / feature-space (KNN, Mahalanobis, ...): ``fit(ID_IMAGE_FOLDER)`` — split into a fit part
  and a calibration part (``calibration_fraction``, stratified by class, seeded; images with equal
  content stay on one side), or ``fit(ID, calibration=OTHER_ID_IMAGES)``;
* your own classifier: ``OODModel(backbone=TorchClassifier(...), method=..., head="logits")``.

Calibrating on images the detector was fitted on is refused: the content hashes of both sets are
compared with :func:`oodscope.calibration.check_disjoint`, so the same file under two names is
caught too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones import create_shared
from oodscope.backbones.base import Features
from oodscope.calibration import (
    ConformalPValues,
    PredictionSetCalibrator,
    Threshold,
)
from oodscope.calibration.split import split_calibration
from oodscope.detectors.fitting import class_needs
from oodscope.detectors.kinds import DetectorKind
from oodscope.pipeline import persistence
from oodscope.pipeline.decisions import calibrate_on, predict_chunk, unmatched_notes
from oodscope.pipeline.fitting import check_settings, fit_features, fit_zero_shot, resolved_params
from oodscope.pipeline.heads import ClassHead
from oodscope.pipeline.inputs import (
    ModelData,
    OODModelError,
    as_image_source,
    describe_source,
    feature_chunks,
    from_features,
    from_images,
    image_chunks,
    map_labels,
)
from oodscope.pipeline.predictions import Predictions

DEFAULT_CALIBRATION_FRACTION = 0.3
DEFAULT_CHUNK_SIZE = 256


class OODModel:
    """Backbone + detector + class head + conformal calibration, saved as JSON + safetensors.

    Args:
        backbone: a spec (``"conse:effnet-lite0"``, ``"effnet-lite0"``, ``"hf:..."``) or a backbone
            object (e.g. :class:`~oodscope.backbones.TorchClassifier`).
        method: a registered detector name (``oodscope.detectors.registered()``); ``method_params``
            its keyword arguments, checked here (for zero-shot methods ``classes`` may be given here
            or to ``fit``).
        preset: a named hyper-parameter preset (``"paper-imagenet"``, ``"paper-cifar"``,
            ``"openood-v1.5"``: :mod:`oodscope.detectors.presets`) giving the method's parameters;
            ``method_params`` override it. ``method_params`` holds the resolved parameters; both are saved.
        alpha: the per-image test level: an ID image is flagged OOD with probability <= alpha.
        prediction_sets: ``"aps"`` (default), ``"raps"``, ``"lac"`` or None; ``set_alpha`` their
            miscoverage (default ``alpha``); ``prediction_set_params`` go to
            :class:`~oodscope.calibration.PredictionSetCalibrator`.
        head: ``"auto"`` (zero-shot head for zero-shot methods, linear probe when the ID data have
            labels, else none), ``"zeroshot"``, ``"linear_probe"``, ``"logits"`` or None.
        calibration_fraction, seed: the fit/calibration split of :meth:`fit` (stratified, seeded).
        cache_dir: feature cache (re-scoring the same images is cheap); None keeps features in memory.
    """

    def __init__(
        self,
        backbone: Any = "conse:effnet-lite0",
        method: str = "mcm",
        method_params: dict[str, Any] | None = None,
        *,
        preset: str | None = None,
        alpha: float = 0.05,
        prediction_sets: str | None = "aps",
        set_alpha: float | None = None,
        prediction_set_params: dict[str, Any] | None = None,
        head: str | None = "auto",
        head_params: dict[str, Any] | None = None,
        calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
        seed: int = 0,
        backbone_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        method_params = resolved_params(method, preset, method_params)
        cls = check_settings(method, method_params, alpha=alpha, prediction_sets=prediction_sets,
                             set_alpha=set_alpha, head=head, calibration_fraction=calibration_fraction)
        self.method = method
        self.preset = preset
        self.method_params = method_params
        self.alpha = float(alpha)
        self.prediction_sets = prediction_sets
        self.set_alpha = float(set_alpha) if set_alpha is not None else self.alpha
        self.prediction_set_params = dict(prediction_set_params or {})
        self.head = head
        self.head_params = dict(head_params or {})
        self.calibration_fraction = float(calibration_fraction)
        self.seed = int(seed)
        self.backbone_options = dict(backbone_options or {})
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self.progress = bool(progress)
        if isinstance(backbone, str):
            self.backbone_spec: str | None = backbone
            self._backbone: Any = None
        else:
            if not callable(getattr(backbone, "encode_images", None)):
                raise OODModelError("backbone must be a spec string or an object with encode_images()")
            self.backbone_spec = None
            self._backbone = backbone
        self._detector_cls = cls
        self._saved_fingerprint: str | None = None
        # True when the zero-shot head should take the backbone's own logit scale from the features.
        self._head_scale_from_features = False
        # Fitted state.
        self.detector_: Any = None
        self.head_: ClassHead | None = None
        self.class_names_: list[str] | None = None
        self.pvalues_: ConformalPValues | None = None
        self.threshold_: Threshold | None = None
        self.set_calibrator_: PredictionSetCalibrator | None = None
        self.fit_ids_: list[bytes] = []
        self.info_: dict[str, Any] = {}
        self.notes_: list[str] = []

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> DetectorKind:
        """The detector's kind (how it learns: from features, class names, ...)."""
        return self._detector_cls.kind

    @property
    def zero_shot(self) -> bool:
        """True for methods that learn from the class names alone (MCM, NegLabel, ...). Few-shot
        vision-language methods (GDA, Tip-Adapter, ...) also need labelled ID images: not zero-shot."""
        needs = class_needs(self._detector_cls)
        return needs.classes and not needs.features

    @property
    def backbone(self) -> Any:
        """The backbone object (created from the spec on first use, shared within the process)."""
        if self._backbone is None:
            options = dict(self.backbone_options)
            requires = self._detector_cls.requires
            if "patches" in requires:
                options.setdefault("patches", True)
            if "layers" in requires:
                options.setdefault("layers", True)
            if "dense" in requires:  # image anomaly methods: the backbone's default dense maps
                options.setdefault("dense_layers", True)
            self._backbone = create_shared(self.backbone_spec, **options)
        return self._backbone

    @property
    def backbone_id(self) -> str:
        return self.backbone.id

    @property
    def is_fitted(self) -> bool:
        return self.detector_ is not None and bool(self.detector_.is_fitted_)

    @property
    def is_calibrated(self) -> bool:
        return self.pvalues_ is not None

    @property
    def threshold(self) -> Threshold:
        self._require_calibrated()
        return self.threshold_

    def __repr__(self) -> str:
        state = "calibrated" if self.is_calibrated else ("fitted" if self.is_fitted else "not fitted")
        bb = self.backbone_spec or getattr(self._backbone, "id", "?")
        return f"OODModel(backbone={bb!r}, method={self.method!r}, alpha={self.alpha:g}, {state})"

    # ------------------------------------------------------------------ front end
    def _data(self, data: Any, description: str, *, labels: Any = None, ids: Sequence[Any] | None = None,
              class_names: Sequence[str] | None = None, missing_ok: bool = False,
              progress: bool | None = None) -> ModelData:
        """Images or Features -> ModelData (the one input path of every public method)."""
        if isinstance(data, Features):
            return from_features(data, labels, ids, class_names)
        if ids is not None:
            raise OODModelError("ids= identifies precomputed feature rows; images are identified by their content")
        source = as_image_source(data, missing_ok=missing_ok)
        out = from_images(self.backbone, source, description=description, cache_dir=self.cache_dir,
                          batch_size=self.batch_size, num_workers=self.num_workers,
                          progress=self.progress if progress is None else progress)
        out.description = describe_source(data)
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int64)
            if lab.shape != (out.n,):
                raise OODModelError(f"labels must have one entry per image ({out.n}), got shape {lab.shape}")
            out.labels = lab[out.indices]
        return out

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        id_data: Any = None,
        *,
        classes: Sequence[str] | None = None,
        calibration: Any = None,
        calibration_fraction: float | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        calibration_labels: Sequence[int] | np.ndarray | None = None,
        ids: Sequence[Any] | None = None,
        calibration_ids: Sequence[Any] | None = None,
    ) -> OODModel:
        """Fit the detector (and head) and calibrate when ID images for it are there.

        ``id_data`` / ``calibration``: images (folder, list file, registry name, paths, an
        :class:`~oodscope.io.ImageSource`) or :class:`Features`. ``labels`` override the labels of
        ``id_data``; with Features, ``ids`` identify the rows for the overlap check (default: a hash
        of each embedding row) and ``classes`` names the label indices. Zero-shot methods learn from
        ``classes`` alone; every ID image given to them calibrates.
        """
        fraction = self.calibration_fraction if calibration_fraction is None else float(calibration_fraction)
        if not 0.0 < fraction < 1.0:
            raise OODModelError(f"calibration_fraction must be in (0, 1), got {fraction}")
        if self.zero_shot:
            fit_zero_shot(self, id_data, classes, calibration, labels, calibration_labels, ids, calibration_ids)
            return self
        if id_data is None:
            raise OODModelError(f"{self.method} learns from ID images: pass id_data (e.g. an ImageFolder)")
        if classes is not None and not isinstance(id_data, Features):
            raise OODModelError(
                f"classes= is for zero-shot methods; {self.method} takes the class names from the ID data"
            )
        data = self._data(id_data, "fit: ID images", labels=labels, ids=ids, class_names=classes)
        if data.features is None:
            raise OODModelError(f"none of the {data.n} ID images could be read")
        names = data.class_names
        if names is None and data.labels is not None and (data.labels >= 0).any():
            names = [str(k) for k in range(int(data.labels.max()) + 1)]
        if calibration is not None:
            fit_part = data
            cal_part = self._data(calibration, "calibration: ID images", labels=calibration_labels,
                                  ids=calibration_ids)
            if calibration_labels is None:
                cal_part.labels = map_labels(cal_part.labels, cal_part.class_names, names)
            fraction_used = None
        elif isinstance(id_data, Features):
            fit_part, cal_part, fraction_used = data, None, None  # precomputed features: calibrate() later
        else:
            fit_rows, cal_rows = split_calibration(data.hashes, data.labels, fraction, self.seed)
            fit_part, cal_part = data.subset(fit_rows), data.subset(cal_rows)
            cal_part.description = f"{fraction:g} of the ID images (seed {self.seed})"
            fraction_used = fraction
        fit_features(self, fit_part, names)
        self._reset_calibration()
        self.info_["fit"] = {"n": len(fit_part.hashes), "source": data.description, "failed": len(data.failures),
                             "failures": [[f.item_id, f.reason] for f in data.failures[:20]]}
        if cal_part is not None:
            if cal_part.features is None:
                raise OODModelError("no calibration images could be read")
            calibrate_on(self, cal_part)
            self.info_["calibration"]["fraction"] = fraction_used
        return self

    def _reset_calibration(self) -> None:
        self.pvalues_ = self.threshold_ = self.set_calibrator_ = None
        self.info_.pop("calibration", None)
        self.notes_ = []

    # ------------------------------------------------------------------ calibration
    def calibrate(self, data: Any, labels: Sequence[int] | np.ndarray | None = None, *,
                  ids: Sequence[Any] | None = None) -> OODModel:
        """(Re-)calibrate on held-out ID data: images or :class:`Features`.

        Refuses data that overlap the detector's fit set (by content hash for images; by ``ids`` or
        the hash of each embedding row for features). ``labels`` (class indices into the model's
        classes) are only used for the prediction sets.
        """
        if not self.is_fitted:
            raise OODModelError("fit the model before calibrating it")
        part = self._data(data, "calibration: ID images", labels=labels, ids=ids)
        if part.features is None:
            raise OODModelError(f"none of the {part.n} calibration images could be read")
        notes = []
        if labels is None and not isinstance(data, Features):
            notes = unmatched_notes(part.class_names, self.class_names_)
            part.labels = map_labels(part.labels, part.class_names, self.class_names_)
        calibrate_on(self, part, notes)
        return self

    # ------------------------------------------------------------------ scoring
    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise OODModelError("the model is not fitted: call fit(...) first")

    def _require_calibrated(self) -> None:
        self._require_fitted()
        if not self.is_calibrated:
            raise OODModelError(
                "the model is not calibrated: p-values and OOD decisions need held-out ID images — call "
                "calibrate(ID images) (zero-shot models: fit(classes=..., calibration=ID images)); score() "
                "works without"
            )

    def detector_scores(self, features: Features) -> np.ndarray:
        """The detector's raw scores of precomputed features (float64, higher = more OOD)."""
        return np.asarray(self.detector_.score(features), dtype=np.float64)

    def score(self, images: Any, *, progress: bool | None = None) -> np.ndarray:
        """Raw OOD scores (higher = more OOD), float64; NaN for images that could not be read."""
        self._require_fitted()
        data = self._data(images, "score", missing_ok=True, progress=progress)
        out = np.full(data.n, np.nan)
        if data.features is not None:
            out[data.indices] = self.detector_scores(data.features)
        return out

    def predict_iter(
        self,
        images: Any,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: bool | None = None,
        item_ids: Sequence[str] | None = None,
        require_calibration: bool = True,
    ) -> Iterator[Predictions]:
        """Stream :class:`Predictions` chunk by chunk (``chunk_size`` images each), in input order.

        Unreadable images come back as rows with ``error`` set; they never stop the stream. With
        ``require_calibration=False`` an uncalibrated model streams scores (and classes) only.
        """
        if require_calibration:
            self._require_calibrated()
        else:
            self._require_fitted()
        if chunk_size < 1:
            raise OODModelError("chunk_size must be >= 1")
        if isinstance(images, Features):
            yield from (predict_chunk(self, part) for part in feature_chunks(images, chunk_size, item_ids))
            return
        show = self.progress if progress is None else progress
        for chunk in image_chunks(as_image_source(images, missing_ok=True), chunk_size, show):
            yield predict_chunk(self, self._data(chunk, "score", progress=False))

    def predict(
        self,
        images: Any,
        *,
        fdr: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: bool | None = None,
        item_ids: Sequence[str] | None = None,
    ) -> Predictions:
        """Decisions for every image: score, p-value, OOD at ``alpha``, class, prediction set, error.

        ``images``: an ImageSource, a path (folder, list file, image), a list of paths, or
        precomputed :class:`Features` (ids ``"0".."N-1"`` unless ``item_ids``). ``fdr=q`` also flags
        the batch with Benjamini-Hochberg at level q (``ood_fdr``).
        """
        parts = list(self.predict_iter(images, chunk_size=chunk_size, progress=progress, item_ids=item_ids))
        if not parts:
            raise OODModelError("no images to predict")
        out = Predictions.concatenate(parts)
        return out.with_fdr(fdr) if fdr is not None else out

    def score_maps(self, images: Any, *, sigma: float = 4.0, chunk_size: int = 64,
                   progress: bool | None = None) -> tuple[np.ndarray, Any]:
        """Image anomaly methods: scores (NaN for unreadable images) and one anomaly map per image.

        For images, each map is (H, W) float32 at that image's own resolution (None where unreadable):
        upsampled and Gaussian-smoothed (``sigma`` px) at the network's input size, then mapped back
        through the preprocessing geometry (NaN outside a centre crop; see :mod:`oodscope.pipeline.maps`).
        For :class:`Features`, the maps are (N, S, S) at the network's input size."""
        from oodscope.pipeline import maps

        return maps.score_maps(self, images, sigma=sigma, chunk_size=chunk_size, progress=progress)

    def predict_maps_iter(self, images: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool | None = None,
                          require_calibration: bool = True, sigma: float = 4.0) -> Iterator[tuple[Predictions, list]]:
        """:meth:`predict_iter` with the anomaly maps: ``(predictions, maps)`` per chunk (maps as in
        :meth:`score_maps`), from one feature extraction and one detector pass."""
        from oodscope.pipeline import maps

        for part, part_maps, _ in maps.predict_maps_iter(self, images, chunk_size=chunk_size, progress=progress,
                                                         require_calibration=require_calibration, sigma=sigma):
            yield part, part_maps

    # ------------------------------------------------------------------ description and persistence
    def summary(self) -> dict[str, Any]:
        """JSON-able description: backbone, method, classes, data sizes, calibration."""
        return persistence.summary(self)

    def describe(self) -> str:
        """Multi-line human-readable summary (printed by ``oodscope fit`` and ``oodscope info``)."""
        return persistence.describe_summary(self.summary())

    def save(self, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``model.json``, ``calibration.safetensors``, ``detector/`` and ``head/`` (no pickle)."""
        self._require_fitted()
        return persistence.save_model(self, directory, overwrite=overwrite)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        backbone: Any = None,
        device: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = True,
        verify_backbone: bool = True,
        runtime: str = "torch",
    ) -> OODModel:
        """Load a saved model. The backbone (the saved spec, or ``backbone=``) must have the saved id
        and, with ``verify_backbone``, the same weights fingerprint; otherwise this raises.
        ``runtime="onnxruntime"`` / ``"openvino"`` runs the network from the model's ``export/<runtime>``
        (``oodscope export``), refused when missing or exported from other weights."""
        return persistence.load_model(cls, directory, backbone=backbone, verify_backbone=verify_backbone,
                                      runtime=runtime,
                                      device=device, cache_dir=cache_dir, batch_size=batch_size,
                                      num_workers=num_workers, progress=progress)


__all__ = ["DEFAULT_CALIBRATION_FRACTION", "OODModel", "OODModelError"]
