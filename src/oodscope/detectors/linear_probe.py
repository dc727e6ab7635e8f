"""Linear probe — logistic regression on (vision-language) image embeddings, scored by MSP / Energy / GEN.

The linear-probe classifier of Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021 (L-BFGS multinomial logistic regression on frozen image features),
used as an OOD detector through the output scores of Hendrycks & Gimpel (MSP, ICLR 2017), Liu et
al. (Energy, NeurIPS 2020) or Liu, Lochman & Zach (GEN, CVPR 2023).

Score: ``S(W x/||x|| + b)`` with ``(W, b)`` fitted by scikit-learn's ``LogisticRegression`` on the
L2-normalized labelled fit features and ``S`` one registered output detector: ``scoring="msp"``
(``-max softmax``, default), ``"energy"`` (``-T logsumexp(z/T)``, T=1) or ``"gen"`` (gamma=0.1,
M=min(100, K), GEN's defaults); ``scoring_params`` are passed to that detector. One registered name
covers the three scores, so a saved probe records which one it uses.

Defaults: ``feature="embedding"`` (a probe on the vision-language image embedding; ``"penultimate"``
or ``"auto"`` probe a classifier's features instead). ``C=1`` (scikit-learn's default): the CLIP
paper sweeps C on validation data, which few-shot ID data rarely allow. On the packaged ConSE
backbone (Fashion-MNIST, 10 shots/class fit, 60 held-out ID vs 80 near-OOD *training-split*
images, both halves swapped) C in {0.1, 1} gave the best MSP AUROC (0.72-0.85) and larger C
(10-1000) steadily worse (down to 0.54-0.76): on unit-norm features weak regularisation makes the
probe over-confident on near-OOD images. See docs/few_shot.md.
"""

from __future__ import annotations

from typing import Any

import torch

from oodscope.detectors._feature_select import FeatureField
from oodscope.detectors._fewshot import check_positive, score_logits, set_logit_scoring
from oodscope.detectors._linear_probe import fit_linear_probe, probe_logits
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind


@register
class LinearProbe(FeatureField, Detector):
    name = "linear_probe"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True
    needs_labels = True

    def __init__(
        self,
        feature: str = "embedding",
        C: float = 1.0,
        max_iter: int = 1000,
        scoring: str = "msp",
        scoring_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.feature = feature
        self.C = check_positive(C, "C", self.name)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise DetectorError(f"{self.name}: max_iter must be a positive integer, got {max_iter!r}")
        self.max_iter = max_iter
        self._check_feature(feature)
        set_logit_scoring(self, scoring, scoring_params)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        self._record_fields()
        x = inputs["x"]
        if len(x) == 0:
            raise DetectorError(f"{self.name}: fit needs at least one labelled image")
        if int(labels.min()) < 0:
            raise DetectorError(f"{self.name}: labels must be non-negative class indices")
        weight, bias = fit_linear_probe(x, labels, C=self.C, normalize=True, max_iter=self.max_iter)
        self.state_["weight"] = torch.from_numpy(weight)
        self.state_["bias"] = torch.from_numpy(bias)
        self.fit_info_["num_classes"] = int(weight.shape[0])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Probe logits (N, K) of the L2-normalized features, float32."""
        self._check_width(x, self.state_["weight"].shape[1])
        x = x.to(torch.float32)
        return probe_logits(x, self._state("weight", x), self._state("bias", x), normalize=True)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax`` of the probe logits: the classifier's class probabilities (N, K)."""
        return torch.softmax(self.logits(x), dim=1)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return score_logits(self._scorer, self.logits(inputs["x"]))
