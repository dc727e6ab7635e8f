"""KNN — distance to the k-th nearest in-distribution neighbour of the normalised feature.

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.

Score: ``|| z/||z|| - z_(k)/||z_(k)|| ||_2`` — Euclidean distance from the L2-normalised feature to
its k-th nearest neighbour in the bank of L2-normalised ID features (the paper thresholds the
negative distance; this is higher = more OOD).
Defaults: ``k=None`` — a rule of the bank size ``n`` (fit images kept after ``subsample``):
``k = min(50, max(1, n // 100))``: 1 at n = 100, 10 at n = 1,000, and the paper's CIFAR-10 value 50
(OpenOOD v1.5 ``knn.yml``) from n = 5,000 on. Source: the paper scales k with the fraction alpha of
the training set kept in the bank (ImageNet-1k: k = 1,000 at alpha = 100%, k = 10 at alpha = 1%;
CIFAR-10: k = 50 on 50,000 images). On a 100-image bank k = 50 is half the bank and can score at or below
chance (see ``docs/fit_size_defaults.md``). The chosen k is recorded in ``fit_info_["auto"]["k"]``
(:mod:`oodscope.detectors._fit_size`); an explicit ``k`` always wins and is not recorded there.
``subsample=1.0`` (the paper's alpha = 100%).
``index``: ``"exact"`` (FAISS ``IndexFlatL2``, or pure torch without faiss), ``"approximate"``
(FAISS IVF or HNSW, configured by ``index_params``; see :mod:`oodscope.detectors._neighbors`) or
``"torch"`` (exact, on the device of the features). ``seed`` drives the alpha subsampling.
``feature="auto"``: ``penultimate`` when present, else ``embedding``.
Saved state: the normalised (subsampled) bank; the search index is rebuilt from it on first use.
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors._neighbors import NeighborIndex, bank_rows, check_search_params, l2_normalize
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class KNN(FeatureField, Detector):
    name = "knn"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True

    def __init__(
        self,
        k: int | None = None,
        feature: str = "auto",
        subsample: float = 1.0,
        seed: int = 0,
        index: str = "exact",
        index_params: dict | None = None,
    ) -> None:
        super().__init__()
        self.k = k
        self.feature = feature
        self.subsample = subsample
        self.seed = seed
        self.index = index
        self.index_params = index_params
        self._check_feature(feature)
        check_search_params(k, subsample, index, index_params, self.name)
        self._search: NeighborIndex | None = None

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x = inputs["x"]
        keep = bank_rows(len(x), self.k, self.subsample, self.seed, self.name)
        if self.k is None:
            _fit_size.record(self, "k", _fit_size.knn_k(len(keep)))
        self.state_["bank"] = l2_normalize(x[torch.as_tensor(keep, device=x.device)].to(torch.float32))
        self._search = None

    def neighbours(self) -> int:
        """The k used at score time: the parameter, or the value its rule chose at fit time."""
        return self.k if self.k is not None else int(self.fit_info_[_fit_size.AUTO_KEY]["k"])

    def _index(self) -> NeighborIndex:
        bank = self.state_["bank"]
        # Rebuilt lazily so that a loaded detector (whose state_ was replaced) gets a fresh index.
        if self._search is None or self._search_bank is not bank:
            self._search = NeighborIndex(bank, "l2", self.index, self.index_params)
            self._search_bank = bank
        return self._search

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"]
        self._check_width(x, self.state_["bank"].shape[1])
        sq, _ = self._index().search(l2_normalize(x.to(torch.float32)), self.neighbours())
        return sq[:, -1].clamp_min(0.0).sqrt()
