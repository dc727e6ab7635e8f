"""Tip-Adapter — a key-value cache of the few-shot images added to the zero-shot classifier.

Zhang, Zhang, Fang, Gao, Li, Dai, Qiao, Li, "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022 (official code: github.com/gaopengcuhk/Tip-Adapter).

Score: ``S(logit_scale * x t^T + alpha * exp(-beta * (1 - x K^T)) L)`` with ``x`` the L2-normalized
image embedding, ``t`` the class text embeddings, ``K`` the normalized fit embeddings (cache keys),
``L`` their one-hot labels (cache values) and ``S`` the output score (default ``-max softmax``).

Defaults: ``alpha=1`` (residual ratio) and ``beta=5.5`` (sharpness), the best values of the paper's
16-shot ImageNet ablation; the official ImageNet config starts from alpha=1.17, beta=1 and then
searches both on evaluation data. ``logit_scale=100`` is the code's ``100 * cos`` zero-shot term.
``templates="simple"`` (one prompt "a photo of a {}."; the paper uses a 7-template ensemble for
ImageNet); ``scoring="msp"`` (``"energy"``/``"gen"`` available, ``scoring_params`` their
parameters). The official cache averages 10 augmented views per image; here the fit features are
the keys as given. With ``alpha=0`` this is the zero-shot classifier (MCM with T = 1/logit_scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors._fewshot import FewShotPromptDetector, check_positive, score_logits, set_logit_scoring
from oodscope.detectors.base import register


@register
class TipAdapter(FewShotPromptDetector):
    name = "tip_adapter"
    score_batch_size = 1024  # (rows x cache size) affinity matrix per chunk

    def __init__(
        self,
        classes: Sequence[str],
        alpha: float = 1.0,
        beta: float = 5.5,
        logit_scale: float = 100.0,
        scoring: str = "msp",
        scoring_params: dict[str, Any] | None = None,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        self.alpha = check_positive(alpha, "alpha", self.name, allow_zero=True)
        self.beta = check_positive(beta, "beta", self.name, allow_zero=True)
        self.logit_scale = check_positive(logit_scale, "logit_scale", self.name)
        set_logit_scoring(self, scoring, scoring_params)

    def _learn(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        keys = torch.nn.functional.normalize(inputs["embedding"].to(torch.float32), dim=-1)
        self.state_["cache_keys"] = keys
        self.state_["cache_labels"] = labels.to(device=keys.device, dtype=torch.int64)
        counts = torch.bincount(labels, minlength=len(self.classes))
        self.fit_info_["shots_min"] = int(counts.min())

    def cache_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(-beta (1 - x K^T)) L`` (N, K) in float64: affinities summed per class."""
        xu = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
        affinity = torch.exp(-self.beta * (1.0 - xu @ self._state("cache_keys", xu).T))
        labels = self.state_["cache_labels"].to(device=xu.device)
        out = torch.zeros(len(xu), len(self.classes), dtype=xu.dtype, device=xu.device)
        return out.index_add_(1, labels, affinity)  # == affinity @ one_hot(labels)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The ensembled logits that the score is computed from (N, K), float64."""
        out = self._zero_shot_logits(x, self.logit_scale)
        if self.alpha:
            out = out + self.alpha * self.cache_logits(x)
        return out

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return score_logits(self._scorer, self.logits(inputs["embedding"]))
