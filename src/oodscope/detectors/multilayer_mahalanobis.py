"""Multi-layer Mahalanobis — Lee et al.'s feature ensemble, combined without OOD data.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 (Section 2, "feature ensemble").

Per layer ``l`` (pooled activations exposed in ``Features.layers``): class means and a tied
covariance, and the layer score ``s_l(x) = min_c MD_l,c(x)`` (squared Mahalanobis distance, as in
``mahalanobis``). Score: ``sum_l w_l * (s_l(x) - m_l) / sd_l``, where ``m_l`` and ``sd_l`` are the
mean and standard deviation of ``s_l`` over the ID features used for fitting.

**Difference from the paper.** The paper combines the per-layer scores with logistic-regression
weights fitted on validation *OOD* (or adversarial) samples, and also perturbs the input. This
detector is post-hoc and never sees OOD data, so it puts the layers on a common scale with their
ID statistics (z-scores) and sums them with user weights (default: all 1), with no input
perturbation. Results therefore differ from the paper's tuned ensemble; pass ``weights`` if you
have your own (e.g. fitted on held-out data). The ID statistics are measured on the fitting data
itself, where distances are slightly optimistic; this shifts every layer in the same direction.
Defaults: all layers the backbone exposes (sorted by name), ``weights=None`` (all 1),
``rcond=None`` (``D * eps``), and ``shrinkage=None``: the rule of ``mahalanobis``, layer by layer —
0 (the paper's plain estimate) for a layer of width ``d`` while ``n - C >= d`` (``n`` fit images,
``C`` classes), otherwise the Ledoit-Wolf intensity of that layer's within-class deviations. The
chosen values are recorded in ``fit_info_["auto"]["shrinkage"]`` (layer name -> value); an explicit
``shrinkage`` always wins and applies to every layer.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind
from oodscope.detectors.mahalanobis import check_shrinkage


def check_layer_weights(layers: list[str] | None, weights: list[float] | None, name: str) -> None:
    """Refuse an empty or repeated layer list, and a weight list of another length."""
    if layers is not None and (len(layers) == 0 or len(set(layers)) != len(layers)):
        raise DetectorError(f"{name}: layers must be a non-empty list of distinct names")
    if weights is not None and layers is not None and len(weights) != len(layers):
        raise DetectorError(f"{name}: {len(weights)} weights for {len(layers)} layers")


@register
class MultiLayerMahalanobis(Detector):
    name = "multilayer_mahalanobis"
    kind = DetectorKind.FEATURE
    requires = ("layers",)
    needs_fit = True
    needs_labels = True

    def __init__(
        self,
        layers: list[str] | None = None,
        weights: list[float] | None = None,
        shrinkage: float | None = None,
        rcond: float | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.weights = weights
        self.shrinkage = shrinkage
        self.rcond = rcond
        check_layer_weights(layers, weights, self.name)
        check_shrinkage(shrinkage, self.name)

    def _pick(self, layers: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in names if n not in layers]
        if missing:
            raise DetectorError(
                f"{self.name}: layers {missing} are missing from Features.layers (have {sorted(layers)})"
            )
        picked = [layers[n] for n in names]
        for n, x in zip(names, picked, strict=True):
            if x.ndim != 2:
                raise DetectorError(
                    f"{self.name}: layer {n!r} must be pooled to (N, D), got {tuple(x.shape)}"
                )
        return picked

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        names = list(self.layers) if self.layers is not None else sorted(inputs["layers"])
        if not names:
            raise DetectorError(f"{self.name}: Features.layers is empty")
        if self.weights is not None and len(self.weights) != len(names):
            raise DetectorError(f"{self.name}: {len(self.weights)} weights for {len(names)} layers {names}")
        stats = []
        auto = self.shrinkage is None
        chosen = {}
        for i, x in enumerate(self._pick(inputs["layers"], names)):
            model = g.fit_tied_classes(
                g.check_matrix(x, self.name, f"layer {names[i]!r}"), labels, self.shrinkage, self.rcond
            )
            chosen[names[i]] = model.shrinkage
            caution = g.few_samples_caution(*x.shape, model.shrinkage, len(model.means), auto=auto)
            if caution:
                self._caution(f"layer {names[i]!r}: {caution}")
            self.state_[f"means.{i}"] = model.means
            self.state_[f"whitener.{i}"] = model.whitener
            s = g.min_squared_mahalanobis(x, model.means, model.whitener)
            sd = float(s.std(unbiased=False))
            stats.append([float(s.mean()), sd if sd > 0 else 1.0])
        self.fit_info_["layers"] = names
        if auto:
            _fit_size.record(self, "shrinkage", chosen)
        self.fit_info_["id_mean_std"] = stats

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        names = self.fit_info_["layers"]
        weights = self.weights if self.weights is not None else [1.0] * len(names)
        total = None
        for i, x in enumerate(self._pick(inputs["layers"], names)):
            x = x.to(torch.float64)
            means = self._state(f"means.{i}", x)
            if x.shape[1] != means.shape[1]:
                raise DetectorError(
                    f"{self.name}: layer {names[i]!r} was {means.shape[1]}-d at fit, got {x.shape[1]}-d"
                )
            s = g.squared_mahalanobis(x, means, self._state(f"whitener.{i}", x)).amin(dim=1)
            m, sd = self.fit_info_["id_mean_std"][i]
            term = float(weights[i]) * (s - m) / sd
            total = term if total is None else total + term
        return total
