"""Gram — deviations of higher-order Gram-matrix features from their class-conditional ID range.

Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020; port of
OpenOOD v1.5 ``openood/postprocessors/gram_postprocessor.py`` (``G_p``, ``delta``, ``sample_estimator``,
``get_deviations``, which follow the authors' notebook).

Per dense layer ``l`` (``Features.dense``, (N, C, h, w)) and power ``p``: ``G_p = (F^p (F^p)^T)`` summed
over its rows, ``sign(.) |.|^(1/p)`` (C values; ``F`` the C x hw map). Fit on labelled ID images:
per class ``c``, the elementwise min and max of ``G_p`` over 90 % of its images; the other 10 % give
``E_l`` = mean over them of ``delta_l``. At test, with ``c`` the predicted class (argmax logits),
``delta_l(x) = sum_p sum_j relu(min_j - G_j) / |min_j + 1e-6| + relu(G_j - max_j) / |max_j + 1e-6|``.
Score: ``sum_l delta_l(x) / E_l``, divided by the max softmax probability (OpenOOD's
``-deviations / confs`` as an OOD score). Higher = more OOD.
Defaults: ``powers=[1, 2, 3, 4, 5]`` (OpenOOD ``configs/postprocessors/gram.yml``; the paper uses up
to 10), ``val_fraction=0.1`` (``int(0.1 * L)`` images of each class, as OpenOOD), every dense layer
the backbone gives (OpenOOD hooks every Conv2d and ReLU; we use the layers of ``Features.dense``).

Departures: the validation split is drawn with a seeded generator (OpenOOD: unseeded
``random.sample``); a predicted class with no fit image uses the min/max over all fit images
(OpenOOD has none to use); a layer whose validation deviations are all zero is normalised by 1
(recorded as a caution). No OOD data are used, as in the paper.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

_EPS = 1e-6


def gram_features(fmap: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C) row sums of the order-``p`` Gram matrix of each (C, h, w) map, back to degree 1."""
    x = fmap.to(torch.float64).flatten(2) ** p
    g = torch.matmul(x, x.transpose(1, 2)).sum(dim=2)
    return g.sign() * g.abs() ** (1.0 / p)


def deviation(mins: torch.Tensor, maxs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(N,) how far each row of ``g`` falls outside [mins, maxs], relative to the bounds."""
    below = torch.relu(mins - g) / (mins + _EPS).abs()
    above = torch.relu(g - maxs) / (maxs + _EPS).abs()
    return (below + above).sum(dim=1)


@register
class Gram(Detector):
    name = "gram"
    kind = DetectorKind.FEATURE
    requires = ("dense", "logits")
    needs_fit = True
    needs_labels = True
    #: (N, C, C) Gram intermediates per chunk.
    score_batch_size: ClassVar[int] = 256

    def __init__(
        self,
        powers: list[float] | None = None,
        layers: list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.powers = powers
        self.layers = layers
        self.val_fraction = val_fraction
        self.seed = seed
        if powers is not None and (len(powers) == 0 or any(not p > 0 for p in powers)):
            raise DetectorError(f"{self.name}: powers must be a non-empty list of positive numbers, got {powers}")
        if layers is not None and (len(layers) == 0 or len(set(layers)) != len(layers)):
            raise DetectorError(f"{self.name}: layers must be a non-empty list of distinct names")
        if not 0 < val_fraction < 1:
            raise DetectorError(f"{self.name}: val_fraction must be in (0, 1), got {val_fraction}")

    def _powers(self) -> list[float]:
        return [float(p) for p in (self.powers if self.powers is not None else [1, 2, 3, 4, 5])]

    def _maps(self, dense: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in names if n not in dense]
        if missing:
            raise DetectorError(f"{self.name}: layers {missing} are not in Features.dense (have {sorted(dense)})")
        for n in names:
            if dense[n].ndim != 4:
                raise DetectorError(f"{self.name}: dense layer {n!r} must be (N, C, h, w), got {tuple(dense[n].shape)}")
        return [dense[n] for n in names]

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        dense, logits = inputs["dense"], inputs["logits"]
        names = list(self.layers) if self.layers is not None else sorted(dense)
        if not names:
            raise DetectorError(f"{self.name}: Features.dense is empty (the backbone needs dense layers)")
        maps = self._maps(dense, names)
        n_classes = logits.shape[1]
        y = labels.to(torch.long).cpu()
        if int(y.max()) >= n_classes:
            raise DetectorError(f"{self.name}: labels go up to {int(y.max())} but the logits have {n_classes} classes")
        # Per class, int(val_fraction * L) validation images, the rest set the bounds (OpenOOD).
        generator = torch.Generator().manual_seed(int(self.seed))
        is_val = torch.zeros(len(y), dtype=torch.bool)
        for c in torch.unique(y).tolist():
            rows = torch.nonzero(y == c).flatten()
            n_val = int(float(self.val_fraction) * len(rows))
            is_val[rows[torch.randperm(len(rows), generator=generator)[:n_val]]] = True
        if not is_val.any():
            raise DetectorError(
                f"{self.name}: no class has {int(1 / float(self.val_fraction))}+ fit images, so there are no "
                "validation images to normalise the deviations with"
            )
        trn, val = ~is_val, is_val
        norms = []
        for i, fmap in enumerate(maps):
            total = torch.zeros(int(val.sum()), dtype=torch.float64)
            for j, p in enumerate(self._powers()):
                g = gram_features(fmap, p).cpu()
                g_trn, y_trn = g[trn], y[trn]
                lo = g_trn.amin(dim=0, keepdim=True).repeat(n_classes, 1)
                hi = g_trn.amax(dim=0, keepdim=True).repeat(n_classes, 1)
                for c in torch.unique(y_trn).tolist():
                    lo[c] = g_trn[y_trn == c].amin(dim=0)
                    hi[c] = g_trn[y_trn == c].amax(dim=0)
                self.state_[f"min.{i}.{j}"] = lo
                self.state_[f"max.{i}.{j}"] = hi
                y_val = y[val]
                total += deviation(lo[y_val], hi[y_val], g[val])
            factor = float(total.mean())
            if not factor > 0:
                self._caution(f"layer {names[i]!r}: no validation image deviates from its class range; normalised by 1")
                factor = 1.0
            norms.append(factor)
        self.fit_info_["layers"] = names
        self.fit_info_["norms"] = norms
        self.fit_info_["classes"] = int(n_classes)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = inputs["logits"].to(torch.float64)
        if logits.shape[1] != self.fit_info_["classes"]:
            raise DetectorError(f"{self.name}: {self.fit_info_['classes']} classes at fit, got {logits.shape[1]}")
        probs = torch.softmax(logits, dim=1)
        conf, pred = probs.max(dim=1)
        total = torch.zeros(len(logits), dtype=torch.float64, device=logits.device)
        for i, fmap in enumerate(self._maps(inputs["dense"], self.fit_info_["layers"])):
            layer = torch.zeros_like(total)
            for j, p in enumerate(self._powers()):
                g = gram_features(fmap, p)
                layer += deviation(self._state(f"min.{i}.{j}", g)[pred], self._state(f"max.{i}.{j}", g)[pred], g)
            total += layer / float(self.fit_info_["norms"][i])
        return total / conf
