"""A served model: a loaded :class:`~oodscope.pipeline.OODModel`, its fingerprint and card, and the scoring
of a batch of prepared images through the model's own code.

Scoring reuses the model: the backbone's network encodes the batch of resized pixels
(``normalize_batch`` + ``encode_images``, converted for derived backbones as extraction does), and
:func:`oodscope.pipeline.decisions.predict_chunk` turns the features into decisions — score,
conformal p-value, OOD at the model's alpha, class, prediction set with the same content-keyed
uniforms — so a request gives what ``OODModel.predict`` gives for the same images in the same batch.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import derived_from
from oodscope.backbones.preprocess import normalize_batch
from oodscope.features.extract import LoadFailure
from oodscope.pipeline import OODModel
from oodscope.pipeline.decisions import predict_chunk
from oodscope.pipeline.inputs import ModelData, OODModelError
from oodscope.pipeline.predictions import Predictions
from oodscope.serve.decode import Prepared


def directory_fingerprint(directory: str | Path) -> str:
    """SHA-256 (16 hex digits) over the relative paths and bytes of every file of a saved model."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass
class AnomalyMap:
    """A per-pixel anomaly map of one image, as an 8-bit greyscale PNG scaled from [low, high]."""

    png: bytes
    width: int
    height: int
    low: float
    high: float


class ServedModel:
    """One model the service scores with (owned by the engine's worker thread once serving)."""

    def __init__(self, name: str, model: OODModel, fingerprint: str, directory: Path | None = None,
                 backbone: Any = None, runtime: str = "torch") -> None:
        if not model.is_fitted:
            raise OODModelError(f"model {name!r} is not fitted")
        if not model.is_calibrated:
            raise OODModelError(f"model {name!r} is not calibrated: the service answers with p-values and decisions "
                                "at the model's alpha, which need held-out ID images (oodscope fit --id-dir / "
                                "OODModel.calibrate)")
        self.name = name
        self.model = model
        self.fingerprint = fingerprint
        self.directory = directory
        self.backbone_arg = backbone
        self.runtime = runtime
        self.network, self.derive = derived_from(model.backbone)
        self._card = self._make_card()  # once, here: request threads never touch the model the worker owns

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, name: str, directory: str | Path, *, backbone: Any = None, device: str | None = None,
             runtime: str = "torch") -> ServedModel:
        """Load a saved model directory (``backbone``: the object or factory for models fitted on one;
        ``runtime``: ``"onnxruntime"`` / ``"openvino"`` run its exported network, see docs/export.md)."""
        directory = Path(directory)
        obj = backbone() if callable(backbone) and not callable(getattr(backbone, "encode_images", None)) \
            else backbone
        model = OODModel.load(directory, backbone=obj, device=device, num_workers=0, progress=False, runtime=runtime)
        return cls(name, model, directory_fingerprint(directory), directory, backbone, runtime)

    @classmethod
    def from_model(cls, name: str, model: OODModel) -> ServedModel:
        """Serve an in-memory model; its fingerprint is that of the directory it saves to."""
        model.num_workers, model.progress, model.cache_dir = 0, False, None
        with tempfile.TemporaryDirectory(prefix="oodscope-serve-") as tmp:
            model.save(tmp)
            fingerprint = directory_fingerprint(tmp)
        return cls(name, model, fingerprint, None, None)

    def reloaded(self) -> ServedModel:
        if self.directory is None:
            raise OODModelError(f"model {self.name!r} was given in memory, not as a directory: nothing to reload")
        return ServedModel.load(self.name, self.directory, backbone=self.backbone_arg, runtime=self.runtime)

    # ------------------------------------------------------------------ description
    @property
    def input_spec(self) -> Any:
        return self.network.input_spec

    @property
    def alpha(self) -> float:
        return self.model.alpha

    @property
    def calibration_scores(self) -> np.ndarray:
        return self.model.pvalues_.cal_scores

    @property
    def maps_available(self) -> bool:
        return callable(getattr(self.model.detector_, "anomaly_maps", None))

    def card(self) -> dict[str, Any]:
        return self._card

    def _make_card(self) -> dict[str, Any]:
        summary = self.model.summary()
        summary = {k: v for k, v in summary.items() if k not in ("fit", "calibration")} | {
            "fit": _without_failures(summary.get("fit")),
            "calibration": _without_failures(summary.get("calibration")),
        }
        return {"name": self.name, "fingerprint": self.fingerprint, "maps_available": self.maps_available,
                "summary": summary, "description": self.model.describe()}

    # ------------------------------------------------------------------ scoring (worker thread)
    def score(self, items: list[Prepared], *, maps: bool = False) -> tuple[Predictions, list[AnomalyMap | None] | None]:
        """Decisions for prepared images, in order (items with an error come back as error rows), and
        with ``maps`` one anomaly map per item when the detector makes them (None otherwise)."""
        ok = [i for i, item in enumerate(items) if item.ok]
        features = None
        if ok:
            pixels = np.stack([items[i].pixels for i in ok])
            batch = normalize_batch(pixels, self.network.input_spec, self.network.device)
            features = self.network.encode_images(batch)
            if self.derive is not None:
                features = self.derive(features)
        failures = [LoadFailure(i, item.name, item.error) for i, item in enumerate(items) if not item.ok]
        data = ModelData(n=len(items), indices=np.asarray(ok, dtype=np.int64), item_ids=[items[i].name for i in ok],
                         hashes=[items[i].digest for i in ok], labels=None, failures=failures, features=features)
        predictions = predict_chunk(self.model, data)
        per_item: list[AnomalyMap | None] | None = None
        if maps:
            made = self.anomaly_maps(features)
            if made is not None:
                per_item = [None] * len(items)
                for i, m in zip(ok, made, strict=True):
                    per_item[i] = m
        return predictions, per_item

    def anomaly_maps(self, features: Any) -> list[AnomalyMap] | None:
        """Maps for the scored rows, when the detector has a map method (``anomaly_maps(features)`` ->
        (N, h, w), higher = more anomalous); None otherwise (today: no registered detector has one)."""
        method = getattr(self.model.detector_, "anomaly_maps", None)
        if features is None or not callable(method):
            return None
        from PIL import Image

        out = []
        for m in np.asarray(method(features), dtype=np.float64):
            low, high = float(np.nanmin(m)), float(np.nanmax(m))
            scaled = np.zeros(m.shape) if high <= low else (m - low) / (high - low)
            buffer = io.BytesIO()
            Image.fromarray(np.rint(np.nan_to_num(scaled) * 255).astype(np.uint8), mode="L").save(buffer, "PNG")
            out.append(AnomalyMap(buffer.getvalue(), int(m.shape[1]), int(m.shape[0]), low, high))
        return out


def _without_failures(part: Any) -> Any:
    if isinstance(part, dict):
        return {k: v for k, v in part.items() if k != "failures"}
    return part


__all__ = ["AnomalyMap", "ServedModel", "directory_fingerprint"]
