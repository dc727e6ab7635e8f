"""The anomaly-detector contract: dense feature maps in, an image score and a pixel map out.

An anomaly detector (kind :attr:`~oodscope.detectors.kinds.DetectorKind.ANOMALY`) reads
``Features.dense`` — layer name -> (N, C, h, w) feature maps, as the backbone exposes them
(``dense_layers=...``) — and implements ``_score_maps(inputs) -> (scores (N,), maps (N, h, w))``:

- ``scores``: one anomaly score per image, higher = more anomalous (as every detector);
- ``maps``: the anomaly map at the detector's feature grid (float32), higher = more anomalous.

``score(features)`` returns the image scores (so the calibration, bench and pipeline code of every
other detector applies unchanged); ``score_maps(features)`` returns both. Bringing a map to image
resolution (bilinear upsampling, then the Gaussian smoothing PatchCore and PaDiM use, sigma = 4 px)
is :func:`upsample_maps`, the one place that does it; the detector itself never sees image files or
image sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.backbones.base import InputSpec
from oodscope.detectors.base import Detector, DetectorError, FeatureInput, _rows, _slice_rows
from oodscope.detectors.kinds import DetectorKind, FitNeeds


class AnomalyDetector(Detector):
    """Base class of the image anomaly detectors (see the module docstring)."""

    kind: ClassVar[DetectorKind] = DetectorKind.ANOMALY
    requires: ClassVar[tuple[str, ...]] = ("dense",)
    needs_fit: ClassVar[bool] = True
    #: False for image-level methods whose "map" is one cell per image (Gaussian AD): no pixel metrics,
    #: no ``--maps`` files.
    pixel_maps: ClassVar[bool] = True
    #: Images per scoring chunk (a chunk holds its dense maps and their distance matrices).
    score_batch_size: ClassVar[int] = 32

    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score(self, inputs: dict) -> torch.Tensor:
        return self._score_maps(inputs)[0]

    def score_maps(self, features: FeatureInput) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) float64 and maps (N, h, w) float32 at the feature grid."""
        if self.needs_fit and not self.is_fitted_:
            raise DetectorError(f"{self.name}: call fit(...) with features of normal images before score_maps(...)")
        inputs = self._inputs(features)
        n = _rows(inputs)
        scores, maps = [], []
        with torch.no_grad():
            rows = self.score_chunk_rows()
            for start in range(0, n, rows):
                chunk = {k: _slice_rows(k, v, start, start + rows) for k, v in inputs.items()}
                s, m = self._score_maps(chunk)
                scores.append(s.detach().to("cpu", torch.float64))
                maps.append(m.detach().to("cpu", torch.float32))
        if not scores:
            return np.zeros(0), np.zeros((0, 0, 0), np.float32)
        out_s, out_m = torch.cat(scores).numpy(), torch.cat(maps).numpy()
        if out_s.shape != (n,) or out_m.ndim != 3 or len(out_m) != n:
            raise DetectorError(f"{self.name}: produced scores {out_s.shape} and maps {out_m.shape} for {n} images")
        return out_s, out_m


def dense_inputs(inputs: dict, layers: list[str] | None, name: str) -> dict[str, torch.Tensor]:
    """The dense maps a detector uses (all the backbone gave, sorted by name, when ``layers`` is None)."""
    dense = inputs["dense"]
    chosen = sorted(dense) if layers is None else list(layers)
    missing = [k for k in chosen if k not in dense]
    if missing:
        raise DetectorError(f"{name}: dense layers {missing} not in the features (they have {sorted(dense)})")
    return {k: dense[k].float() for k in chosen}


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius 4 sigma (as scipy.ndimage.gaussian_filter's default truncate)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def upsample_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Maps (N, h, w) -> (N, H, W): bilinear upsampling, then Gaussian smoothing (``sigma`` px; 0 = none).

    Borders are mirrored with the edge repeated, as scipy.ndimage's default ``mode="reflect"``, so
    the result equals ``scipy.ndimage.gaussian_filter(map, sigma)`` of the upsampled map."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not torch.is_tensor(maps) else maps).float()
    if t.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {tuple(t.shape)}")
    out = F.interpolate(t[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    if sigma and sigma > 0:
        k = gaussian_kernel1d(sigma)
        r = (len(k) - 1) // 2
        if r > min(size):  # tiny images: symmetric padding needs r <= size
            r = min(size)
            k = k[len(k) // 2 - r : len(k) // 2 + r + 1]
            k = k / k.sum()
        out = F.conv2d(_symmetric_pad(out, r, dim=3), k.view(1, 1, 1, -1))
        out = F.conv2d(_symmetric_pad(out, r, dim=2), k.view(1, 1, -1, 1))
    return out[:, 0].numpy()


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` cells on both ends of ``dim`` by mirroring with the edge repeated (d c b a | a b c d)."""
    n = x.shape[dim]
    head = x.narrow(dim, 0, r).flip(dim)
    tail = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def grid_side(n_patches: int) -> int:
    """The side of a square patch grid with ``n_patches`` cells (clear error when not square)."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise DetectorError(f"{n_patches} patches do not form a square grid")
    return side


class ImageAnomalyDetector(AnomalyDetector):
    """An anomaly detector that trains its own networks on the images (EfficientAD), so it reads no
    cached features: it is fitted with ``fit(parts=..., images=normal_images)`` and applied with
    ``score_images(parts, images)`` / ``score_image_maps(parts, images)``, as the model-in-the-loop
    kinds are (``fit_needs().model``; see :mod:`oodscope.detectors._model_based`).

    ``images``: preprocessed (N, 3, H, W) batches (a tensor, an array or an iterable of them), as the
    layer above prepares them for a backbone; ``parts``: the backbone's ``classifier_parts()`` or its
    :class:`~oodscope.backbones.base.InputSpec` -- what tells the detector how the images were
    normalised, so it can bring them back to [0, 1] pixels (``None``: they are [0, 1] pixels already).
    Subclasses implement ``_fit_pixels(pixels)`` and ``_score_pixel_maps(pixels) -> (scores, maps)``
    on float32 [0, 1] pixel batches.
    """

    requires: ClassVar[tuple[str, ...]] = ("model",)
    fit_options: ClassVar[tuple[str, ...]] = ("parts", "images")
    #: Images per scoring forward pass.
    image_batch_size: ClassVar[int] = 16

    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        # No features: the fit runs on the ID images themselves and scoring takes images (score_images).
        return FitNeeds(model=True, images=True)

    def _needs_images_message(self) -> str:
        return (f"{self.name} trains its own networks on the images, so it cannot score cached Features: "
                "call score_images(parts, images) or score_image_maps(parts, images) with the preprocessed "
                "images (parts: the backbone's classifier_parts() or InputSpec)")

    def score(self, features: FeatureInput) -> np.ndarray:
        raise DetectorError(self._needs_images_message())

    def score_maps(self, features: FeatureInput) -> tuple[np.ndarray, np.ndarray]:
        raise DetectorError(self._needs_images_message())

    def _fit_from(self, inputs: Any, labels: Any, *, parts: Any = None, images: Any = None, **_: Any) -> None:
        if images is None:
            raise DetectorError(f"{self.name} is fitted on normal images: call fit(parts=..., images=normal_images) "
                                "with the preprocessed images (parts: the backbone's classifier_parts() or InputSpec)")
        pixels = torch.cat(list(_pixel_batches(parts, images, 1 << 30, self.name)))
        if len(pixels) == 0:
            raise DetectorError(f"{self.name}: fit got no images")
        with torch.enable_grad():  # Detector.fit runs under no_grad; this fit trains networks
            self._fit_pixels(pixels)

    def score_images(self, parts: Any, images: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Image anomaly scores (N,) float64, higher = more anomalous."""
        return self.score_image_maps(parts, images, batch_size=batch_size)[0]

    def score_image_maps(self, parts: Any, images: Any, *,
                         batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) float64 and maps (N, h, w) float32 at the detector's grid (bring them to
        image resolution with :func:`upsample_maps`)."""
        if not self.is_fitted_:
            raise DetectorError(f"{self.name}: call fit(parts=..., images=normal_images) before scoring")
        scores, maps = [], []
        with torch.no_grad():
            for pixels in _pixel_batches(parts, images, int(batch_size or self.image_batch_size), self.name):
                s, m = self._score_pixel_maps(pixels)
                scores.append(s.detach().to("cpu", torch.float64))
                maps.append(m.detach().to("cpu", torch.float32))
        if not scores:
            return np.zeros(0), np.zeros((0, 0, 0), np.float32)
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def _fit_pixels(self, pixels: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score_pixel_maps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def _pixel_batches(parts: Any, images: Any, size: int, who: str) -> Iterator[torch.Tensor]:
    """Batches of ``images`` as float32 [0, 1] pixels (N, 3, H, W), un-normalised by ``parts``' InputSpec."""
    spec = getattr(parts, "input_spec", parts)
    if spec is not None and not isinstance(spec, InputSpec):
        raise DetectorError(f"{who}: parts must be ClassifierParts, an InputSpec or None, got {type(parts).__name__}")
    if isinstance(images, np.ndarray | torch.Tensor):
        images = [images]
    for chunk in images:
        t = chunk if torch.is_tensor(chunk) else torch.from_numpy(np.ascontiguousarray(chunk))
        if t.ndim != 4 or t.shape[1] != 3:
            raise DetectorError(f"{who}: images must be a batch (N, 3, H, W), got shape {tuple(t.shape)}")
        t = t.detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            raise DetectorError(f"{who}: images contain NaN or infinite values")
        if spec is not None:
            t = t * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
        for start in range(0, len(t), size):
            yield t[start:start + size].clamp(0.0, 1.0)
