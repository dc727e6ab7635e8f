"""COOkeD — mean of the softmax outputs of a closed-world classifier, the zero-shot VLM classifier
and a linear probe on the VLM image embeddings.

Humblot-Renaux, Franchi, Escalera, Moeslund, "COOkeD: Ensemble-based OOD detection in the era of
zero-shot CLIP", ICCV 2025 Workshops (official code: github.com/glhr/COOkeD).

Score: with ``p = mean(softmax(z_cw), softmax(logit_scale * cos(x, t)), softmax(W x/||x|| + b))``
over the K ID classes, ``-max_k p_k`` (``scoring="msp"``, default) or ``-sum_k p_k log p_k``
(``scoring="entropy"``).

The three members, per image:
1. closed-world classifier ``z_cw`` (K logits), chosen by ``closed_world``:
   - ``"probe"`` (default): logistic regression on the classifier's ``penultimate`` features,
     fitted on the same labelled ID images. With the packaged ConSE backbone this turns its
     frozen ImageNet EfficientNet into a K-class ID classifier.
   - ``"logits"``: the ``logits`` field *is* the closed-world classifier's output over the K ID
     classes, in the order of ``classes`` (e.g. your own model trained on the ID data). Pass it as
     a dict ``{"embedding": vlm_embeddings, "logits": your_model_logits}`` or as a ``Features``
     object whose ``logits`` have K columns.
2. zero-shot classifier: ``logit_scale * cos`` against the class prompts.
3. linear probe on the VLM image embeddings (``embedding``), fitted on the same labelled ID images.

Defaults (official code, eval.py / demo.py): ``logit_scale=100`` (its main "t100" zero-shot
softmax; OpenAI CLIP's learned scale is also 100), temperature 1 for the classifier and the probe,
a plain (unweighted) mean of the three softmaxes, one prompt "a photo of a {}" (``templates=
"simple"``), ``scoring="msp"`` (the demo's score; the code reports MSP and entropy). The paper's
probe is a linear layer trained with SGD (20 epochs, lr 0.1) on the raw CLIP features of the full
ID training set, the same data as the classifier; here both probes are scikit-learn logistic
regressions (``C=1``, see ``linear_probe``) on L2-normalized features of the fit images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors._fewshot import FewShotPromptDetector, check_positive
from oodscope.detectors._linear_probe import fit_linear_probe, probe_logits
from oodscope.detectors.base import DetectorError, register

CLOSED_WORLD = ("probe", "logits")
SCORINGS = ("msp", "entropy")


@register
class COOkeD(FewShotPromptDetector):
    name = "cooked"
    requires = ("embedding", "penultimate")

    def __init__(
        self,
        classes: Sequence[str],
        closed_world: str = "probe",
        logit_scale: float = 100.0,
        C: float = 1.0,
        max_iter: int = 1000,
        scoring: str = "msp",
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if closed_world not in CLOSED_WORLD:
            raise DetectorError(f"cooked: closed_world must be one of {list(CLOSED_WORLD)}, got {closed_world!r}")
        if scoring not in SCORINGS:
            raise DetectorError(f"cooked: scoring must be one of {list(SCORINGS)}, got {scoring!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise DetectorError(f"cooked: max_iter must be a positive integer, got {max_iter!r}")
        self.closed_world = closed_world
        self.logit_scale = check_positive(logit_scale, "logit_scale", self.name)
        self.C = check_positive(C, "C", self.name)
        self.max_iter = max_iter
        self.scoring = scoring

    def fields(self) -> tuple[str, ...]:
        # The closed-world member decides which second field is read.
        return ("embedding", "penultimate" if self.closed_world == "probe" else "logits")

    def _learn(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        k = len(self.classes)
        w, b = fit_linear_probe(inputs["embedding"], labels, C=self.C, max_iter=self.max_iter, num_classes=k)
        self.state_["vlm_probe_weight"], self.state_["vlm_probe_bias"] = torch.from_numpy(w), torch.from_numpy(b)
        if self.closed_world == "probe":
            h = self._matrix(inputs["penultimate"], "penultimate")
            w, b = fit_linear_probe(h, labels, C=self.C, max_iter=self.max_iter, num_classes=k)
            self.state_["cw_probe_weight"], self.state_["cw_probe_bias"] = torch.from_numpy(w), torch.from_numpy(b)
        else:
            self._check_logits(inputs["logits"])

    def _matrix(self, value: torch.Tensor, field: str) -> torch.Tensor:
        if value.ndim != 2:
            raise DetectorError(f"cooked: {field} must be an (N, D) matrix, got shape {tuple(value.shape)}")
        return value

    def _check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        k = len(self.classes)
        if logits.ndim != 2 or logits.shape[1] != k:
            raise DetectorError(
                f"cooked: closed_world='logits' needs the closed-world classifier's logits over the {k} ID "
                f"classes, shape (N, {k}); got {tuple(logits.shape)}. For a backbone whose logits are over "
                "other classes (e.g. ImageNet), use closed_world='probe'"
            )
        return logits

    def member_probabilities(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Softmax outputs of the three members, stacked (3, N, K): closed-world, zero-shot, VLM probe."""
        x = inputs["embedding"].to(torch.float32)
        if self.closed_world == "probe":
            h = self._matrix(inputs["penultimate"], "penultimate").to(torch.float32)
            width = self.state_["cw_probe_weight"].shape[1]
            if h.shape[1] != width:
                raise DetectorError(f"cooked: fitted on {width}-d penultimate features, got {h.shape[1]}-d")
            cw = probe_logits(h, self._state("cw_probe_weight", h), self._state("cw_probe_bias", h))
        else:
            cw = self._check_logits(inputs["logits"])
        zero_shot = self._zero_shot_logits(x, self.logit_scale)
        vlm = probe_logits(x, self._state("vlm_probe_weight", x), self._state("vlm_probe_bias", x))
        return torch.stack([torch.softmax(z.to(torch.float64), dim=1) for z in (cw, zero_shot, vlm)])

    def probabilities(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ensemble's class probabilities: the mean of the members' softmax outputs (N, K)."""
        return self.member_probabilities(inputs).mean(dim=0)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.probabilities(inputs)
        if self.scoring == "msp":
            return -p.amax(dim=1)
        return torch.special.entr(p).sum(dim=1)  # -sum p log p, with 0 log 0 = 0
