"""PaDiM — a Gaussian per patch position of concatenated multi-layer features; Mahalanobis maps.

Defard, Setkov, Loesch & Audigier, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", ICPR 2020 workshops (ICPR Workshops 2021, LNCS 12664; arXiv:2011.08785).

Formula: ``map(x)_ij = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))`` with
``Sigma_ij = cov(x_ij) + 0.01 I`` over the normal images; image score ``max_ij map_ij``.

- Embedding (Section 3.1): the chosen dense layers, coarser ones upsampled to the finest grid by
  nearest-neighbour interpolation (anomalib's ``generate_embedding``; the official code's
  ``embedding_concat`` places each coarse cell over the fine cells it covers, the same thing for
  integer stride ratios), concatenated along channels.
- Random channel selection (Section 4.1, Table 1): ``n_features`` of the ``D`` concatenated channels,
  drawn without replacement with ``seed``. ``n_features=None`` follows the paper's two settings by
  the backbone's width: ``d = 100`` for ResNet18's ``D = 448`` (layers 1-3) and ``d = 550`` for
  WideResNet-50's ``D = 1792`` (the official code and anomalib's ``_N_FEATURES_DEFAULTS``): 550 when
  ``D >= 1792``, otherwise ``min(D, 100)``. The chosen value is recorded in ``fit_info_``.
- Covariance (Section 3.2): the unbiased sample covariance (divided by N - 1, ``np.cov`` in the
  official code) plus ``epsilon * I`` with ``epsilon = 0.01`` (official code and anomalib).
- Score: the map is the Mahalanobis distance (square root, as ``scipy.spatial.distance.mahalanobis``
  in the official code) at the finest grid; the image score is the map's maximum (anomalib's
  ``pred_score = amax(anomaly_map)``). anomalib takes that maximum after upsampling and Gaussian
  smoothing (sigma = 4 px); the detector never sees image sizes, so it takes the maximum of the
  unsmoothed grid (the maps are smoothed by :func:`~oodscope.detectors._anomaly.upsample_maps`).
  The official code also min-max normalises scores over the whole test set, which makes a score
  depend on the other images; that is not done here.

``layers=None`` uses every dense layer the backbone exposes (the paper: layer1-3, strides 4, 8, 16).
Memory: one (d, d) float32 precision matrix per grid cell — 125 MB for d = 100 on a 56 x 56 grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.detectors._anomaly import AnomalyDetector, dense_inputs
from oodscope.detectors.base import DetectorError, register

#: The paper's two settings: (concatenated width D, selected d) for ResNet18 and WideResNet-50.
PAPER_WIDTHS = ((448, 100), (1792, 550))
#: Grid cells per chunk when fitting and scoring (bounds the (cells, d, d) float64 temporaries).
CELL_CHUNK = 256
#: Images per chunk when accumulating the fit sums.
IMAGE_CHUNK = 32


def default_n_features(width: int) -> int:
    """``n_features=None``: 550 from WideResNet-50's width (1792) on, else ``min(width, 100)``."""
    (_, small), (wide_width, wide) = PAPER_WIDTHS
    return wide if width >= wide_width else min(width, small)


def concat_embedding(dense: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C_l, h_l, w_l) maps -> (N, D, H, W) at the finest grid (nearest upsampling of coarser maps)."""
    for name, m in dense.items():
        if m.ndim != 4:
            raise DetectorError(f"padim: dense layer {name!r} must be (N, C, h, w), got {tuple(m.shape)}")
    size = max((m.shape[-2:] for m in dense.values()), key=lambda s: s[0] * s[1])
    parts = [m if tuple(m.shape[-2:]) == tuple(size) else F.interpolate(m, size=tuple(size), mode="nearest")
             for m in dense.values()]
    return torch.cat(parts, dim=1)


@register
class PaDiM(AnomalyDetector):
    name = "padim"

    def __init__(
        self, layers: list[str] | None = None, n_features: int | None = None, epsilon: float = 0.01, seed: int = 0
    ) -> None:
        super().__init__()
        self.layers = layers
        self.n_features = n_features
        self.epsilon = epsilon
        self.seed = seed
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise DetectorError(f"{self.name}: layers must be a non-empty list of distinct names or None")
        if n_features is not None and not (isinstance(n_features, int) and n_features >= 1):
            raise DetectorError(f"{self.name}: n_features must be a positive integer or None, got {n_features!r}")
        if not float(epsilon) >= 0.0:
            raise DetectorError(f"{self.name}: epsilon must be >= 0, got {epsilon}")

    def _embedding(self, inputs: dict, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, P, d) selected channels per grid cell of images ``start:stop``."""
        dense = dense_inputs(inputs, self.fit_info_["layers"], self.name)
        x = concat_embedding({k: v[start:stop] for k, v in dense.items()})
        idx = self.state_["channels"].to(device=x.device, dtype=torch.long)
        if x.shape[1] != self.fit_info_["width"]:
            raise DetectorError(f"{self.name}: fitted on {self.fit_info_['width']} channels, got {x.shape[1]}")
        x = x.index_select(1, idx)
        return x.flatten(2).transpose(1, 2)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        layers = list(self.layers) if self.layers is not None else sorted(inputs["dense"])
        if not layers:
            raise DetectorError(f"{self.name}: the features have no dense maps (ask the backbone for dense_layers)")
        probe = concat_embedding({k: v[:1] for k, v in dense_inputs(inputs, layers, self.name).items()})
        n = len(inputs["dense"][layers[0]])
        _, width, h, w = probe.shape
        if n < 2:
            raise DetectorError(f"{self.name}: a covariance per position needs at least 2 normal images, got {n}")
        d = self.n_features if self.n_features is not None else default_n_features(width)
        if d > width:
            raise DetectorError(f"{self.name}: n_features={d} but the chosen layers have only {width} channels")
        channels = np.sort(np.random.default_rng(self.seed).choice(width, size=d, replace=False))
        self.fit_info_.update(layers=layers, width=width, n_features=d, grid=[h, w])
        self.state_["channels"] = torch.from_numpy(channels.astype(np.int64))
        # Streamed sums over image chunks: memory is the model's (P, d, d), not the images' (N, P, d).
        total = torch.zeros(h * w, d, dtype=torch.float64, device=probe.device)
        outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=probe.device)
        for s in range(0, n, IMAGE_CHUNK):
            x = self._embedding(inputs, s, s + IMAGE_CHUNK).to(torch.float64).transpose(0, 1)  # (P, b, d)
            total += x.sum(dim=1)
            outer.baddbmm_(x.transpose(1, 2), x)
        mean = total / n
        eye = torch.eye(d, dtype=torch.float64, device=probe.device)
        precisions = []
        for c0 in range(0, h * w, CELL_CHUNK):
            m = mean[c0 : c0 + CELL_CHUNK]
            cov = (outer[c0 : c0 + CELL_CHUNK] - n * m[:, :, None] * m[:, None, :]) / (n - 1)
            precisions.append(torch.linalg.inv(cov + float(self.epsilon) * eye).to(torch.float32))
        self.state_["mean"] = mean
        self.state_["precision"] = torch.cat(precisions)
        if n <= d:
            self._caution(
                f"fitted on {n} images for {d}-d Gaussians per position: each covariance rests on the "
                f"{self.epsilon} * I regulariser in {d - n + 1} or more directions; fit on more than {d} images"
            )

    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._embedding(inputs)  # (n, P, d)
        h, w = self.fit_info_["grid"]
        if x.shape[1] != h * w:
            raise DetectorError(f"{self.name}: fitted on a {h} x {w} grid, got {x.shape[1]} cells")
        mean = self.state_["mean"].to(device=x.device, dtype=torch.float64)
        prec = self.state_["precision"]
        out = []
        for c0 in range(0, h * w, CELL_CHUNK):
            diff = x[:, c0 : c0 + CELL_CHUNK].double() - mean[None, c0 : c0 + CELL_CHUNK]
            p = prec[c0 : c0 + CELL_CHUNK].to(device=x.device, dtype=torch.float64)
            out.append(torch.einsum("npi,pij,npj->np", diff, p, diff).clamp_min(0.0).sqrt())
        maps = torch.cat(out, dim=1).reshape(len(x), h, w)
        return maps.flatten(1).amax(dim=1), maps.float()
