"""Mahalanobis ensemble with input pre-processing — Lee et al.'s full detector, without OOD tuning.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 (Algorithm 1: every layer, input pre-processing, feature
ensemble); OpenOOD v1.5 ``mds_ensemble_postprocessor.py``.

Per layer ``l`` (pooled activations, ``Features.layers`` at fit, ``ClassifierParts.layers`` at
score): class means and a tied covariance fitted on clean ID features, and
``s_l(x) = min_c MD_l,c(f_l(x'_l))`` with ``x'_l = x - eps * sign(grad_x MD_l,chat(f_l(x))) / std``
(each layer takes its own step, as in the paper's code). Score: ``sum_l w_l * (s_l(x) - m_l) / sd_l``.
Defaults: ``epsilon=0.0014`` (OpenOOD ``mds_ensemble.yml`` ``noise``), every layer the backbone
exposes (sorted by name), ``weights=None`` (all 1), ``shrinkage=None`` / ``rcond=None`` as in
``multilayer_mahalanobis`` (the Ledoit-Wolf rule layer by layer; 0 whenever a layer's tied
covariance can be full rank, the paper's plain estimate).

**The layer weights, without OOD data.** The paper (and OpenOOD when ``alpha_list`` is empty) fits
the weights ``w_l`` by logistic regression on validation OOD samples; OpenOOD's default config skips
that with ``alpha_list: [1]``. A post-hoc detector sees no OOD data, so each layer is put on a common
scale with its ID statistics — ``m_l``, ``sd_l`` = mean and standard deviation of the *clean*
distances ``min_c MD_l,c`` over the fit features — and the z-scores are summed with user weights
(default all 1), as ``multilayer_mahalanobis`` does. Only ``sd_l`` matters for the ranking (``m_l``
shifts every image alike); the pre-processing lowers ID distances a little in every layer, which
these clean statistics do not model. Pass ``weights`` if you fitted your own (e.g. on held-out
data). The step is ``eps / std`` in normalized space with the backbone's ``input_spec.std``
(see ``mahalanobis_odin``, whose helpers this detector shares; it is its single-layer case).
"""

from __future__ import annotations

import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors import _fit_size
from oodscope.detectors import _gaussian as g
from oodscope.detectors._model_fitted import FeatureFittedModelDetector
from oodscope.detectors.base import DetectorError, register
from oodscope.detectors.mahalanobis import check_shrinkage
from oodscope.detectors.mahalanobis_odin import check_epsilon, fit_gaussians, preprocessed_min_distance
from oodscope.detectors.multilayer_mahalanobis import check_layer_weights


@register
class MDSEnsemble(FeatureFittedModelDetector):
    name = "mds_ensemble"
    needs_labels = True
    requires = ("model", "layers")  # layers: read at fit

    def __init__(
        self,
        epsilon: float = 0.0014,
        layers: list[str] | None = None,
        weights: list[float] | None = None,
        shrinkage: float | None = None,
        rcond: float | None = None,
    ) -> None:
        super().__init__()
        self.epsilon = check_epsilon(epsilon, self.name)
        self.layers = layers
        self.weights = weights
        self.shrinkage = shrinkage
        self.rcond = rcond
        check_layer_weights(layers, weights, self.name)
        check_shrinkage(shrinkage, self.name)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        have = inputs["layers"]
        names = list(self.layers) if self.layers is not None else sorted(have)
        missing = [n for n in names if n not in have]
        if not names or missing:
            raise DetectorError(f"{self.name}: layers {missing or names} are not in Features.layers ({sorted(have)})")
        if self.weights is not None and len(self.weights) != len(names):
            raise DetectorError(f"{self.name}: {len(self.weights)} weights for {len(names)} layers {names}")
        stats, chosen = [], {}
        for i, name in enumerate(names):
            x = have[name]
            model = fit_gaussians(self, x, labels, f"layer {name!r}")
            chosen[name] = model.shrinkage
            self.state_[f"means.{i}"] = model.means
            self.state_[f"whitener.{i}"] = model.whitener
            s = g.min_squared_mahalanobis(x, model.means, model.whitener)
            sd = float(s.std(unbiased=False))
            stats.append([float(s.mean()), sd if sd > 0 else 1.0])
        self.fit_info_["layers"] = names
        self.fit_info_["id_mean_std"] = stats
        if self.shrinkage is None:
            _fit_size.record(self, "shrinkage", chosen)

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
        if not callable(parts.layers):
            raise DetectorError(
                f"{self.name}: needs the network's intermediate layers (ClassifierParts.layers); this backbone "
                "does not expose them (a TorchClassifier needs layers=[...], EfficientNet-Lite layers=True)"
            )
        names = self.fit_info_["layers"]
        weights = self.weights if self.weights is not None else [1.0] * len(names)
        total = torch.zeros(len(images), dtype=torch.float64, device=images.device)
        for i, name in enumerate(names):
            def layer(x: torch.Tensor, name: str = name) -> torch.Tensor:
                out = parts.layers(x)
                if name not in out:
                    raise DetectorError(f"{self.name}: the network gives no layer {name!r} (has {sorted(out)})")
                return out[name]

            means = self.state_[f"means.{i}"].to(images.device)
            whiten = self.state_[f"whitener.{i}"].to(images.device)
            s = preprocessed_min_distance(layer, images, means, whiten, float(self.epsilon),
                                          parts.input_spec.std, f"{self.name} layer {name!r}")
            m, sd = self.fit_info_["id_mean_std"][i]
            total = total + float(weights[i]) * (s - m) / sd
        return total
