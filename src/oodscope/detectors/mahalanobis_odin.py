"""Mahalanobis with input pre-processing — the single-layer detector of Lee et al. as published.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 (Algorithm 1 with one layer, the penultimate).

Score: ``min_c MD_c(f(x'))`` with ``x' = x - eps * sign(grad_x MD_chat(f(x))) / std`` and ``chat``
the closest class of the clean image (``MD`` = squared Mahalanobis distance to the class mean under
the tied covariance, ``f`` = the penultimate features ``pool(feature_map(x))``).
Defaults: ``epsilon=0.0014`` (OpenOOD v1.5 ``configs/postprocessors/mds_ensemble.yml``, ``noise``;
the paper tunes it on OOD validation data over {0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01}),
``shrinkage=None`` and ``rcond=None`` as in ``mahalanobis`` (0 — the paper's plain estimate —
whenever the tied covariance can be full rank).

Why a separate detector rather than a parameter of ``mahalanobis``: a detector's kind is a fact of
its class, and the pre-processing makes this one model-in-the-loop (it needs the input gradient),
whereas ``mahalanobis`` is scored from cached features. The class means and the covariance are
fitted on the clean ID features (``Features.penultimate``), as in the paper's code
(``sample_estimator``: no perturbation at fit time); scoring runs the network
(``score_images(parts, images)``). The step is ``eps / std`` per channel in normalized space, the
paper's ``eps`` in [0, 1] pixel units, with ``std`` from the backbone's ``input_spec`` (as ``odin``;
the paper's code divides by the CIFAR std, OpenOOD by 0.5); a zero gradient counts as positive,
as in the code (``torch.ge(grad, 0)``). With ``epsilon=0`` this is ``mahalanobis`` on the
penultimate features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._model_fitted import FeatureFittedModelDetector
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.mahalanobis import check_shrinkage


def check_epsilon(epsilon: float, who: str) -> float:
    if not epsilon >= 0:
        raise DetectorError(f"{who}: epsilon must be >= 0, got {epsilon}")
    return epsilon


def input_step(images: torch.Tensor, grad: torch.Tensor, std: tuple[float, ...], who: str) -> torch.Tensor:
    """``sign(grad) / std`` per channel (a zero gradient counts as positive), the pre-processing step."""
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device)
    if images.shape[1] != len(s):
        raise DetectorError(f"{who}: images have {images.shape[1]} channels but input_spec.std has {len(s)} values")
    return torch.where(grad >= 0, 1.0, -1.0).to(images.dtype) / s.view(1, -1, 1, 1)


def preprocessed_min_distance(
    features_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    means: torch.Tensor,
    whiten: torch.Tensor,
    epsilon: float,
    std: tuple[float, ...],
    who: str,
) -> torch.Tensor:
    """(N,) ``min_c MD_c(f(x'))``, ``x'`` one signed-gradient step that brings ``f(x)`` closer to its
    closest class mean (Lee et al. 2018, Eq. 4). ``features_of`` maps images to (N, D) features."""
    if epsilon > 0:
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            f = _matrix(features_of(x), who).to(torch.float64)
            closest = g.squared_mahalanobis(f.detach(), means, whiten).argmin(dim=1)
            # The closest class's distance, summed over images: in eval mode images do not interact,
            # so each image's gradient is that of its own distance.
            loss = (((f - means[closest]) @ whiten) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, x)
        images = images.detach() - epsilon * input_step(images, grad, std, who)
    f = _matrix(features_of(images), who).to(torch.float64)
    if f.shape[1] != means.shape[1]:
        raise DetectorError(f"{who}: features were {means.shape[1]}-d at fit, the network gives {f.shape[1]}-d")
    return g.squared_mahalanobis(f, means, whiten).amin(dim=1)


def _matrix(f: torch.Tensor, who: str) -> torch.Tensor:
    if f.ndim != 2:
        raise DetectorError(f"{who}: the network's features must be (N, D), got shape {tuple(f.shape)}")
    return f


def fit_gaussians(detector: Detector, x: torch.Tensor, labels: torch.Tensor, what: str = "") -> g.TiedGaussians:
    """Tied class Gaussians with ``detector.shrinkage`` / ``rcond``, their caution recorded."""
    model = g.fit_tied_classes(
        g.check_matrix(x, detector.name, what or "features"), labels, detector.shrinkage, detector.rcond
    )
    caution = g.few_samples_caution(*x.shape, model.shrinkage, len(model.means), auto=detector.shrinkage is None)
    if caution:
        detector._caution(f"{what}: {caution}" if what else caution)
    return model


@register
class MahalanobisODIN(FeatureFittedModelDetector):
    name = "mahalanobis_odin"
    needs_labels = True
    requires = ("model", "penultimate")  # penultimate: read at fit

    def __init__(self, epsilon: float = 0.0014, shrinkage: float | None = None, rcond: float | None = None) -> None:
        super().__init__()
        self.epsilon = check_epsilon(epsilon, self.name)
        self.shrinkage = shrinkage
        self.rcond = rcond
        check_shrinkage(shrinkage, self.name)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        model = fit_gaussians(self, inputs["penultimate"], labels)
        self.state_["means"] = model.means
        self.state_["whitener"] = model.whitener
        self.fit_info_["rank"] = int(model.whitener.shape[1])
        if self.shrinkage is None:
            _fit_size.record(self, "shrinkage", model.shrinkage)

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
        means = self.state_["means"].to(images.device)
        whiten = self.state_["whitener"].to(images.device)
        return preprocessed_min_distance(
            lambda x: parts.pool(parts.feature_map(x)), images, means, whiten,
            float(self.epsilon), parts.input_spec.std, self.name,
        )
