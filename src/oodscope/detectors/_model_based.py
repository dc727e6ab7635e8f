"""Shared base for model-in-the-loop detectors (ODIN, GradNorm, RankFeat).

These methods need the network itself — an input gradient, a last-layer gradient or a modified
feature map — so they cannot work from cached :class:`~oodscope.backbones.base.Features`. They
declare ``requires = ("model",)`` and are applied with
``score_images(backbone.classifier_parts(), images)``, where ``images`` is the *normalized*
preprocessed batch exactly as the backbone receives it. ``score(features)`` raises a
:class:`DetectorError` that says so.

They have nothing to learn from in-distribution data: ``fit`` (the shared one) only marks them
fitted, so generic pipelines that call ``fit_detector`` on every detector keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors.base import Detector, DetectorError, FeatureInput
from oodscope.detectors.kinds import DetectorKind

ImageInput = torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]


class ModelBasedDetector(Detector):
    """A detector scored on images through :class:`ClassifierParts` instead of on cached features."""

    kind: ClassVar[DetectorKind] = DetectorKind.MODEL
    requires: ClassVar[tuple[str, ...]] = ("model",)
    needs_fit: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    #: Images per forward/backward pass in ``score_images`` (bounds activation memory).
    image_batch_size: ClassVar[int] = 64

    # ----------------------------------------------------------------- the feature API does not apply
    def score(self, features: FeatureInput) -> np.ndarray:
        raise DetectorError(self._needs_model_message())

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise DetectorError(self._needs_model_message())

    def _needs_model_message(self) -> str:
        return (
            f"{self.name} runs the network itself (gradients / modified feature maps), so it cannot score "
            "cached Features. Call detector.score_images(backbone.classifier_parts(), images) with the "
            "normalized, preprocessed image batch; this needs a classifier backbone."
        )

    # ----------------------------------------------------------------- image API
    def score_images(
        self, parts: ClassifierParts, images: ImageInput, *, batch_size: int | None = None
    ) -> np.ndarray:
        """OOD score per image, float64, higher = more OOD.

        ``images``: a normalized batch (N, 3, H, W) as a tensor or array, or an iterable of such
        batches (e.g. a data loader yielding tensors). Floating dtypes are kept (float64 models
        work); other dtypes become float32.
        """
        _check_parts(parts, self.name)
        size = int(batch_size or self.image_batch_size)
        if size < 1:
            raise DetectorError(f"{self.name}: batch_size must be >= 1, got {size}")
        out: list[torch.Tensor] = []
        for batch in _batches(images, size, self.name):
            x = batch.to(parts.device)
            if not torch.is_floating_point(x) or x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            if not torch.isfinite(x).all():
                raise DetectorError(f"{self.name}: images contain NaN or infinite values")
            with torch.no_grad():
                scores = self._score_batch(parts, x)
            if scores.shape != (len(x),):
                raise DetectorError(f"{self.name}: produced scores of shape {tuple(scores.shape)}")
            out.append(scores.detach().to("cpu", torch.float64))
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------- helpers
def logits_of(parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
    """``head(pool(feature_map(x)))`` — the classifier's logits for normalized images."""
    return parts.head(parts.pool(parts.feature_map(images)))


def _batches(images: Any, size: int, who: str) -> Iterable[torch.Tensor]:
    if isinstance(images, np.ndarray | torch.Tensor):
        images = [images]
    for chunk in images:
        t = chunk if torch.is_tensor(chunk) else torch.from_numpy(np.ascontiguousarray(chunk))
        if t.ndim != 4:
            raise DetectorError(f"{who}: images must be a batch (N, C, H, W), got shape {tuple(t.shape)}")
        for start in range(0, len(t), size):
            yield t[start : start + size]


def _check_parts(parts: Any, who: str) -> None:
    if not isinstance(parts, ClassifierParts):
        raise DetectorError(
            f"{who}: expected ClassifierParts (from backbone.classifier_parts()), got {type(parts).__name__}"
        )
    # A module left in training mode makes BatchNorm mix images of a batch and dropout random:
    # scores would then depend on the batch, which these methods must not.
    for role in ("feature_map", "pool", "head"):
        fn = getattr(parts, role)
        module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(module, torch.nn.Module) and module.training:
            raise DetectorError(
                f"{who}: the network behind parts.{role} is in training mode; call .eval() first"
            )
