"""GL-MCM — global and local maximum concept matching (zero-shot, vision-language).

Miyai, Yu, Irie, Aizawa, "GL-MCM: Global and Local Maximum Concept Matching for Zero-Shot
Out-of-Distribution Detection", IJCV 2025 (arXiv 2023).

Score: ``-( max_i softmax_i(cos(x, t_i)/T) + lambda * max_{p,i} softmax_i(cos(x_p, t_i)/T') )`` with
x_p the local (patch) embeddings, L2-normalized here. With lambda = 0 it is MCM.

Local features: the official code's (``clip/model.py``) are CLIP's last block run with self-attention
replaced by its value path, then ``ln_post`` and the projection — what ``hf:`` backbones give as
``patches`` by default (``patches="dense"``, :mod:`oodscope.backbones.hf_clip`); the ordinary projected
patch tokens (``patches="tokens"``) are not what the paper scores.

Defaults (official code, AtsuMiyai/GL-MCM):

- lambda by ``preset`` (the protocol of the official scripts): ``"imagenet"`` (default) -> 0.5
  (``scripts/eval_imagenet.sh``: ``--lambda_local 0.5``); ``"coco"`` and ``"voc"`` -> 1.0
  (``eval_ood_detection.py``'s default ``--lambda_local 1.0``, which ``scripts/eval_coco_single.sh``,
  ``eval_coco_multi.sh`` and ``eval_voc_single.sh`` keep). An explicit ``local_weight`` wins.
- T = T' = 1 (``utils/detection_util.py`` applies its single ``--T`` to both softmaxes);
- one prompt per class, ``"a photo of a {}"`` without a full stop (``utils/detection_util.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from oodscope.detectors._zeroshot import PromptDetector, max_softmax
from oodscope.detectors.base import DetectorError, register

#: preset -> lambda (weight of the local score), from the official scripts (see the module docstring).
LOCAL_WEIGHT_PRESETS: dict[str, float] = {"imagenet": 0.5, "coco": 1.0, "voc": 1.0}


@register
class GLMCM(PromptDetector):
    name = "glmcm"
    requires = ("embedding", "patches")
    default_templates: ClassVar[str | None] = "a photo of a {}"  # the official prompt (no full stop)

    def __init__(
        self,
        classes: Sequence[str],
        local_weight: float | None = None,
        preset: str = "imagenet",
        temperature: float = 1.0,
        local_temperature: float = 1.0,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if preset not in LOCAL_WEIGHT_PRESETS:
            raise DetectorError(f"glmcm: preset must be one of {sorted(LOCAL_WEIGHT_PRESETS)}, got {preset!r}")
        if not (temperature > 0 and local_temperature > 0):
            raise DetectorError("glmcm: temperatures must be > 0")
        if local_weight is not None and local_weight < 0:
            raise DetectorError("glmcm: local_weight must be >= 0")
        self.local_weight = local_weight
        self.preset = preset
        self.temperature = temperature
        self.local_temperature = local_temperature

    @property
    def lambda_(self) -> float:
        """The weight of the local score in use: ``local_weight``, else the preset's value."""
        return float(LOCAL_WEIGHT_PRESETS[self.preset] if self.local_weight is None else self.local_weight)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = inputs["patches"]
        if patches.ndim != 3 or patches.shape[1] == 0:
            raise DetectorError(f"glmcm: patches must be (N, P, D) with P >= 1, got {tuple(patches.shape)}")
        global_mcm = max_softmax(self._cosines(inputs["embedding"]) / self.temperature)
        local = torch.softmax(self._cosines(patches) / self.local_temperature, dim=-1)  # (N, P, K)
        local_mcm = local.flatten(1).amax(dim=1)
        return -(global_mcm + self.lambda_ * local_mcm)
