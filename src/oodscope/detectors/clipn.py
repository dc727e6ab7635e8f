"""CLIPN — CLIP that can say "no" (zero-shot, vision-language, needs CLIPN's "no" text encoder).

Wang, Li, Yang, Lin, Tang, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No",
ICCV 2023.

With l_i = cos(x, t_i)/tau for the usual ("yes") class prompts and n_i = cos(x, t_i^no)/tau for the same
prompts through the "no" text encoder, p_i = softmax(l)_i and p_i^yes = e^{l_i} / (e^{l_i} + e^{n_i})
(the probability of "yes, class i" against "no, not class i"):
Score ``mode="atd"`` (agreeing-to-differ): ``1 - sum_i p_i * p_i^yes``.
Score ``mode="ctw"`` (competing-to-win): ``1 - p_c^yes`` at the predicted class c = argmax_i l_i.
Both are the paper's OOD probabilities (higher = more OOD).
Defaults (official code xmed-lab/CLIPN, ``src/zero_shot_infer.py``, ``src/classification.py``):
tau = 0.01 (its logit scale 100), prompt ensembling over a template list for both encoders
(``templates="ensemble"``: oodscope's own set), ``mode="atd"``.

The "yes" side is the vision-language backbone's own text encoder (``fit(text_encoder=backbone)``);
the "no" side is :class:`oodscope.backbones.clipn_text.CLIPNNoTextEncoder`, given to ``fit`` as
``no_text_encoder=`` or loaded from the ``no_encoder`` directory.
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
class CLIPN(PromptDetector):
    name = "clipn"
    default_templates = "ensemble"
    fit_options = ("no_text_encoder",)

    def __init__(
        self,
        classes: Sequence[str],
        mode: str = "atd",
        temperature: float = 0.01,
        no_encoder: str | None = None,
        **prompt_options: Any,
    ) -> None:
        super().__init__()
        self._set_text_params(classes, **prompt_options)
        if mode not in ("atd", "ctw"):
            raise DetectorError(f"clipn: mode must be 'atd' or 'ctw', got {mode!r}")
        if not temperature > 0:
            raise DetectorError("clipn: temperature must be > 0")
        self.mode = mode
        self.temperature = temperature
        self.no_encoder = None if no_encoder is None else str(no_encoder)

    def _fit_text(self, encoder: Any, cache: TextEmbeddingCache | None, no_text_encoder: Any = None) -> None:
        if no_text_encoder is None:
            if self.no_encoder is None:
                raise DetectorError(
                    "clipn needs CLIPN's 'no' text encoder: fit(text_encoder=backbone, no_text_encoder=...) or "
                    "create('clipn', ..., no_encoder='/path/to/clipn-no-text') (see docs/zero_shot.md)"
                )
            from oodscope.backbones.clipn_text import CLIPNNoTextEncoder

            no_text_encoder = CLIPNNoTextEncoder(self.no_encoder)
        if not callable(getattr(no_text_encoder, "encode_texts", None)):
            raise DetectorError("clipn: no_text_encoder must have encode_texts(list[str])")
        yes = self._encode_classes(encoder, cache)
        no = class_text_embeddings(
            no_text_encoder, self.classes, self.templates, self.custom_prompts, self.descriptions, cache=cache
        )
        if no.shape != tuple(yes.shape):
            raise DetectorError(f"clipn: 'no' text embeddings have shape {no.shape}, 'yes' ones {tuple(yes.shape)}")
        self.state_["class_text"] = yes
        self.state_["class_text_no"] = torch.from_numpy(np.ascontiguousarray(no, dtype=np.float32))

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["embedding"]
        yes = self._cosines(x, "class_text") / self.temperature
        no = self._cosines(x, "class_text_no") / self.temperature
        p_yes = torch.sigmoid(yes - no)  # e^l / (e^l + e^n)
        if self.mode == "atd":
            return 1.0 - (torch.softmax(yes, dim=1) * p_yes).sum(dim=1)
        predicted = yes.argmax(dim=1, keepdim=True)
        return 1.0 - p_yes.gather(1, predicted).squeeze(1)
