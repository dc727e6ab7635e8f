"""NAC-UE — how well a test image's neuron states are covered by the ID training distribution.

Liu, Lochman & Zach, "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and
Generalization", ICLR 2024; port of the authors' code in OpenOOD v1.5
(``openood/postprocessors/nac_postprocessor.py``, ``nac/coverage.py``, ``nac/instr_state.py``, ``nac/utils.py``).

Neuron state: ``z^ = sigmoid(alpha * o * g)`` per unit, with ``o`` the layer's output and
``g = dL/do`` for ``L = sum_c -(1/C) log softmax(f(x))_c`` (the KL divergence to the uniform
distribution up to a constant); spatial maps are reduced by *summing* ``o`` and ``g`` over the cells
separately (OpenOOD ``avg_pooling``). Fit: per unit, a histogram of ``z^`` over ID images on ``M - 1``
bins (OpenOOD's ``logspace(1e3, M)`` edges, dense near 0 and 1); coverage ``phi = min(count / O*, 1)``.
Score: ``-(1/|layers|) sum_l mean_units phi_l(bin of z^)`` (the coverage of the image's own bins; higher
= more OOD).
Defaults: one layer, the penultimate, with ``M=50`` bins, ``o_star=50``, ``sig_alpha=100`` — the
authors' ResNet-18 CIFAR-10 config (``configs/postprocessors/nac/resnet/nac_cifar10.yml`` of
github.com/BierOne/ood_coverage: ``layer_names: [avgpool]``, ``O: 50, M: 50, sig_alpha: 100``; their
ImageNet ResNet-50 config uses ``O: 10, sig_alpha: 3000``). ``sig_alpha`` must suit the scale of
``o * g`` of the network, which the authors set per model and benchmark.

Layers, adapted to :class:`~oodscope.backbones.base.ClassifierParts`: OpenOOD instruments
``avgpool`` (the pooled penultimate vector) plus ``layer1``-``layer3`` of a ResNet; ``ClassifierParts``
exposes the penultimate ``pool(feature_map(x))`` and the last feature map, so ``layers`` is a subset of
``("penultimate", "feature_map")`` (default ``("penultimate",)``, OpenOOD's ``avgpool``;
``"feature_map"`` is ResNet's ``layer4`` output, summed over cells). Intermediate blocks are not
reachable with gradients through ``ClassifierParts``. Gradients are real autograd through ``pool``
and ``head``. Fitting uses every ID image given (the authors: a class-balanced subset of
``valid_num: 1000`` training images; pass such a subset to match):
``fit(parts=backbone.classifier_parts(), images=id_images)``. ``M`` must be even (the edge grid of
the official code has ``2 * (M // 2)`` edges).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors._model_fitted import ImageFittedModelDetector
from oodscope.detectors.base import DetectorError, register

LAYERS = ("penultimate", "feature_map")


def bin_edges(m: int, base: float = 1e3) -> torch.Tensor:
    """The ``m`` histogram edges of the official code (``coverage.logspace``): ``log_base`` of a
    linear grid on [1, sqrt(base)] (0 to 0.5), mirrored to 1, the last moved to 1.01, then 1.2."""
    half = m // 2
    x = np.linspace(1, np.sqrt(base), num=half)
    left = np.log(x) / math.log(base)
    right = (1 - left)[::-1]
    edges = np.concatenate([left[:-1], right])
    edges[-1] += 1e-2
    return torch.from_numpy(np.append(edges, 1.2))


def neuron_states(parts: ClassifierParts, images: torch.Tensor, layers: tuple[str, ...], alpha: float
                  ) -> dict[str, torch.Tensor]:
    """layer -> (N, units) states ``sigmoid(alpha * o * dKL/do)``, float64."""
    fmap = parts.feature_map(images).detach().requires_grad_(True)
    with torch.enable_grad():
        h = parts.pool(fmap)
        if h.ndim != 2:
            raise DetectorError(f"nac_ue: pool(...) must return (N, D), got shape {tuple(h.shape)}")
        logits = parts.head(h)
        # sum_c -(1/C) log p_c per image, summed: in eval mode each image's gradient is its own.
        loss = -torch.log_softmax(logits, dim=1).mean(dim=1).sum()
        wanted = {"penultimate": h, "feature_map": fmap}
        grads = torch.autograd.grad(loss, [wanted[name] for name in layers])
    out = {}
    for name, grad in zip(layers, grads, strict=True):
        o = wanted[name].detach()
        if o.ndim > 2:  # OpenOOD avg_pooling sums o and g over the cells, separately
            o, grad = o.flatten(2).sum(dim=2), grad.flatten(2).sum(dim=2)
        out[name] = torch.sigmoid(float(alpha) * o.to(torch.float64) * grad.to(torch.float64))
    return out


def bin_index(states: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(N, units) bin ``k`` with ``edges[k] <= state < edges[k + 1]`` (states lie in [0, 1])."""
    idx = torch.searchsorted(edges.to(states.device), states.contiguous(), right=True) - 1
    return idx.clamp(0, len(edges) - 2)


@register
class NACUE(ImageFittedModelDetector):
    name = "nac_ue"

    def __init__(
        self,
        layers: list[str] | None = None,
        bins: int = 50,
        o_star: float = 50.0,
        sig_alpha: float = 100.0,
    ) -> None:
        super().__init__()
        if layers is not None and (not layers or len(set(layers)) != len(layers) or set(layers) - set(LAYERS)):
            raise DetectorError(f"nac_ue: layers must be distinct names among {LAYERS}, got {layers}")
        if int(bins) != bins or bins < 4 or bins % 2:
            raise DetectorError(f"nac_ue: bins must be an even integer >= 4, got {bins}")
        if not o_star > 0:
            raise DetectorError(f"nac_ue: o_star must be > 0, got {o_star}")
        if not sig_alpha > 0:
            raise DetectorError(f"nac_ue: sig_alpha must be > 0, got {sig_alpha}")
        self.layers = layers
        self.bins = bins
        self.o_star = o_star
        self.sig_alpha = sig_alpha

    def _layers(self) -> tuple[str, ...]:
        return tuple(self.layers) if self.layers is not None else ("penultimate",)

    def _fit_statistics(self, parts: ClassifierParts, images: torch.Tensor) -> dict[str, torch.Tensor]:
        edges = bin_edges(int(self.bins))
        counts = {}
        for name, states in neuron_states(parts, images, self._layers(), float(self.sig_alpha)).items():
            idx = bin_index(states, edges).cpu()
            units = idx.shape[1]
            flat = (idx * units + torch.arange(units)[None, :]).flatten()  # (bin, unit) cells
            counts[name] = torch.bincount(flat, minlength=(len(edges) - 1) * units).view(len(edges) - 1, units)
        return counts

    def _fit_images(self, parts: ClassifierParts, batches: list[dict[str, torch.Tensor]]) -> None:
        for i, name in enumerate(self._layers()):
            self.state_[f"counts.{i}"] = sum(b[name] for b in batches).to(torch.float64)
        self.fit_info_["layers"] = list(self._layers())

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
        edges = bin_edges(int(self.bins))
        layers = tuple(self.fit_info_["layers"])
        total = torch.zeros(len(images), dtype=torch.float64, device=images.device)
        for i, (name, states) in enumerate(neuron_states(parts, images, layers, float(self.sig_alpha)).items()):
            counts = self.state_[f"counts.{i}"].to(states.device)
            if counts.shape[1] != states.shape[1]:
                raise DetectorError(f"nac_ue: layer {name!r} had {counts.shape[1]} units at fit, got {states.shape[1]}")
            coverage = (counts / float(self.o_star)).clamp(max=1.0)  # (bins, units)
            idx = bin_index(states, edges)
            total += coverage.gather(0, idx).mean(dim=1) / len(layers)
        return -total
