"""PatchCore — nearest-neighbour distance to a coreset memory bank of locally aware patch features.

Roth, Pemula, Zepeda, Schölkopf, Brox & Gehler, "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022.

Formula: ``map(x)_ij = min_{m in M_C} ||phi_ij(x) - m||``, image score
``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * max_ij map_ij`` (eq. 7).

- Locally aware patch features (Section 3.1): each chosen dense layer is average-pooled over its
  3 x 3 neighbourhood (stride 1, zero padding counted, as ``torch.nn.AvgPool2d(3, 1, 1)`` in anomalib),
  coarser layers are bilinearly upsampled to the finest grid, the layers are concatenated, and the
  channel vector is adaptively average-pooled to ``target_dim`` when it is wider (the official code's
  ``target_embed_dimension=1024``; narrower features are kept as they are).
- Memory bank (Section 3.2): greedy k-center coreset of ``coreset_ratio`` of all training patches
  (default 0.1, the paper's 10 %; 0.01 is its 1 % setting; 1.0 keeps every patch), selected in a
  Johnson-Lindenstrauss sparse random projection to ``projection_dim`` dimensions (128, the official
  ``dimension_to_project_features_to``; sparse as anomalib's ``KCenterGreedy``), first pick drawn
  with ``seed``. ``coreset="stream"`` (default) selects chunk by chunk (``chunk_patches`` patches at
  a time), holding only the bank and one chunk; ``"exact"`` runs the exact greedy on all patches at
  once (memory grows with the training set). See :mod:`oodscope.detectors._coreset` for the
  algorithm, how it relates to the exact greedy and the approximation bound stored in
  ``fit_info_["coreset"]``.
- Scores (Section 3.3): the map is each patch's distance to its nearest bank feature (FAISS
  ``IndexFlatL2`` when ``faiss`` is installed, else an exact blocked torch search;
  ``index="approximate"`` for FAISS IVF/HNSW). The image score re-weights the largest patch score
  by eq. 7 with ``num_neighbors=9`` (anomalib's ``num_neighbors`` default; ``N_b(m*)`` are the 9
  bank features nearest to ``m*``, ``m*`` itself first). ``num_neighbors=1`` gives the plain maximum,
  which is what the official ``patchcore-inspection`` code returns.
- Maps are at the finest grid of the chosen layers; the pipeline brings them to image size with
  :func:`~oodscope.detectors._anomaly.upsample_maps` (bilinear, then Gaussian sigma = 4 px, as
  the official code and anomalib).

``layers=None`` uses every dense layer the backbone exposes (the paper: WideResNet-50 layer2 +
layer3, strides 8 and 16; choose the backbone's ``dense_layers`` accordingly).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.backbones.base import Features
from oodscope.detectors._anomaly import AnomalyDetector
from oodscope.detectors._coreset import StreamingGreedyCoreset, sparse_random_projection
from oodscope.detectors._neighbors import NeighborIndex, check_index_options
from oodscope.detectors.base import DetectorError, FeatureInput, register

CORESET_MODES = ("stream", "exact")


def locally_aware_features(dense: dict[str, torch.Tensor], target_dim: int | None) -> torch.Tensor:
    """(N, C_l, h_l, w_l) maps -> (N, H, W, D) patch features at the finest grid (see the module docstring)."""
    maps = list(dense.values())
    for name, m in dense.items():
        if m.ndim != 4:
            raise DetectorError(f"patchcore: dense layer {name!r} must be (N, C, h, w), got {tuple(m.shape)}")
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    parts = []
    for m in maps:
        m = F.avg_pool2d(m.float(), kernel_size=3, stride=1, padding=1)
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        parts.append(m)
    x = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (N, H, W, D)
    if target_dim is not None and x.shape[-1] > target_dim:
        n, h, w, d = x.shape
        x = F.adaptive_avg_pool1d(x.reshape(-1, 1, d), target_dim).reshape(n, h, w, target_dim)
    return x.contiguous()


def reweighted_scores(
    patch_dist: torch.Tensor, nn_index: torch.Tensor, patches: torch.Tensor, bank: torch.Tensor,
    search: NeighborIndex, num_neighbors: int,
) -> torch.Tensor:
    """Eq. 7 for each image: ``patch_dist`` (n, P) NN distances, ``nn_index`` (n, P) bank rows,
    ``patches`` (n, P, D) test features."""
    rows = torch.arange(len(patch_dist), device=patch_dist.device)
    star = patch_dist.argmax(dim=1)
    s_star = patch_dist[rows, star]
    k = min(num_neighbors, len(bank))
    if k <= 1:
        return s_star
    m_star = bank[nn_index[rows, star]]  # (n, D): the nearest bank feature of the most anomalous patch
    _, support = search.search(m_star, k)  # its k nearest bank features, itself first
    test = patches[rows, star]  # (n, D)
    dist = (bank[support] - test[:, None, :]).pow(2).sum(dim=2).sqrt()  # (n, k)
    weight = 1.0 - torch.softmax(dist.double(), dim=1)[:, 0]
    return weight * s_star.double()


@register
class PatchCore(AnomalyDetector):
    name = "patchcore"

    def __init__(
        self,
        layers: list[str] | None = None,
        coreset_ratio: float = 0.1,
        coreset: str = "stream",
        projection_dim: int = 128,
        target_dim: int | None = 1024,
        num_neighbors: int = 9,
        chunk_patches: int = 16384,
        seed: int = 0,
        index: str = "exact",
        index_params: dict | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.coreset = coreset
        self.projection_dim = projection_dim
        self.target_dim = target_dim
        self.num_neighbors = num_neighbors
        self.chunk_patches = chunk_patches
        self.seed = seed
        self.index = index
        self.index_params = index_params
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise DetectorError(f"{self.name}: layers must be a non-empty list of distinct names or None")
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise DetectorError(f"{self.name}: coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if coreset not in CORESET_MODES:
            raise DetectorError(f"{self.name}: coreset must be one of {list(CORESET_MODES)}, got {coreset!r}")
        for key, value in (("projection_dim", projection_dim), ("num_neighbors", num_neighbors),
                           ("chunk_patches", chunk_patches)):
            if not (isinstance(value, int) and value >= 1):
                raise DetectorError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if target_dim is not None and not (isinstance(target_dim, int) and target_dim >= 1):
            raise DetectorError(f"{self.name}: target_dim must be a positive integer or None, got {target_dim!r}")
        check_index_options(index, index_params, self.name)
        self._search: NeighborIndex | None = None
        self._search_bank: Any = None

    # ------------------------------------------------------------------ fit
    def _inputs(self, features: FeatureInput, fields: tuple[str, ...] | None = None) -> dict:
        """The dense maps as they come (float16 stays float16, arrays are wrapped without a copy).

        The base class would convert every map to float32 up front — twice the caller's float16
        features, growing with the training set; here each chunk of images is converted (and checked
        for NaN) when it is used, so fitting holds the bank and one chunk besides the caller's arrays."""
        dense = features.dense if isinstance(features, Features) else (
            features.get("dense") if isinstance(features, dict) else None)
        if not dense or fields not in (None, ("dense",)):
            return super()._inputs(features, fields)
        out = {}
        with warnings.catch_warnings():  # read-only arrays (memory maps): never written to
            warnings.simplefilter("ignore", UserWarning)
            for name, v in dense.items():
                t = v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v))
                out[name] = t if torch.is_floating_point(t) else t.float()
        if len({len(v) for v in out.values()}) > 1:
            raise DetectorError(f"{self.name}: dense layers disagree on the number of images")
        return {"dense": out}

    def _features(self, inputs: dict, start: int = 0, stop: int | None = None) -> torch.Tensor:
        dense = inputs["dense"]
        layers = self.fit_info_.get("layers", self.layers) or sorted(dense)
        missing = [k for k in layers if k not in dense]
        if missing:
            raise DetectorError(f"{self.name}: dense layers {missing} not in the features (they have {sorted(dense)})")
        chunk = {k: dense[k][start:stop].float() for k in layers}
        for k, v in chunk.items():
            if not torch.isfinite(v).all():
                raise DetectorError(f"{self.name}: dense layer {k!r} contains NaN or infinite values")
        return locally_aware_features(chunk, self.target_dim)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        layers = list(self.layers) if self.layers is not None else sorted(inputs["dense"])
        if not layers:
            raise DetectorError(f"{self.name}: the features have no dense maps (ask the backbone for dense_layers)")
        self.fit_info_["layers"] = layers
        n = len(inputs["dense"][layers[0]])
        probe = self._features(inputs, 0, 1)
        _, h, w, d = probe.shape
        per_image = h * w
        total = n * per_image
        projection = None
        if self.projection_dim < d:
            projection = sparse_random_projection(d, self.projection_dim, self.seed)
        exact = self.coreset == "exact"
        images_per_chunk = n if exact else max(1, self.chunk_patches // per_image)
        if self.coreset_ratio >= 1.0:  # the full bank: no selection
            chunks = [self._features(inputs, s, s + images_per_chunk).reshape(-1, d)
                      for s in range(0, n, images_per_chunk)]
            bank = torch.cat(chunks).to(torch.float32)
            self.fit_info_["coreset"] = {"mode": "full"}
        else:
            selector = StreamingGreedyCoreset(total, float(self.coreset_ratio), projection, self.seed)
            for s in range(0, n, images_per_chunk):
                selector.add(self._features(inputs, s, s + images_per_chunk).reshape(-1, d).cpu().numpy())
            bank = torch.from_numpy(selector.bank())
            self.fit_info_["coreset"] = {"mode": self.coreset, **selector.certificate().as_dict()}
        self.state_["bank"] = bank.contiguous()
        self.fit_info_.update(grid=[h, w], dim=d, train_patches=total, bank_size=len(bank))
        self._search = None

    # ------------------------------------------------------------------ score
    def _index(self) -> NeighborIndex:
        bank = self.state_["bank"]
        # Rebuilt lazily, so a loaded detector (whose state_ was replaced) gets a fresh index.
        if self._search is None or self._search_bank is not bank:
            self._search = NeighborIndex(bank.float(), "l2", self.index, self.index_params)
            self._search_bank = bank
        return self._search

    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._features(inputs)
        n, h, w, d = x.shape
        if [h, w] != list(self.fit_info_["grid"]) or d != self.fit_info_["dim"]:
            raise DetectorError(
                f"{self.name}: fitted on a {self.fit_info_['grid']} grid of {self.fit_info_['dim']}-d features, "
                f"got {[h, w]} x {d}-d (same backbone, layers and image size are needed)"
            )
        patches = x.reshape(n, h * w, d)
        bank = self.state_["bank"].to(device=x.device, dtype=torch.float32)
        search = self._index()
        sq, idx = search.search(patches.reshape(-1, d), 1)
        dist = sq[:, 0].clamp_min(0.0).sqrt().reshape(n, h * w)
        scores = reweighted_scores(dist, idx[:, 0].reshape(n, h * w), patches, bank, search, self.num_neighbors)
        return scores, dist.reshape(n, h, w)

