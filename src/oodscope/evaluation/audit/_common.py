"""What both audits share: extracting features once, pairing ID/OOD metrics, CSV/JSON output, plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from oodscope.backbones.base import Features
from oodscope.evaluation.metrics import auroc, fpr_at_tpr
from oodscope.evaluation.streams import adaptive_pair_scores, is_adaptive

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "oodscope-audit"
AUDIT_FORMAT_VERSION = 1
MEAN_KEY = "mean"  # summary entry averaged over OOD sets / corruptions


# ------------------------------------------------------------------------------------ helpers
@dataclass
class ExtractedData:
    features: Features
    labels: np.ndarray | None
    class_names: list[str] | None
    n_failed: int


def is_source(data: Any) -> bool:
    return callable(getattr(data, "read", None)) and callable(getattr(data, "decode", None))


def extract_features(
    backbone: Any,
    source: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    description: str = "extract",
) -> tuple[Features, np.ndarray | None, int]:
    """Features of an image source: (features of the images that loaded, their labels, failures).

    A derived backbone (ConSE) is run as its classifier by the extraction, so the classifier's feature
    cache (e.g. the benchmarks' EfficientNet-Lite features) is reused.
    """
    from oodscope.features.extract import extract

    result = extract(backbone, source, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                     progress=progress, description=description)
    if not len(result.indices):
        raise ValueError(f"{description}: no image could be read ({len(result.failures)} failures)")
    return result.features, result.labels, len(result.failures)


def as_data(backbone: Any, data: Any, description: str, options: dict[str, Any]) -> ExtractedData:
    if isinstance(data, Features):
        return ExtractedData(data, None, None, 0)
    if not is_source(data):
        raise TypeError(f"{description}: expected an ImageSource or Features, got {type(data).__name__}")
    if backbone is None or not callable(getattr(backbone, "encode_images", None)):
        raise TypeError(f"{description}: images need a backbone with encode_images to extract features")
    features, labels, failed = extract_features(backbone, data, description=description, **options)
    return ExtractedData(features, labels, getattr(data, "class_names", None), failed)


def label_map(labels: np.ndarray | None, names: Sequence[str] | None, classes: Sequence[str]) -> np.ndarray | None:
    """Labels of a source re-indexed to ``classes`` by name (-1 where the class is not one of them)."""
    if labels is None or names is None:
        return None
    lookup = {c: k for k, c in enumerate(classes)}
    remap = np.asarray([lookup.get(n, -1) for n in names] + [-1], dtype=np.int64)
    return remap[np.asarray(labels, dtype=np.int64)]


def check_ood_names(ood_data: Mapping[str, Any]) -> None:
    if not ood_data:
        raise ValueError("at least one OOD set is needed")
    if MEAN_KEY in ood_data:
        raise ValueError(f"{MEAN_KEY!r} is reserved for the average over OOD sets; rename that OOD set")


def is_stateful(detector: Any) -> bool:
    """Test-time adaptive: its scores depend on the stream it has seen (declared by its kind)."""
    return is_adaptive(detector)


def pair_metrics(detector: Any, id_f: Features, ood_f: Features, id_scores: np.ndarray | None,
                  seed: int) -> dict[str, float]:
    """AUROC / FPR@95 of one ID-vs-OOD pair. Test-time adaptive detectors (e.g. AdaNeg) are scored as
    ``oodscope bench`` scores them (:func:`oodscope.evaluation.streams.adaptive_pair_scores`): ``reset()``,
    then one stream of the ID and OOD images in a seeded random order; ``id_scores`` is not used."""
    if is_adaptive(detector):
        s_id, s_ood = adaptive_pair_scores(detector, id_f, ood_f, seed)
    else:
        s_id = detector.score(id_f) if id_scores is None else id_scores
        s_ood = detector.score(ood_f)
    return {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, 0.95)}


def distribution(values: Mapping[str, float]) -> dict[str, Any]:
    keys = list(values)
    arr = np.asarray([values[k] for k in keys], dtype=np.float64)
    best, worst = int(np.argmax(arr)), int(np.argmin(arr))
    return {
        "n": len(arr), "min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max()),
        "mean": float(arr.mean()), "std": float(arr.std()), "spread": float(arr.max() - arr.min()),
        "best": keys[best], "worst": keys[worst],
    }


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, 6)  # the JSON keeps full precision
    return value


def merge_audit_json(directory: Path, kind: str, payload: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / AUDIT_FILE
    document = {"format": AUDIT_FORMAT, "format_version": AUDIT_FORMAT_VERSION, "audits": {}}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            if existing.get("format") == AUDIT_FORMAT and isinstance(existing.get("audits"), dict):
                document["audits"] = existing["audits"]
        except (OSError, ValueError):
            pass  # an unreadable file is replaced
    document["audits"][kind] = payload
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ prompt audit
class AuditRecord:
    """JSON round trip of an audit result dataclass: its fields plus its ``kind``."""

    kind: ClassVar[str] = ""
    n_ood: dict[str, int]  # a field of every audit result

    @property
    def ood_sets(self) -> list[str]:
        return list(self.n_ood)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


# ------------------------------------------------------------------------------------- plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
