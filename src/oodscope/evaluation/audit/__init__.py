"""Robustness audits of OOD detectors: prompt sensitivity and image corruptions.

Reproduces the sensitivity analysis of Lee, Cao, Ye, Yao, Song & Shen, "An Empirical Analysis of
VLM-based OOD Detection: Mechanisms, Advantages, and Sensitivity" (2025): zero-shot VLM detectors
are robust to common image noise but sensitive to how the ID classes are phrased in the prompts.

* :func:`prompt_sensitivity` re-runs a zero-shot detector (MCM by default) with many phrasings of
  the ID prompts — template paraphrases, added/removed context words, class-name synonyms, the
  template ensemble — on image features extracted **once** (only the text side is re-encoded), and
  reports AUROC / FPR@95 per phrasing and OOD set with the spread (max - min) across phrasings.
* :func:`corruption_robustness` extracts features of ImageNet-C-style corrupted ID and/or OOD
  images (:mod:`oodscope.evaluation.corruptions`) at several severities and reports each detector's
  AUROC / FPR@95 by severity, with the AUROC drop at severities 3 and 5.

Both return dataclasses with ``to_dict()`` (JSON-able) and ``save(directory)``, which writes
``audit.json`` (one entry per audit kind, so both audits can share a directory) and CSV tables;
:func:`load_audit` reads them back. :func:`plot_prompt_sensitivity` and
:func:`plot_corruption_curves` draw PNGs with matplotlib (Agg backend, imported lazily).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from oodscope.evaluation.audit._common import AUDIT_FILE, AUDIT_FORMAT, extract_features
from oodscope.evaluation.audit.corruption import CorruptionAuditResult, corruption_robustness, plot_corruption_curves
from oodscope.evaluation.audit.prompts import PromptAuditResult, plot_prompt_sensitivity, prompt_sensitivity
from oodscope.evaluation.audit.variants import (
    BASELINE_TEMPLATE,
    CONTEXT_TEMPLATES,
    DOMAIN_TEMPLATES,
    PARAPHRASE_TEMPLATES,
    PromptVariant,
    prompt_variants,
    wordnet_synonyms,
)


# ------------------------------------------------------------------------------- persistence
def load_audit(path: str | os.PathLike) -> dict[str, PromptAuditResult | CorruptionAuditResult]:
    """The audits saved in a directory (or an ``audit.json`` file): kind -> result object."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("format") != AUDIT_FORMAT:
        raise ValueError(f"{path}: not an oodscope audit file")
    kinds = {PromptAuditResult.kind: PromptAuditResult, CorruptionAuditResult.kind: CorruptionAuditResult}
    return {k: kinds[k].from_dict(v) for k, v in document["audits"].items() if k in kinds}


__all__ = [
    "BASELINE_TEMPLATE",
    "CONTEXT_TEMPLATES",
    "DOMAIN_TEMPLATES",
    "PARAPHRASE_TEMPLATES",
    "CorruptionAuditResult",
    "PromptAuditResult",
    "PromptVariant",
    "corruption_robustness",
    "extract_features",
    "load_audit",
    "plot_corruption_curves",
    "plot_prompt_sensitivity",
    "prompt_sensitivity",
    "prompt_variants",
    "wordnet_synonyms",
]
