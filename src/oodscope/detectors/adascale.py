"""AdaSCALE — SCALE with a per-image percentile set by how much a small perturbation moves the features.

Regmi et al., "AdaSCALE: Adaptive Scaling for Out-of-Distribution Detection", arXiv preprint, 2025;
port of OpenOOD v1.5 ``openood/postprocessors/adascale_postprocessor.py``
and ``openood/networks/adascale_net.py``.

Per image, with penultimate ``h = pool(feature_map(x))``: ``x~ = x + 0.5 * sign(g) * m``, ``g`` the input
gradient of the top logit and ``m`` the ``o`` fraction of input entries with the *smallest* ``|g|``;
``h~`` its features; ``Q = sum_{top-k1 of h} relu(h~) + lambda * sum_{top-k2 of h} |h - h~|``;
``p = p_min + (1 - F(Q)) * (p_max - p_min)`` with ``F`` the empirical CDF of ``Q`` over ID images;
``r = sum(relu h) / (sum of the top D - round(D p / 100) of relu h)``. Score: ``-logsumexp(l)`` with
``l = head(h * exp(r))`` (**adascale_a**, activation space) or ``l = head(h) * r^2`` (**adascale_l**,
logit space). Higher = more OOD.
Defaults (OpenOOD ``configs/postprocessors/adascale_a.yml`` = ``adascale_l.yml``): percentile range
``[75, 85]`` (``min_percentile``, ``max_percentile``), ``k1=5`` and ``k2=1`` (percent of the ``D``
units), ``lmbda=10``, ``o=0.05``, ``max_samples=5000`` ID images for ``F`` (``num_samples``).

Fitting: ``fit(parts=backbone.classifier_parts(), images=id_images)`` — ``F`` needs the perturbed
features of ID images (OpenOOD uses its ID validation split). Departures: ``k1``/``k2`` units are
``max(1, int(D * k / 100))`` (OpenOOD ``int(...)``, which is 0 for ``D < 100`` and silently drops a
term; identical for ``D >= 100``); the ``max_samples`` subset is drawn with a seeded permutation
(OpenOOD: unseeded ``torch.randperm``); an image whose activations are all zero gets ``r = 1``
(OpenOOD: 0/0). The perturbation is in normalized input units, as in OpenOOD (not divided by std).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors._model_fitted import ImageFittedModelDetector
from oodscope.detectors.base import DetectorError, register


def unit_count(width: int, percent: float) -> int:
    """``max(1, int(width * percent / 100))`` units (OpenOOD: ``int(...)``)."""
    return max(1, min(width, int(width * percent / 100)))


def perturbed_features(parts: ClassifierParts, images: torch.Tensor, o: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, h~)``: penultimate features of the images and of their AdaSCALE perturbation."""
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        h = parts.pool(parts.feature_map(x))
        # Summed top logits: in eval mode each image's gradient is that of its own top logit.
        top = parts.head(h).amax(dim=1).sum()
        (grad,) = torch.autograd.grad(top, x)
    if h.ndim != 2:
        raise DetectorError(f"adascale: pool(...) must return (N, D), got shape {tuple(h.shape)}")
    flat = grad.abs().flatten(1)
    n_entries = int(flat.shape[1] * o)
    mask = torch.zeros_like(flat)
    if n_entries > 0:
        mask.scatter_(1, torch.topk(flat, n_entries, dim=1, largest=False).indices, 1.0)
    x_p = images.detach() + grad.sign() * mask.view_as(grad) * 0.5
    return h.detach(), parts.pool(parts.feature_map(x_p)).detach()


def shift_statistic(h: torch.Tensor, h_p: torch.Tensor, k1: int, k2: int, lmbda: float) -> torch.Tensor:
    """``Q'`` per image: perturbed activations and feature shift on the top units of ``h``."""
    top1 = torch.topk(h, k1, dim=1).indices
    top2 = torch.topk(h, k2, dim=1).indices
    return torch.relu(h_p).gather(1, top1).sum(dim=1) + lmbda * (h - h_p).abs().gather(1, top2).sum(dim=1)


def adaptive_scale(h: torch.Tensor, percentiles: torch.Tensor) -> torch.Tensor:
    """``sum(relu h) / sum(top-k relu h)`` with ``k = D - round(D p / 100)`` per image (1 for all-zero rows)."""
    x = torch.relu(h)
    d = x.shape[1]
    ks = d - torch.round(d * percentiles / 100.0).long()
    ks = ks.clamp(1, d)
    values = torch.topk(x, int(ks.max()), dim=1).values
    keep = torch.arange(values.shape[1], device=x.device)[None, :] < ks[:, None]
    top_sum = (values * keep).sum(dim=1)
    total = x.sum(dim=1)
    ok = top_sum > 0
    return torch.where(ok, total / torch.where(ok, top_sum, torch.ones_like(top_sum)), torch.ones_like(total))


class _AdaSCALE(ImageFittedModelDetector):
    #: True: scale the logits by r^2 (AdaSCALE-L); False: the activations by exp(r) (AdaSCALE-A).
    logit_space: ClassVar[bool] = False

    def __init__(
        self,
        min_percentile: float = 75.0,
        max_percentile: float = 85.0,
        k1: float = 5.0,
        k2: float = 1.0,
        lmbda: float = 10.0,
        o: float = 0.05,
        max_samples: int = 5000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < min_percentile <= max_percentile < 100:
            raise DetectorError(
                f"{self.name}: need 0 < min_percentile <= max_percentile < 100, got {min_percentile}, {max_percentile}"
            )
        for key, value in (("k1", k1), ("k2", k2)):
            if not 0 < value <= 100:
                raise DetectorError(f"{self.name}: {key} (percent of the units) must be in (0, 100], got {value}")
        if not lmbda >= 0:
            raise DetectorError(f"{self.name}: lmbda must be >= 0, got {lmbda}")
        if not 0 <= o < 1:
            raise DetectorError(f"{self.name}: o (fraction of input entries perturbed) must be in [0, 1), got {o}")
        if int(max_samples) < 1:
            raise DetectorError(f"{self.name}: max_samples must be >= 1, got {max_samples}")
        self.min_percentile = min_percentile
        self.max_percentile = max_percentile
        self.k1 = k1
        self.k2 = k2
        self.lmbda = lmbda
        self.o = o
        self.max_samples = max_samples
        self.seed = seed

    def _units(self, width: int) -> tuple[int, int]:
        return unit_count(width, float(self.k1)), unit_count(width, float(self.k2))

    def _fit_statistics(self, parts: ClassifierParts, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, h_p = perturbed_features(parts, images, float(self.o))
        return h.to("cpu", torch.float64), h_p.to("cpu", torch.float64)

    def _fit_images(self, parts: ClassifierParts, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        h = torch.cat([b[0] for b in batches])
        h_p = torch.cat([b[1] for b in batches])
        if len(h) > int(self.max_samples):
            generator = torch.Generator().manual_seed(int(self.seed))
            keep = torch.randperm(len(h), generator=generator)[: int(self.max_samples)]
            h, h_p = h[keep], h_p[keep]
        k1, k2 = self._units(h.shape[1])
        q = shift_statistic(h, h_p, k1, k2, float(self.lmbda))
        self.state_["id_shift"] = torch.sort(q).values  # the empirical CDF F
        self.fit_info_["width"] = int(h.shape[1])
        self.fit_info_["units"] = [k1, k2]

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
        h, h_p = perturbed_features(parts, images, float(self.o))
        if h.shape[1] != self.fit_info_["width"]:
            raise DetectorError(f"{self.name}: features were {self.fit_info_['width']}-d at fit, got {h.shape[1]}-d")
        h64, hp64 = h.to(torch.float64), h_p.to(torch.float64)
        k1, k2 = self.fit_info_["units"]
        q = shift_statistic(h64, hp64, k1, k2, float(self.lmbda))
        id_shift = self.state_["id_shift"].to(q.device)
        # statsmodels ECDF: the fraction of ID values <= q
        cdf = torch.searchsorted(id_shift, q, right=True).to(torch.float64) / len(id_shift)
        lo, hi = float(self.min_percentile), float(self.max_percentile)
        r = adaptive_scale(h64, lo + (1.0 - cdf) * (hi - lo))
        if self.logit_space:
            logits = parts.head(h).to(torch.float64) * (r**2)[:, None]
        else:
            logits = parts.head((h64 * torch.exp(r)[:, None]).to(h.dtype)).to(torch.float64)
        return -torch.logsumexp(logits, dim=1)


@register
class AdaSCALEA(_AdaSCALE):
    name = "adascale_a"
    logit_space = False


@register
class AdaSCALEL(_AdaSCALE):
    name = "adascale_l"
    logit_space = True
