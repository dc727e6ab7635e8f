"""MCM — maximum concept matching (zero-shot, vision-language).

Ming, Cai, Gu, Sun, Li, "Delving into Out-of-Distribution Detection with Vision-Language
Representations", NeurIPS 2022.

Score: ``-max_i softmax_i(cos(x, t_i) / T)`` over the ID class text embeddings t_i.
Defaults (paper and official code, deeplearning-wisc/MCM): T = 1 on raw cosines; one prompt
"a photo of a {}" per class (``templates="simple"``; ``"ensemble"`` uses oodscope's template set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors._zeroshot import PromptDetector, max_softmax
from oodscope.detectors.base import DetectorError, register


@register
class MCM(PromptDetector):
    name = "mcm"

    def __init__(
        self,
        classes: Sequence[str],
        temperature: float = 1.0,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if not temperature > 0:
            raise DetectorError("mcm: temperature must be > 0")
        self.temperature = temperature

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return -max_softmax(self._cosines(inputs["embedding"]) / self.temperature)
