"""How much a model's results change when its network runs on another runtime or precision.

:func:`compare_runtimes` scores the same ID (and OOD) images with a reference model (eager PyTorch
FP32, as fitted) and with the same model on an exported network (:mod:`oodscope.backbones.exported`),
and reports the AUROC of each, the change, how many OOD decisions at the model's alpha differ and
the largest score difference. ``oodscope export`` prints it (an INT8 export is never applied
silently); ``tests/test_export.py`` and ``benchmarks/export_int8_accuracy.py`` use it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from oodscope.evaluation.metrics import auroc


@dataclass(frozen=True)
class RuntimeComparison:
    """Reference vs other on the same images (only images both scored count)."""

    reference: str
    other: str
    alpha: float
    n_id: int
    n_ood: int
    auroc_reference: float | None
    auroc_other: float | None
    decisions_changed: int
    #: Images flagged OOD at alpha: ID ones (false alarms) and OOD ones (detections), per model.
    id_flagged_reference: int
    id_flagged_other: int
    ood_flagged_reference: int
    ood_flagged_other: int
    max_abs_score_diff: float

    @property
    def n(self) -> int:
        return self.n_id + self.n_ood

    @property
    def auroc_change(self) -> float | None:
        if self.auroc_reference is None or self.auroc_other is None:
            return None
        return self.auroc_other - self.auroc_reference

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "auroc_change": self.auroc_change, "n": self.n}

    def lines(self) -> list[str]:
        width = max(len(self.reference), len(self.other), 8)
        out = [f"{'':<22} {self.reference:>{width}} {self.other:>{width}}   change"]
        if self.auroc_reference is not None:
            out.append(f"{'AUROC (ID vs OOD)':<22} {self.auroc_reference:>{width}.4f} {self.auroc_other:>{width}.4f}   "
                       f"{self.auroc_change:+.4f}")
        rows = [(f"ID flagged at {self.alpha:g}", self.id_flagged_reference, self.id_flagged_other, self.n_id)]
        if self.n_ood:
            rows.append((f"OOD flagged at {self.alpha:g}", self.ood_flagged_reference, self.ood_flagged_other,
                         self.n_ood))
        for label, a, b, n in rows:
            out.append(f"{label:<22} {f'{a}/{n}':>{width}} {f'{b}/{n}':>{width}}   {b - a:+d}")
        share = self.decisions_changed / self.n if self.n else 0.0
        out.append(f"decisions changed      {self.decisions_changed} of {self.n} images ({share:.2%}; "
                   f"{self.n_id} ID, {self.n_ood} OOD); max |score difference| {self.max_abs_score_diff:.3g}")
        return out


def _scored(model: Any, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, ood, ok) for ``images`` in input order."""
    pred = model.predict(images, progress=False)
    return np.asarray(pred.scores, dtype=np.float64), np.asarray(pred.ood, dtype=bool), pred.ok


def compare_runtimes(reference: Any, other: Any, id_data: Any, ood_data: Any = None, *,
                     names: tuple[str, str] = ("torch", "export")) -> RuntimeComparison:
    """Score ``id_data`` (and ``ood_data``) with two calibrated :class:`~oodscope.pipeline.OODModel`\\ s."""
    parts = [(id_data, False)] + ([(ood_data, True)] if ood_data is not None else [])
    scores_r, scores_o, ood_r, ood_o, is_ood = [], [], [], [], []
    for data, label in parts:
        s_r, d_r, ok_r = _scored(reference, data)
        s_o, d_o, ok_o = _scored(other, data)
        ok = ok_r & ok_o
        scores_r.append(s_r[ok])
        scores_o.append(s_o[ok])
        ood_r.append(d_r[ok])
        ood_o.append(d_o[ok])
        is_ood.append(np.full(int(ok.sum()), label))
    s_r, s_o = np.concatenate(scores_r), np.concatenate(scores_o)
    d_r, d_o, y = np.concatenate(ood_r), np.concatenate(ood_o), np.concatenate(is_ood)
    both = bool(y.any()) and bool((~y).any())
    return RuntimeComparison(
        reference=names[0], other=names[1], alpha=float(reference.alpha),
        n_id=int((~y).sum()), n_ood=int(y.sum()),
        auroc_reference=auroc(s_r[~y], s_r[y]) if both else None,
        auroc_other=auroc(s_o[~y], s_o[y]) if both else None,
        decisions_changed=int((d_r != d_o).sum()),
        id_flagged_reference=int(d_r[~y].sum()), id_flagged_other=int(d_o[~y].sum()),
        ood_flagged_reference=int(d_r[y].sum()), ood_flagged_other=int(d_o[y].sum()),
        max_abs_score_diff=float(np.abs(s_r - s_o).max()) if len(s_r) else 0.0,
    )
