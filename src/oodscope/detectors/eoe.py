"""EOE — envisioned outlier exposure (zero-shot, vision-language).

Cao, Zhang, Chen, Liu, Han, Han, "Envisioning Outlier Exposure by Large Language Models for
Out-of-Distribution Detection", ICML 2024.

The paper asks an LLM for plausible outlier class names; here the user supplies them
(``outlier_classes``), no LLM is called. With p = softmax over the ID and outlier labels of cos/T:
Score: ``-( max_{i in ID} p_i - beta * max_{j in outliers} p_j )``.
Defaults (paper Eq. 3 and official code tmlr-group/EOE): beta = 0.25, T = 1 on raw cosines, one
prompt "a photo of a {}" for ID and outlier names alike. Outlier names equal to an ID name are
dropped; ``exclude_overlapping=True`` also drops those sharing a word with an ID name (the code does
this for its near-OOD task). With beta = 0 the score is MCM's max probability times the ID mass of the
joint softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oodscope.detectors._zeroshot import PromptDetector
from oodscope.detectors.base import DetectorError, register
from oodscope.text.prompts import TextEmbeddingCache, class_text_embeddings


@register
class EOE(PromptDetector):
    name = "eoe"

    def __init__(
        self,
        classes: Sequence[str],
        outlier_classes: Sequence[str],
        beta: float = 0.25,
        temperature: float = 1.0,
        exclude_overlapping: bool = False,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if isinstance(outlier_classes, str) or not isinstance(outlier_classes, Sequence):
            raise DetectorError("eoe: outlier_classes must be a list of class names")
        if not temperature > 0:
            raise DetectorError("eoe: temperature must be > 0")
        if beta < 0:
            raise DetectorError("eoe: beta must be >= 0")
        self.outlier_classes = list(outlier_classes)
        self.beta = beta
        self.temperature = temperature
        self.exclude_overlapping = exclude_overlapping
        if not self.used_outliers():
            raise DetectorError("eoe: no outlier class names left after removing those that overlap the ID names")

    def used_outliers(self) -> list[str]:
        """The outlier names actually used (duplicates and overlaps with ID names removed)."""
        id_names = {c.strip().lower() for c in self.classes}
        id_words = {w for c in id_names for w in c.split()}
        out = []
        for name in dict.fromkeys(n.strip() for n in self.outlier_classes if n.strip()):
            low = name.lower()
            if low in id_names or (self.exclude_overlapping and any(w in id_words for w in low.split())):
                continue
            out.append(name)
        return out

    def _fit_text(self, encoder: Any, cache: TextEmbeddingCache | None) -> None:
        self.state_["class_text"] = self._encode_classes(encoder, cache)
        outliers = self.used_outliers()
        emb = class_text_embeddings(encoder, outliers, self.templates, cache=cache)
        self.state_["outlier_text"] = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        self.fit_info_["outlier_classes"] = outliers

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["embedding"]
        k = self.state_["class_text"].shape[0]
        cos = torch.cat([self._cosines(x, "class_text"), self._cosines(x, "outlier_text")], dim=1)
        prob = torch.softmax(cos / self.temperature, dim=1)
        return -(prob[:, :k].amax(dim=1) - self.beta * prob[:, k:].amax(dim=1))
