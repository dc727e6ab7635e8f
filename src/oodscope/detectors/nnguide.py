"""NNGuide — classifier confidence guided by nearest ID neighbours.

Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.

Fit: a bank of ID features ``z_i / ||z_i||`` each scaled by its energy confidence
``c_i = logsumexp(logits_i)`` (a random fraction ``subsample`` of the ID set). Score:
``-(c(x) * mean_{top-k} <x/||x||, c_i z_i/||z_i||>)`` — the guidance is the mean inner product with
the k bank entries of largest inner product; the paper's (ID) score is the product, negated here.
Defaults: ``k=None`` — a rule of the bank size ``n`` (fit images kept after ``subsample``):
``k = min(10, max(1, n // 100))``, so 1 at n = 100 and the authors' k = 10 (their code,
``configs/detector/nnguide.yaml``; OpenOOD v1.5 ``nnguide.yml`` uses K=100) from n = 1,000 on — the
same scaling of k with the bank as KNN's (Sun et al., ICML 2022), capped at the authors' value, which
they set for a bank of about 12.8k features. The chosen k is recorded in ``fit_info_["auto"]["k"]``;
an explicit ``k`` always wins. ``subsample=1.0`` — the authors' code (``bankset_ratio=0.01``) and
OpenOOD (``alpha: 0.01``) keep 1% of the ImageNet-1k training set (about 12.8k features); for the
typically smaller ID sets given to ``fit`` we keep them all by default (a bank no larger than the
authors'), so set ``subsample=0.01`` to reproduce the ImageNet protocol. ``seed`` drives
that subsampling; ``index`` / ``index_params`` choose the search back-end (inner-product metric,
see :mod:`oodscope.detectors._neighbors`).
"""

from __future__ import annotations

import torch

from oodscope.detectors import _fit_size
from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors._neighbors import NeighborIndex, bank_rows, check_search_params, l2_normalize
from oodscope.detectors.base import Detector, register
from oodscope.detectors.kinds import DetectorKind


@register
class NNGuide(FeatureField, Detector):
    name = "nnguide"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "logits")
    extra_requires = ("logits",)
    feature_choices = ("penultimate", "embedding")
    needs_fit = True

    def __init__(
        self,
        k: int | None = None,
        subsample: float = 1.0,
        seed: int = 0,
        feature: str = "penultimate",
        index: str = "exact",
        index_params: dict | None = None,
    ) -> None:
        super().__init__()
        self.k = k
        self.subsample = subsample
        self.seed = seed
        self.feature = feature
        self.index = index
        self.index_params = index_params
        self._check_feature(feature)
        check_search_params(k, subsample, index, index_params, self.name)
        self._search: NeighborIndex | None = None

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x = inputs["x"]
        keep = torch.as_tensor(bank_rows(len(x), self.k, self.subsample, self.seed, self.name), device=x.device)
        if self.k is None:
            _fit_size.record(self, "k", _fit_size.nnguide_k(len(keep)))
        confidence = torch.logsumexp(inputs["logits"][keep].to(torch.float64), dim=1)
        bank = l2_normalize(x[keep].to(torch.float64)) * confidence[:, None]
        self.state_["bank"] = bank.to(torch.float32)
        self._search = None

    def neighbours(self) -> int:
        """The k used at score time: the parameter, or the value its rule chose at fit time."""
        return self.k if self.k is not None else int(self.fit_info_[_fit_size.AUTO_KEY]["k"])

    def _index(self) -> NeighborIndex:
        bank = self.state_["bank"]
        if self._search is None or self._search_bank is not bank:
            self._search = NeighborIndex(bank, "ip", self.index, self.index_params)
            self._search_bank = bank
        return self._search

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"]
        self._check_width(x, self.state_["bank"].shape[1])
        sims, _ = self._index().search(l2_normalize(x.to(torch.float32)), self.neighbours())
        guidance = sims.to(torch.float64).mean(dim=1)
        confidence = torch.logsumexp(inputs["logits"].to(torch.float64), dim=1)
        return -(confidence * guidance)
