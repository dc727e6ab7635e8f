"""ID classification accuracy next to each benchmark row: a detector's own classifier when it is one
over the ID classes, else one shared backbone-level prediction (its logits, or a linear probe)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from oodscope.backbones.base import Features


def labels_are_logit_classes(features: Features, classes: list[str] | None) -> bool:
    names = features.class_names
    width = np.asarray(features.logits).shape[1]
    if classes is None:
        return False
    if names is not None:
        return list(names) == list(classes)
    return width == len(classes)


def own_predictions(run: Any, feats: Features) -> np.ndarray | None:
    """Class predictions of detectors that are classifiers over the ID classes themselves."""
    det = run.detector
    logits = getattr(det, "logits", None)
    with torch.no_grad():
        if callable(logits):
            inputs = det._inputs(feats)
            x = inputs.get("x", inputs.get("embedding"))
            run.accuracy_source = "detector (its own classifier)"
            return logits(x).argmax(dim=1).cpu().numpy()
        if "class_text" in getattr(det, "state_", {}) and feats.embedding is not None:
            x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(feats.embedding), dtype=torch.float32), dim=1)
            text = det.state_["class_text"].to(torch.float32)
            run.accuracy_source = "zero-shot (argmax cosine to class prompts)"
            return (x @ text.T).argmax(dim=1).cpu().numpy()
    return None


def id_predictor(entry, fit, get_fit, classes, cfg, timing):
    """Backbone-level ID classifier shared by detectors without their own.

    ``auto``: the backbone's logits when they are over the ID classes (a classifier trained on the ID
    data); otherwise a linear probe (L2-normalized embedding, logistic regression, C=1) fitted on the
    ID fit set. ``probe``: always the probe. Returns ``None`` (no ID accuracy) without labels.
    """
    from oodscope.detectors._linear_probe import fit_linear_probe, probe_logits

    def from_logits(feats: Features) -> np.ndarray:
        return np.asarray(feats.logits).argmax(axis=1)

    base_names = getattr(entry.network, "class_names", None)
    if cfg.id_accuracy == "auto" and classes is not None and base_names is not None \
            and list(base_names) == list(classes):
        from_logits.source = "classifier logits"  # type: ignore[attr-defined]
        return from_logits
    if fit is None or fit.labels is None or (fit.labels < 0).any():
        return None
    started = time.perf_counter()
    feats = get_fit()
    if cfg.id_accuracy == "auto" and feats.logits is not None and classes is not None \
            and feats.class_names is None and np.asarray(feats.logits).shape[1] == len(classes):
        # A classifier whose head has as many outputs as there are ID classes and no names of its
        # own: taken to be trained on the ID classes, in their order.
        from_logits.source = "classifier logits (unnamed, same number of classes)"  # type: ignore[attr-defined]
        return from_logits
    weight, bias = fit_linear_probe(feats.embedding, fit.labels, C=1.0, normalize=True)
    w, b = torch.from_numpy(weight), torch.from_numpy(bias)
    timing(entry.name, "id_probe", time.perf_counter() - started)

    def probe(batch: Features) -> np.ndarray:
        x = torch.as_tensor(np.asarray(batch.embedding), dtype=torch.float32)
        return probe_logits(x, w, b).argmax(dim=1).numpy()

    probe.source = "linear probe on the ID fit set (embedding, C=1)"  # type: ignore[attr-defined]
    return probe


def accuracy(run, shared, predictor, labels, classes):
    if labels is None or (labels < 0).any():
        return None, ""
    if run.predictions:
        pred = np.concatenate(run.predictions)
        if classes is not None and getattr(run.detector, "classes", None) not in (None, list(classes)):
            return None, "detector classes differ from the ID class names"
        return float(np.mean(pred == labels)), run.accuracy_source
    if shared is not None:
        return float(np.mean(shared == labels)), predictor.source
    return None, ""


