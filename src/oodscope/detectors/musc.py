"""MuSc — zero-shot anomaly maps by mutual scoring of the patches of a batch of unlabeled images.

Li, Huang, Zhang, Wang, Xu & Sun (Xurui Li et al.), "MuSc: Zero-Shot Industrial Anomaly
Classification and Segmentation with Mutual Scoring of the Unlabeled Images", ICLR 2024.
Official code: github.com/xrli-U/MuSc (``models/musc.py``, ``models/modules/_LNAMD.py``,
``_MSM.py``, ``_RsCIN.py``, ``configs/musc.yaml``).

Formula: ``a(p_i) = mean_{r, l} IntervalMean_{X%}( { min_{q in image j} ||z^{r,l}(p_i) - z^{r,l}(q)|| : j != i } )``,
image score ``s = RsCIN(max_p a(p))``.

No normal training images: every image of a batch is scored against the *other* images of the same
batch, on the assumption that normal patches find close matches in most other images and anomalous
ones do not. The scores therefore depend on the batch (``fit_needs().adaptive``: conformal
calibration does not apply, and the contract suite does not expect rows to be independent).

- LNAMD (local neighbourhood aggregation with multiple degrees): each dense layer is layer-normed
  over (C, h, w) per image (the official ``torch.nn.LayerNorm([C, h, w])``, fresh, so no affine
  part), every channel is averaged over its r x r neighbourhood (zero padding counted: the official
  unfold + adaptive average pooling of the C*r*r values down to C), coarser layers are bilinearly
  brought to the finest grid, and each patch vector is L2-normalised. ``r_list=(1, 3, 5)`` (config).
- MSM (mutual scoring): for patch p of image i and each other image j, the distance to its nearest
  patch of j; the N-1 values are sorted and the interval ``[topmin_min, topmin_max)`` of the
  smallest is averaged (``topmin_min=0``, ``topmin_max=0.3``: the lowest 30 %, official
  ``MSM(..., topmin_min=0, topmin_max=0.3)``; fractions of N-1, floored, as the official ``int``).
  Maps are averaged over layers, then over degrees r.
- RsCIN (re-scoring with constrained image-level neighbourhood): the image score is the map's
  maximum, min-max normalised over the batch, then smoothed over each image's k most similar images
  of the batch (cosine similarity of the global ``embedding``, the official CLIP class token),
  ``S_k = D_k^{-1} W_k s`` with ``W_k`` the similarity matrix keeping the k largest entries per row,
  averaged over ``rscin_k=(1, 2, 3)`` (official MVTec AD setting; VisA uses (1, 8, 9)).
  ``rscin_k=None`` gives the plain maximum.

Batches and folders: one call to ``score`` / ``score_maps`` is one batch (a folder extracted at
once is one batch). ``batch_size`` (default None = everything given is one batch) splits a huge
input into ``ceil(N / batch_size)`` near-equal subsets scored independently, as the official
``divide_num``; each subset needs at least 2 images. The cost is O(N^2 P^2 C) per layer and degree
(P patches per image), so chunk folders of more than a few hundred images.

Departures: layers of different grids are brought to the finest grid (the official code uses the
first layer's; its ViT layers all share one grid); tiny subsets whose ``floor(0.3 (N-1))`` is 0
average the single smallest value instead of an empty interval (the official code would give NaN).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.detectors._anomaly import AnomalyDetector
from oodscope.detectors.base import DetectorError, FeatureInput, register
from oodscope.detectors.kinds import FitNeeds

#: Distances held at once by the mutual scoring (rows x columns), ~128 MiB of float32.
_BLOCK = 1 << 25


def lnamd_features(dense: dict[str, torch.Tensor], r: int) -> list[torch.Tensor]:
    """One (N, P, C_l) array of unit patch vectors per layer, aggregated over r x r (see the module docstring)."""
    maps = [m.float() for m in dense.values()]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    out = []
    for m in maps:
        m = F.layer_norm(m, m.shape[1:])  # over (C, h, w) of each image, as the official LayerNorm
        if r > 1:
            m = F.avg_pool2d(m, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        z = m.flatten(2).transpose(1, 2)  # (N, P, C)
        out.append(F.normalize(z, dim=-1))
    return out


def interval(n_other: int, low: float, high: float) -> tuple[int, int]:
    """The [k_min, k_max) interval of the sorted N-1 values averaged (fractions floored, as the official int)."""
    k_min = int(n_other * low) if low < 1 else int(low)
    k_max = int(n_other * high) if high < 1 else int(high)
    k_min, k_max = min(k_min, k_max), max(k_min, k_max)
    k_max = min(max(k_max, k_min + 1), n_other)  # never an empty interval (tiny batches)
    return min(k_min, k_max - 1), k_max


def mutual_scores(z: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """MSM on unit patch vectors ``z`` (N, P, C): (N, P) interval-averaged nearest-patch distances."""
    n, p, c = z.shape
    k_min, k_max = interval(n - 1, low, high)
    flat = z.reshape(n * p, c)
    per_block = max(1, _BLOCK // max(1, p * p))  # images j compared with image i at once
    out = torch.empty(n, p, dtype=torch.float32)
    for i in range(n):
        nearest = []
        for start in range(0, n, per_block):
            stop = min(n, start + per_block)
            # the nearest patch by the inner product (unit vectors), then its distance from the
            # difference itself: 2 - 2 cos loses float32 precision for close patches
            q = (z[i] @ flat[start * p:stop * p].T).reshape(p, stop - start, p).argmax(dim=2)  # (P, n_j)
            rows = q + torch.arange(start, stop).view(1, -1) * p
            nearest.append((flat[rows] - z[i][:, None, :]).norm(dim=2))
        d = torch.cat(nearest, dim=1)  # (P, N)
        d = torch.cat([d[:, :i], d[:, i + 1:]], dim=1)  # the other images only
        out[i] = d.sort(dim=1).values[:, k_min:k_max].mean(dim=1)
    return out


def rscin(scores: torch.Tensor, embedding: torch.Tensor, k_list: tuple[int, ...]) -> torch.Tensor:
    """RsCIN: min-max normalised scores smoothed over each image's k most similar images, averaged over k."""
    s = scores.double()
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    e = F.normalize(embedding.double(), dim=1)
    w = e @ e.T
    n = len(s)
    out = []
    for k in k_list:
        k = min(int(k), n)
        keep = w.topk(k, dim=1).indices
        mask = torch.zeros_like(w).scatter_(1, keep, 1.0)
        wk = w * mask
        out.append((wk @ s) / wk.sum(dim=1))
    return torch.stack(out).mean(dim=0)


@register
class MuSc(AnomalyDetector):
    name = "musc"
    needs_fit: ClassVar[bool] = False

    def __init__(
        self,
        layers: list[str] | None = None,
        r_list: tuple[int, ...] | list[int] = (1, 3, 5),
        topmin_min: float = 0.0,
        topmin_max: float = 0.3,
        rscin_k: tuple[int, ...] | list[int] | None = (1, 2, 3),
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.r_list = list(r_list)  # lists: parameters round-trip through JSON unchanged
        self.topmin_min = topmin_min
        self.topmin_max = topmin_max
        self.rscin_k = None if rscin_k is None else list(rscin_k)
        self.batch_size = batch_size
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise DetectorError(f"{self.name}: layers must be a non-empty list of distinct names or None")
        if not r_list or any(not (isinstance(r, int) and r >= 1 and r % 2 == 1) for r in r_list):
            raise DetectorError(f"{self.name}: r_list must be odd positive integers, got {r_list!r}")
        if not (0.0 <= float(topmin_min) and 0.0 < float(topmin_max)):
            raise DetectorError(f"{self.name}: topmin_min must be >= 0 and topmin_max > 0")
        if rscin_k is not None and (not rscin_k or any(not (isinstance(k, int) and k >= 1) for k in rscin_k)):
            raise DetectorError(f"{self.name}: rscin_k must be positive integers or None, got {rscin_k!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 2):
            raise DetectorError(f"{self.name}: batch_size must be an integer >= 2 or None, got {batch_size!r}")

    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        # Nothing is learnt from normal images; the scores depend on the batch they are computed in.
        return FitNeeds(adaptive=True)

    def reset(self) -> None:
        """No stream state: every call to score / score_maps is a batch of its own."""

    def fields(self) -> tuple[str, ...]:
        return ("dense", "embedding") if self.rscin_k else ("dense",)

    def _fit_from(self, inputs: Any, labels: Any, **_: Any) -> None:
        """Nothing to learn (zero-shot); features given are ignored."""

    def score(self, features: FeatureInput) -> np.ndarray:
        return self.score_maps(features)[0]

    def score_maps(self, features: FeatureInput) -> tuple[np.ndarray, np.ndarray]:
        inputs = self._inputs(features)
        dense = inputs["dense"]
        layers = list(self.layers) if self.layers is not None else sorted(dense)
        missing = [k for k in layers if k not in dense]
        if missing:
            raise DetectorError(f"{self.name}: dense layers {missing} not in the features (they have {sorted(dense)})")
        n = len(dense[layers[0]])
        if n == 0:
            return np.zeros(0), np.zeros((0, 0, 0), np.float32)
        parts = 1 if self.batch_size is None else math.ceil(n / self.batch_size)
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        scores, maps = [], []
        with torch.no_grad():
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                chunk = {"dense": {k: dense[k][start:stop] for k in layers}}
                if "embedding" in inputs:
                    chunk["embedding"] = inputs["embedding"][start:stop]
                s, m = self._score_maps(chunk)
                scores.append(s.to("cpu", torch.float64))
                maps.append(m.to("cpu", torch.float32))
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dense = inputs["dense"]
        n = len(next(iter(dense.values())))
        if n < 2:
            raise DetectorError(f"{self.name} scores each image against the other images of its batch: "
                                f"give at least 2 images (got {n})")
        for k, v in dense.items():
            if v.ndim != 4 or not torch.isfinite(v).all():
                raise DetectorError(f"{self.name}: dense layer {k!r} must be finite (N, C, h, w) maps")
        per_r = []
        for r in self.r_list:
            zs = lnamd_features(dense, r)
            per_r.append(torch.stack([mutual_scores(z, self.topmin_min, self.topmin_max) for z in zs]).mean(0))
        flat = torch.stack(per_r).mean(0)  # (N, P)
        h, w = max((m.shape[-2:] for m in dense.values()), key=lambda s: s[0] * s[1])
        maps = flat.reshape(n, h, w)
        scores = flat.amax(dim=1).double()
        if self.rscin_k:
            scores = rscin(scores, inputs["embedding"].float(), tuple(self.rscin_k))
        return scores, maps
