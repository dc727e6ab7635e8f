"""GL-MCM — global and local maximum concept matching (zero-shot, vision-language).

Miyai, Yu, Irie, Aizawa, "GL-MCM: Global and Local Maximum Concept Matching for Zero-Shot
Out-of-Distribution Detection", IJCV 2025 (arXiv 2023).

Score: ``-( max_i softmax_i(cos(x, t_i)/T) + lambda * max_{p,i} softmax_i(cos(x_p, t_i)/T') )`` with
x_p the local (patch) embeddings, L2-normalized here.
Defaults (official code, AtsuMiyai/GL-MCM): lambda = 1, T = T' = 1 (the code applies its single
temperature to both softmaxes), one prompt "a photo of a {}" per class. With lambda = 0 it is MCM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oodscope.detectors._zeroshot import PromptDetector, max_softmax
from oodscope.detectors.base import DetectorError, register


@register
class GLMCM(PromptDetector):
    name = "glmcm"
    requires = ("embedding", "patches")

    def __init__(
        self,
        classes: Sequence[str],
        local_weight: float = 1.0,
        temperature: float = 1.0,
        local_temperature: float = 1.0,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if not (temperature > 0 and local_temperature > 0):
            raise DetectorError("glmcm: temperatures must be > 0")
        if local_weight < 0:
            raise DetectorError("glmcm: local_weight must be >= 0")
        self.local_weight = local_weight
        self.temperature = temperature
        self.local_temperature = local_temperature

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = inputs["patches"]
        if patches.ndim != 3 or patches.shape[1] == 0:
            raise DetectorError(f"glmcm: patches must be (N, P, D) with P >= 1, got {tuple(patches.shape)}")
        global_mcm = max_softmax(self._cosines(inputs["embedding"]) / self.temperature)
        local = torch.softmax(self._cosines(patches) / self.local_temperature, dim=-1)  # (N, P, K)
        local_mcm = local.flatten(1).amax(dim=1)
        return -(global_mcm + self.local_weight * local_mcm)
