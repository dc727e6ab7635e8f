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

- ``local_weight`` (lambda) = 0.5, the ImageNet protocol (``scripts/eval_imagenet.sh``:
  ``--lambda_local 0.5``; also the ``"paper-imagenet"`` preset, :mod:`oodscope.detectors.presets`).
  For COCO and VOC the official value is 1.0 (``eval_ood_detection.py``'s default
  ``--lambda_local 1.0``, which ``scripts/eval_coco_single.sh``, ``eval_coco_multi.sh`` and
  ``eval_voc_single.sh`` keep): pass ``local_weight=1.0``. (The ``preset="imagenet"|"coco"|"voc"``
  parameter of earlier versions is read when an old saved detector is loaded.)
- T = T' = 1 (``utils/detection_util.py`` applies its single ``--T`` to both softmaxes);
- one prompt per class, ``"a photo of a {}"`` without a full stop (``utils/detection_util.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from oodscope.detectors._zeroshot import PromptDetector, max_softmax
from oodscope.detectors.base import DetectorError, register

#: The former ``preset`` parameter -> lambda, only to load detectors saved with it (see the module docstring).
_LEGACY_PRESETS: dict[str, float] = {"imagenet": 0.5, "coco": 1.0, "voc": 1.0}


@register
class GLMCM(PromptDetector):
    name = "glmcm"
    requires = ("embedding", "patches")
    default_templates: ClassVar[str | None] = "a photo of a {}"  # the official prompt (no full stop)

    def __init__(
        self,
        classes: Sequence[str],
        local_weight: float = 0.5,
        temperature: float = 1.0,
        local_temperature: float = 1.0,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if not (temperature > 0 and local_temperature > 0):
            raise DetectorError("glmcm: temperatures must be > 0")
        if isinstance(local_weight, bool) or not isinstance(local_weight, int | float) or not local_weight >= 0:
            raise DetectorError(f"glmcm: local_weight must be a number >= 0, got {local_weight!r}")
        self.local_weight = local_weight
        self.temperature = temperature
        self.local_temperature = local_temperature

    @property
    def lambda_(self) -> float:
        """The weight of the local score (``local_weight``)."""
        return float(self.local_weight)

    @classmethod
    def upgrade_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Saved before presets were one mechanism: ``preset`` + ``local_weight=None`` -> ``local_weight``."""
        params = dict(params)
        if "preset" in params:
            legacy = params.pop("preset")
            if params.get("local_weight") is None:
                params["local_weight"] = _LEGACY_PRESETS.get(legacy, 0.5)
        return params

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = inputs["patches"]
        if patches.ndim != 3 or patches.shape[1] == 0:
            raise DetectorError(f"glmcm: patches must be (N, P, D) with P >= 1, got {tuple(patches.shape)}")
        global_mcm = max_softmax(self._cosines(inputs["embedding"]) / self.temperature)
        local = torch.softmax(self._cosines(patches) / self.local_temperature, dim=-1)  # (N, P, K)
        local_mcm = local.flatten(1).amax(dim=1)
        return -(global_mcm + self.lambda_ * local_mcm)
