"""Label vocabulary — the classifier's own labels as the zero-shot vocabulary (oodscope's own method).

oodscope's own method (issue 16), for a backbone derived from a classifier (ConSE): no paper
proposes it. It builds on

- ConSE (Norouzi, Mikolov, Bengio, Singer, Shlens, Frome, Corrado, Dean, "Zero-Shot Learning by
  Convex Combination of Semantic Embeddings", ICLR 2014): the classifier's probabilities over its
  own labels p(y | x) and text embeddings s(y) of those labels;
- NegLabel (Jiang, Liu, Fang, Chen, Liu, Zheng, Han, "Negative Label Guided OOD Detection with
  Pretrained Vision-Language Models", ICLR 2024): labels far from every ID class act as negatives —
  here the negatives are the labels the classifier actually knows, not words mined from a corpus;
- MCM (Ming, Cai, Gu, Sun, Li, "Delving into Out-of-Distribution Detection with Vision-Language
  Representations", NeurIPS 2022): the ID classes enter only through their names.

With ``t_k`` the text embeddings of the ID class names, ``s_j`` those of the classifier's C labels
and ``r_kj = cos(t_k, s_j)``, each label gets a relatedness weight ``w_j`` in [0, 1]:

- ``weighting="top_k"`` (hard): ``w_j = 1`` if label j is among the ``top_k`` labels nearest to some
  ID class k (by ``r_kj``), else 0;
- ``weighting="soft"``: ``w_j = max_k exp((r_kj - max_j' r_kj') / temperature)`` (1 for each class's
  nearest label, decaying with the cosine gap to it).

Score: ``S(x) = -sum_j p(y_j | x) w_j`` with ``p = softmax(logits)``: minus the probability mass the
classifier puts on labels related to the ID classes (the mass on unrelated labels, ``1 + S``, is
the negatives' share). It needs no image, only the names and the classifier's label texts.

Label texts: the text encoder's ``label_embeddings`` (ConSE: its ``label_text`` option, e.g. WordNet
lemmas + definition), else the fit option ``label_texts=[...]`` (one text per logit), encoded with
the text encoder. ID class prompts: ``templates="{}"`` (the bare name: it is matched against label
texts, not images). Defaults ``weighting="soft"``, ``temperature=0.05`` (``top_k=10`` when
``weighting="top_k"``): chosen by ``benchmarks/zero_shot_default.py`` among top-k 1 / 3 / 10 / 30 and
soft 0.02 / 0.05, by the mean AUROC over Fashion-MNIST-OOD and openclipart, four ConSE backbones and
four label texts (soft 0.05: 64.0, soft 0.02: 63.5, top-1: 61.3; docs/zero_shot.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from oodscope.detectors._zeroshot import PromptDetector
from oodscope.detectors.base import DetectorError, register
from oodscope.text.prompts import TextEmbeddingCache, encode_texts

WEIGHTINGS = ("top_k", "soft")


@register
class LabelVocabulary(PromptDetector):
    name = "label_vocabulary"
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    fit_options = ("label_texts",)  # one text per logit, when the encoder has no label_embeddings
    default_templates: ClassVar[str | None] = "{}"

    def __init__(
        self,
        classes: Sequence[str],
        weighting: str = "soft",
        top_k: int = 10,
        temperature: float = 0.05,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if weighting not in WEIGHTINGS:
            raise DetectorError(f"{self.name}: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise DetectorError(f"{self.name}: top_k must be an int >= 1")
        if not temperature > 0:
            raise DetectorError(f"{self.name}: temperature must be > 0")
        self.weighting = weighting
        self.top_k = top_k
        self.temperature = temperature

    # ----------------------------------------------------------------- fit
    def _fit_from(
        self,
        inputs: dict[str, torch.Tensor] | None,
        labels: torch.Tensor | None,
        *,
        text_encoder: Any = None,
        cache: TextEmbeddingCache | None = None,
        label_texts: Sequence[str] | None = None,
    ) -> None:
        class_text = self._encode_classes(text_encoder, cache)
        label_text = self._label_embeddings(text_encoder, cache, label_texts)
        if label_text.shape[1] != class_text.shape[1]:
            raise DetectorError(
                f"{self.name}: label embeddings have dimension {label_text.shape[1]} but the class texts "
                f"{class_text.shape[1]}: they must come from the same text encoder")
        related = relatedness_weights(class_text, label_text, self.weighting, self.top_k, self.temperature)
        self.state_["class_text"] = class_text
        self.state_["label_weight"] = related.float()
        self.fit_info_["num_labels"] = int(len(related))
        self.fit_info_["related_mass"] = float(related.sum())  # number of labels counted as ID (hard)
        if inputs is not None:
            self._check_width(inputs["logits"])

    def _label_embeddings(
        self, encoder: Any, cache: TextEmbeddingCache | None, label_texts: Sequence[str] | None
    ) -> torch.Tensor:
        if label_texts is not None:
            if isinstance(label_texts, str) or not len(label_texts):
                raise DetectorError(f"{self.name}: label_texts must be a non-empty list of texts, one per logit")
            emb = encode_texts(encoder, list(label_texts), cache=cache)
            return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        own = getattr(encoder, "label_embeddings", None)
        if own is None:
            raise DetectorError(
                f"{self.name}: needs the texts of the classifier's labels: a backbone derived from a classifier "
                "(conse:...) or fit(..., label_texts=[one text per logit])")
        return torch.as_tensor(np.asarray(own, dtype=np.float32))

    def _check_width(self, logits: torch.Tensor) -> None:
        n = int(self.state_["label_weight"].shape[0])
        if logits.shape[-1] != n:
            raise DetectorError(
                f"{self.name}: the features have {logits.shape[-1]} logits but {n} label texts were fitted; "
                "the features must come from the classifier whose labels were used in fit")

    def related_labels(self) -> np.ndarray:
        """Weight of each classifier label (1 = related to an ID class, 0 = a negative for ``top_k``)."""
        if not self.is_fitted_:
            raise DetectorError(f"{self.name}: not fitted")
        return self.state_["label_weight"].numpy().astype(np.float64)

    # ----------------------------------------------------------------- score
    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = inputs["logits"]
        self._check_width(logits)
        probs = torch.softmax(logits.double(), dim=-1)
        return -(probs @ self._state("label_weight", logits).double())


def relatedness_weights(
    class_text: torch.Tensor, label_text: torch.Tensor, weighting: str, top_k: int, temperature: float
) -> torch.Tensor:
    """``w_j`` of every label (see the module docstring), float64 (C,)."""
    cos = torch.nn.functional.normalize(class_text.double(), dim=1) @ \
        torch.nn.functional.normalize(label_text.double(), dim=1).T  # (K, C)
    if weighting == "top_k":
        k = min(top_k, cos.shape[1])
        chosen = cos.topk(k, dim=1).indices.flatten()
        w = torch.zeros(cos.shape[1], dtype=torch.float64)
        w[chosen] = 1.0
        return w
    if weighting == "soft":
        gap = cos - cos.amax(dim=1, keepdim=True)
        return torch.exp(gap / temperature).amax(dim=0)
    raise DetectorError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
