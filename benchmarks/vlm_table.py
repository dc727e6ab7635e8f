"""Zero-shot and few-shot vision-language detectors on Fashion-MNIST-OOD with the packaged ConSE backbone.

Run from the repository root::

    python benchmarks/vlm_table.py            # writes docs/benchmarks_vlm.{md,csv}

Backbone: ``conse:effnet-lite0`` (ConSE over the ImageNet EfficientNet-Lite0 classifier and the
MiniLM sentence encoder). Its image embeddings are derived with ``ConSE.from_classifier_features``
from the cached EfficientNet-Lite0 features of ``benchmarks/common.py`` (no second extraction).
Protocol (``common.py``): ID = {T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag}, near-OOD = the
other four Fashion-MNIST classes (first 500 test images per class: 3,000 ID test and 2,000 near-OOD
images), far-OOD = scikit-learn digits (1,797) and textiles (2,000). Metrics:
AUROC and FPR@95 (ID = positive, ``oodscope.evaluation.metrics``) on ID test vs each OOD set;
"near" = the Fashion-MNIST near-OOD set, "far" = mean over digits and textiles.

**Zero-shot** (class names only). Every detector runs with its own defaults — its recipe, prompts
and corpus (``docs/zero_shot.md``); nothing about prompts is written here:

- MCM, NegLabel, EOE, CSP and NegRefine on every test image. NegLabel, AdaNeg, CSP and NegRefine mine
  their negatives from the packaged WordNet head-word corpus as their official recipes do; every
  text goes through the on-disk text cache (``--text-cache``, default the command line's,
  ``$OODSCOPE_TEXT_CACHE`` else ``~/.cache/oodscope/text``), saved every ``--save-every`` new texts
  so that an interrupted first run resumes.
- CSP and NegRefine: their official prompt ensembles, or with ``--csp-prompts single`` one prompt of
  each ensemble (``SINGLE_PROMPTS``; ~20,000 texts to encode instead of ~420,000), said in the doc.
- "before" rows: NegLabel and AdaNeg with ``recipe="oodscope-v1"`` (oodscope's recipe before issue 15:
  "a photo of a {}." prompts, every WordNet lemma, the 10,000 farthest chosen jointly) and GL-MCM
  with that recipe's prompt "a photo of a {}." (its default is now the official "a photo of a {}").
- EOE's "envisioned" outlier names come from a fixed list written here (``EOE_OUTLIERS``): other
  apparel, accessories and everyday objects, *without* the near-OOD class names or their direct
  synonyms (pullover/sweater, coat/jacket, shirt/blouse, ankle boot/boot) and without names of the
  far-OOD sets (digit, number, fabric, textile): naming the test classes would be cheating.
- AdaNeg follows the official OpenOOD-VLM protocol (``OODEvaluatorClipTTA``): for each OOD set the
  memory is reset and the detector sees one stream made of the ID test set and that OOD set, in a
  fixed seeded shuffle (``--seed``); the ID scores of that stream are used for that set's metrics.
- GL-MCM needs ``Features.patches``, which the cache does not hold: a fixed random subsample of
  ``--patch-per-set`` images of each test set (seeded) is extracted with
  ``create("effnet-lite0", patches=True)`` into the same cache directory, and ConSE patch embeddings
  are derived with a ConSE built with ``patches=True``. MCM is reported on the same subsample.
- CLIPN needs CLIPN's trained "no" text encoder; no offline weights exist, so it is listed as not run.
- Zero-shot ID accuracy: argmax of the cosine to the class prompts (the classifier every zero-shot
  row shares). The 10-class accuracy on ID test + near-OOD images with all ten class names is
  printed too.

**Few-shot** (labelled ID images): ``--shots`` images per class (default 1, 4, 16) drawn without
replacement from ``id_fit`` with ``numpy.random.default_rng([seed, shots])`` for seeds 0, 1, 2
(mean ± sample std over seeds), and "full" = the whole ``id_fit`` (6 x 1,000 images, one run).
Methods on the ConSE embeddings: KNN (k = 1 in the few-shot settings, since the bank has only
6-96 images; the default k = 50 on full), Mahalanobis and relative Mahalanobis (defaults), GDA,
Tip-Adapter, linear probe scored by MSP / Energy / GEN, COOkeD (closed-world member = a probe on the
EfficientNet penultimate features trained on the same shots, zero-shot member, probe on the ConSE
embeddings) and a score ensemble of MCM + KNN (z-scores). The ensemble needs ID images to learn each
member's score scale; scoring the shots themselves is degenerate for KNN (distance 0 to itself), so
in the few-shot settings it is calibrated on 50 *unlabelled* ID images per class drawn from
``id_fit`` outside the shots (extra unlabelled ID data the other methods do not get); on full it is
calibrated on the fit set. ID accuracy is the accuracy of the method's own classifier where it has
one.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import DEFAULT_CACHE, ProtocolFeatures, load_features, sources

from oodscope.backbones import Features
from oodscope.backbones import create as create_backbone
from oodscope.detectors import create
from oodscope.detectors.base import Detector, DetectorError
from oodscope.detectors.fitting import fit_detector
from oodscope.evaluation.metrics import id_accuracy, ood_metrics
from oodscope.features.extract import extract
from oodscope.io import Subset
from oodscope.io.realdata import FASHION_MNIST_CLASSES
from oodscope.text.prompts import TextEmbeddingCache, default_text_cache_dir

BACKBONE = "effnet-lite0"
VLM = "conse:effnet-lite0"
OOD_SETS = ("fashion_near", "digits", "textiles")
NEAR = ("fashion_near",)
FAR = ("digits", "textiles")
TEST_SETS = ("id_test", *OOD_SETS)
METRICS = ("auroc", "fpr95")
SEEDS = (0, 1, 2)
DEFAULT_SHOTS = (1, 4, 16)
FULL = "full"
CALIBRATION_PER_CLASS = 50

DOC = Path("docs/benchmarks_vlm.md")
CSV_PATH = Path("docs/benchmarks_vlm.csv")
DEFAULT_TEXT_CACHE = default_text_cache_dir()

#: EOE's outlier class names (the paper asks an LLM for them; oodscope takes them from the user).
#: Apparel, footwear and accessories that are *not* the near-OOD classes (Pullover, Coat, Shirt,
#: Ankle boot) nor their direct synonyms, plus everyday objects; no names of the far-OOD sets.
EOE_OUTLIERS = [
    "skirt", "shorts", "jeans", "hat", "cap", "scarf", "glove", "sock", "belt", "necktie",
    "swimsuit", "pajamas", "high heel", "slipper", "flip-flop", "backpack", "wallet", "umbrella",
    "wristwatch", "sunglasses", "car", "dog", "cat", "tree", "house", "chair", "cup", "bicycle",
    "flower", "book",
]

#: The recipe of the "before" rows (oodscope's own before issue 15) and its prompt for GL-MCM.
BEFORE = {"recipe": "oodscope-v1"}
BEFORE_GLMCM = {"templates": "a photo of a {}."}
#: ``--csp-prompts single``: one prompt of each of CSP's / NegRefine's official ensembles instead of all
#: of them (the last noun template and the first label template), for a machine on which encoding the
#: ~420,000 ensemble prompts is too slow. The default, ``official``, passes nothing: the detectors' own.
SINGLE_PROMPTS = {"templates": ["the nice {}"], "noun_templates": ["the nice {}"], "adjective_templates": ["{}"]}


# --------------------------------------------------------------------- results
@dataclass
class Result:
    """One table row: metrics per OOD set (lists over seeds) and the ID accuracy (list or empty)."""

    section: str  # "zero-shot", "zero-shot (subsample)", "few-shot"
    method: str
    setting: str  # "0" for zero-shot, "1"/"4"/"16"/"full" for few-shot
    metrics: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # set -> metric -> values
    id_acc: list[float] = field(default_factory=list)
    note: str = ""
    n: dict[str, int] = field(default_factory=dict)  # images per set

    def add(self, scores: dict[str, np.ndarray] | None = None, *, pairs: dict[str, tuple] | None = None) -> None:
        """Add one run: ``scores`` (ID test + OOD sets) or explicit ``pairs`` set -> (id, ood) scores."""
        if pairs is None:
            pairs = {key: (scores["id_test"], scores[key]) for key in OOD_SETS}
        for key, (s_id, s_ood) in pairs.items():
            m = ood_metrics(s_id, s_ood)
            for name in METRICS:
                self.metrics.setdefault(key, {}).setdefault(name, []).append(float(m[name]))
            self.n[key] = int(m["n_ood"])
            self.n["id_test"] = int(m["n_id"])

    def values(self, key: str, metric: str) -> list[float]:
        if key == "near":
            return _mean_over(self, NEAR, metric)
        if key == "far":
            return _mean_over(self, FAR, metric)
        return self.metrics.get(key, {}).get(metric, [])


def _mean_over(result: Result, keys: tuple[str, ...], metric: str) -> list[float]:
    runs = [result.metrics.get(k, {}).get(metric, []) for k in keys]
    if not runs or any(len(r) != len(runs[0]) for r in runs) or not runs[0]:
        return []
    return list(np.mean(np.array(runs), axis=0))


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "—"
    v = np.asarray(values) * scale
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


# --------------------------------------------------------------------- features
def conse_sets(vlm, data: ProtocolFeatures) -> dict[str, Features]:
    """ConSE features of every protocol set, derived from the cached classifier features."""
    out = {"id_fit": vlm.from_classifier_features(data.id_fit), "id_test": vlm.from_classifier_features(data.id_test)}
    for key in OOD_SETS:
        out[key] = vlm.from_classifier_features(data.ood[key])
    return out


def patch_subsample(per_set: int, seed: int, cache: Path, progress: bool) -> tuple[dict[str, Features], Any]:
    """ConSE features with patches for a fixed random subsample of every test set (extracted, cached)."""
    vlm_p = create_backbone(VLM, patches=True)  # sets want_patches on its EfficientNet classifier
    srcs, _ = sources()
    out = {}
    for i, key in enumerate(TEST_SETS):
        src = srcs[key]
        rows = np.sort(np.random.default_rng([seed, i]).choice(len(src), min(per_set, len(src)), replace=False))
        result = extract(vlm_p.classifier, Subset(src, rows), cache_dir=cache, progress=progress,
                         description=f"patches:{key}")
        if result.failures:
            raise RuntimeError(f"{key}: {len(result.failures)} images failed, e.g. {result.failures[0]}")
        out[key] = vlm_p.from_classifier_features(result.features)
        if key == "id_test":
            out["id_test_labels"] = result.labels
    return out, vlm_p


class SavingEncoder:
    """The vision-language backbone, encoding through ``cache`` in chunks of ``chunk`` texts and saving
    the cache after each: a first run that encodes ~400,000 WordNet prompts (CSP's ensembles) can be
    interrupted and resumed. Same ``id`` and weights as the backbone, so the cache keys are its own."""

    def __init__(self, vlm, cache: TextEmbeddingCache, chunk: int, log: Callable[[str], None]) -> None:
        self.vlm, self.cache, self.chunk, self.log = vlm, cache, chunk, log
        self.id = vlm.id
        self.unsaved = 0

    def weights_fingerprint(self) -> str:
        return self.vlm.weights_fingerprint()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        out = []
        for start in range(0, len(texts), self.chunk):
            out.append(self.cache.encode(self.vlm, texts[start : start + self.chunk]))
            self.unsaved += len(out[-1])
            if self.unsaved >= self.chunk:  # a save rewrites the encoder's whole store: not after every call
                self.cache.save()
                self.unsaved = 0
        if len(texts) > self.chunk:
            self.log(f"    encoded {len(texts):,} new texts in {time.perf_counter() - started:.0f} s")
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------- zero-shot
def score_all(det: Detector, sets: dict[str, Features]) -> dict[str, np.ndarray]:
    return {key: det.score(sets[key]) for key in TEST_SETS}


def zero_shot_accuracy(det: Detector, feats: Features, labels: np.ndarray) -> float:
    text = det.state_["class_text"].numpy()
    emb = feats.embedding / np.linalg.norm(feats.embedding, axis=1, keepdims=True)
    return id_accuracy(emb @ text.T, labels)


def adaneg_streams(det, sets: dict[str, Features], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official protocol: per OOD set, reset the memory and stream ID test + that set, shuffled."""
    pairs = {}
    id_feats = sets["id_test"]
    for i, key in enumerate(OOD_SETS):
        n_id, n_ood = len(id_feats), len(sets[key])
        stream = Features.concatenate([id_feats, sets[key]])
        order = np.random.default_rng([seed, 100 + i]).permutation(n_id + n_ood)
        det.reset()
        shuffled = det.score(stream.subset(order))
        scores = np.empty_like(shuffled)
        scores[order] = shuffled
        pairs[key] = (scores[:n_id], scores[n_id:])
    return pairs


def run_zero_shot(vlm, sets, labels, names, text_cache, args, log) -> tuple[list[Result], dict[str, Any]]:
    results: list[Result] = []
    info: dict[str, Any] = {}
    fit = {"text_encoder": SavingEncoder(vlm, text_cache, args.save_every, log), "cache": text_cache}

    def timed(label: str, fn):
        started = time.perf_counter()
        out = fn()
        log(f"  {label}: {time.perf_counter() - started:.1f} s")
        return out

    mcm = timed("mcm fit", lambda: create("mcm", classes=names).fit(**fit))
    acc = zero_shot_accuracy(mcm, sets["id_test"], labels)
    info["zs_acc6"] = acc
    # 10-class zero-shot accuracy over ID test + near-OOD images with all ten names (context for ConSE).
    all_names = list(FASHION_MNIST_CLASSES)
    mcm10 = create("mcm", classes=all_names).fit(**fit)
    srcs, _ = sources()
    near_labels = np.asarray(srcs["fashion_near"].labels)  # original 10-class labels
    id_labels10 = np.array([all_names.index(names[k]) for k in labels])
    both = Features.concatenate([sets["id_test"], sets["fashion_near"]])
    info["zs_acc10"] = zero_shot_accuracy(mcm10, both, np.concatenate([id_labels10, near_labels]))
    log(f"  zero-shot ID accuracy: 6 classes {acc:.4f}; 10 classes (ID test + near-OOD) {info['zs_acc10']:.4f}")

    def add(method: str, scores=None, pairs=None, note: str = "") -> None:
        r = Result("zero-shot", method, "0", note=note)
        r.add(scores, pairs=pairs)
        r.id_acc.append(acc)
        results.append(r)
        log(f"  {method}: near AUROC {fmt(r.values('near', 'auroc'))}, far AUROC {fmt(r.values('far', 'auroc'))}")

    add("MCM", timed("mcm score", lambda: score_all(mcm, sets)))

    def negatives(det) -> str:
        words = det.fit_info_["negative_words"]
        return f"{len(words):,} negatives from {det.fit_info_['num_candidates']:,} candidates"

    neg = timed("neglabel fit (mining)", lambda: create("neglabel", classes=names).fit(**fit))
    info["neglabel"] = {"candidates": neg.fit_info_["num_candidates_by_pos"],
                        "negatives": len(neg.fit_info_["negative_words"]),
                        "examples": neg.fit_info_["negative_words"][:10]}
    add("NegLabel", timed("neglabel score", lambda: score_all(neg, sets)), note=negatives(neg))
    neg0 = timed("neglabel (before) fit", lambda: create("neglabel", classes=names, **BEFORE).fit(**fit))
    info["neglabel_before_candidates"] = neg0.fit_info_["num_candidates"]
    add("NegLabel (before: oodscope-v1)", timed("neglabel (before) score", lambda: score_all(neg0, sets)),
        note=negatives(neg0))

    # Ablation: the official corpus restricted to single alphabetic words of at least 3 letters.
    single = {"single_word": True, "alphabetic": True, "min_length": 3}
    neg1 = timed("neglabel (single words) fit",
                 lambda: create("neglabel", classes=names, corpus_options=single).fit(**fit))
    info["neglabel_single"] = {"candidates": neg1.fit_info_["num_candidates"],
                               "examples": neg1.fit_info_["negative_words"][:10]}
    add("NegLabel (single-word corpus)", timed("neglabel (single words) score", lambda: score_all(neg1, sets)),
        note=negatives(neg1))

    eoe = timed("eoe fit", lambda: create("eoe", classes=names, outlier_classes=EOE_OUTLIERS).fit(**fit))
    add("EOE", timed("eoe score", lambda: score_all(eoe, sets)),
        note=f"{len(eoe.fit_info_['outlier_classes'])} fixed outlier names (see below)")

    stream_note = "per OOD set: memory reset, ID test + OOD set streamed in a seeded shuffle"
    ada = timed("adaneg fit (mining)", lambda: create("adaneg", classes=names).fit(**fit))
    add("AdaNeg", pairs=timed("adaneg streams", lambda: adaneg_streams(ada, sets, args.seed)),
        note=f"{negatives(ada)}; {stream_note}")
    ada0 = timed("adaneg (before) fit", lambda: create("adaneg", classes=names, **BEFORE).fit(**fit))
    add("AdaNeg (before: oodscope-v1)", pairs=timed("adaneg (before) streams",
                                                    lambda: adaneg_streams(ada0, sets, args.seed)),
        note=f"{negatives(ada0)}; {stream_note}")

    prompts = SINGLE_PROMPTS if args.csp_prompts == "single" else {}
    suffix = " (one prompt each)" if prompts else ""
    csp = timed("csp fit (pool, mining)", lambda: create("csp", classes=names, **prompts).fit(**fit))
    info["csp"] = {"candidates": csp.fit_info_["num_candidates_by_pos"],
                   "negatives": len(csp.fit_info_["negative_words"]),
                   "examples": [w for w, p in zip(csp.fit_info_["negative_words"], csp.fit_info_["negative_pos"],
                                                  strict=True) if p == "adj"][:10]}
    add("CSP" + suffix, timed("csp score", lambda: score_all(csp, sets)), note=negatives(csp))

    ref = timed("negrefine fit (pool, mining, filter)",
                lambda: create("negrefine", classes=names, **prompts).fit(**fit))
    removed = {k: len(v) for k, v in ref.fit_info_["removed"].items()}
    info["negrefine"] = {"initial": ref.fit_info_["num_initial_negatives"], "removed": removed,
                         "negatives": len(ref.fit_info_["negative_words"]),
                         "removed_examples": ref.fit_info_["removed"]["subcategory_or_synonym"][:10]
                         + ref.fit_info_["removed"]["proper_noun"][:5]}
    add("NegRefine" + suffix, timed("negrefine score", lambda: score_all(ref, sets)),
        note=f"{len(ref.fit_info_['negative_words']):,} negatives after the WordNet filter "
             f"({ref.fit_info_['num_initial_negatives']:,} mined)")
    info["negrefine"]["pair_texts"] = int(len(ref.state_["pair_ids"]))
    ref_plain = create("negrefine", classes=names, multi_matching_weight=0.0, **prompts).fit(**fit)
    add("NegRefine, filter only (multi-matching weight 0)" + suffix, score_all(ref_plain, sets), note="ablation")

    clipn = Result("zero-shot", "CLIPN", "0", note="not run: needs CLIPN weights (its trained 'no' text encoder)")
    results.append(clipn)

    # GL-MCM (needs patches) and MCM on the same subsample.
    started = time.perf_counter()
    sub, vlm_p = patch_subsample(args.patch_per_set, args.seed, args.cache, not args.quiet)
    log(f"  patch subsample ({args.patch_per_set}/set) features: {time.perf_counter() - started:.1f} s")
    sub_labels = sub.pop("id_test_labels")
    sub_acc = zero_shot_accuracy(mcm, sub["id_test"], sub_labels)
    info["patches_per_image"] = int(sub["id_test"].patches.shape[1])
    glmcm0 = create("glmcm", classes=names, **BEFORE_GLMCM).fit(**fit)
    for method, det in (("MCM", mcm), ("GL-MCM", create("glmcm", classes=names).fit(**fit)),
                        ("GL-MCM (before: 'a photo of a {}.')", glmcm0)):
        r = Result("zero-shot (subsample)", method, "0", note=f"{args.patch_per_set} images per set")
        r.add(score_all(det, sub))
        r.id_acc.append(sub_acc)
        results.append(r)
        log(f"  {method} (subsample): near AUROC {fmt(r.values('near', 'auroc'))}, far {fmt(r.values('far', 'auroc'))}")
    return results, info


# --------------------------------------------------------------------- few-shot
def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows per class, drawn without replacement (sorted)."""
    rng = np.random.default_rng([seed, shots])
    picked = [rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def calibration_rows(labels: np.ndarray, exclude: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 999])
    mask = np.ones(len(labels), bool)
    mask[exclude] = False
    picked = [rng.choice(np.flatnonzero(mask & (labels == c)), CALIBRATION_PER_CLASS, replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def few_shot_methods(names: list[str], few: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, registered name, params) of every few-shot row."""
    knn_k = 1 if few else 50
    return [
        (f"KNN (k={knn_k})", "knn", {"k": knn_k, "feature": "embedding"}),
        ("Mahalanobis", "mahalanobis", {"feature": "embedding"}),
        ("Relative Mahalanobis", "relative_mahalanobis", {"feature": "embedding"}),
        ("GDA", "gda", {"classes": names}),
        ("Tip-Adapter", "tip_adapter", {"classes": names}),
        ("Linear probe + MSP", "linear_probe", {"scoring": "msp"}),
        ("Linear probe + Energy", "linear_probe", {"scoring": "energy"}),
        ("Linear probe + GEN", "linear_probe", {"scoring": "gen"}),
        ("COOkeD", "cooked", {"classes": names}),
        (f"Ensemble MCM + KNN (k={knn_k})", "score_ensemble",
         {"members": [("mcm", {"classes": names}), ("knn", {"k": knn_k, "feature": "embedding"})]}),
    ]


def classifier_accuracy(det: Detector, feats: Features, labels: np.ndarray) -> float | None:
    """Accuracy of the method's own few-shot classifier, when it has one."""
    x = torch.from_numpy(np.asarray(feats.embedding))
    with torch.no_grad():
        if det.name in ("gda", "tip_adapter", "linear_probe"):
            logits = det.logits(x)
        elif det.name == "cooked":
            logits = det.probabilities({"embedding": x, "penultimate": torch.from_numpy(np.asarray(feats.penultimate))})
        else:
            return None
    return id_accuracy(logits.numpy(), labels)


def run_few_shot(vlm, sets, fit_labels, test_labels, names, text_cache, settings, log) -> list[Result]:
    rows: dict[tuple[str, str], Result] = {}
    for setting in settings:
        few = setting != FULL
        for seed in SEEDS if few else (0,):
            idx = sample_shots(fit_labels, int(setting), seed) if few else np.arange(len(fit_labels))
            fit_feats, y = sets["id_fit"].subset(idx), fit_labels[idx]
            calibration = sets["id_fit"].subset(calibration_rows(fit_labels, idx, seed)) if few else None
            started = time.perf_counter()
            for label, name, params in few_shot_methods(names, few):
                det = create(name, **params)
                kwargs: dict[str, Any] = {"text_encoder": vlm, "cache": text_cache}
                if name == "score_ensemble":
                    kwargs["calibration"] = calibration
                row = rows.setdefault((label, setting), Result("few-shot", label, setting))
                try:
                    fit_detector(det, fit_feats, y, **kwargs)
                except DetectorError as err:
                    # Mahalanobis / relative Mahalanobis with one image per class: the within-class
                    # covariance is zero, so the distance is undefined.
                    row.note = ("not defined with 1 image per class (zero within-class covariance)"
                                if few and int(setting) == 1 else f"fit failed: {err}")
                    continue
                row.add(score_all(det, sets))
                acc = classifier_accuracy(det, sets["id_test"], test_labels)
                if acc is not None:
                    row.id_acc.append(acc)
            log(f"  {setting} shots, seed {seed}: {len(idx)} fit images, {time.perf_counter() - started:.1f} s")
    return list(rows.values())


# --------------------------------------------------------------------- output
def table(results: list[Result], with_setting: bool) -> str:
    head = ["Method"] + (["Shots/class"] if with_setting else [])
    head += ["Near AUROC ↑", "Near FPR95 ↓", "Digits AUROC", "Digits FPR95", "Textiles AUROC", "Textiles FPR95",
             "Far AUROC ↑", "Far FPR95 ↓", "ID acc. ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method] + ([r.setting] if with_setting else [])
        if not r.metrics:
            cells += [r.note] + [""] * (len(head) - len(cells) - 1)
        else:
            for key in ("fashion_near", "digits", "textiles", "far"):
                cells += [fmt(r.values(key, "auroc")), fmt(r.values(key, "fpr95"))]
            cells.append(fmt(r.id_acc))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: list[Result], settings: list[str]) -> str:
    methods = list(dict.fromkeys(_base_name(r.method) for r in results))
    head = ["Method"] + [f"{'full' if s == FULL else s + '-shot'}: near / far AUROC" for s in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        for s in settings:
            r = next((x for x in results if _base_name(x.method) == m and x.setting == s), None)
            cells.append("—" if r is None else f"{fmt(r.values('near', 'auroc'))} / {fmt(r.values('far', 'auroc'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _base_name(method: str) -> str:
    return method.replace(" (k=1)", "").replace(" (k=50)", "")


def write_csv(path: Path, results: list[Result]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["section", "method", "shots", "ood_set", "n_runs", "auroc_mean", "auroc_std",
                    "fpr95_mean", "fpr95_std", "id_acc_mean", "id_acc_std", "n_id", "n_ood", "note"])
        for r in results:
            if not r.metrics:
                w.writerow([r.section, r.method, r.setting, "", 0, "", "", "", "", "", "", "", "", r.note])
                continue
            for key in (*OOD_SETS, "near", "far"):
                au, fp = np.asarray(r.values(key, "auroc")), np.asarray(r.values(key, "fpr95"))
                acc = np.asarray(r.id_acc)

                def sd(v: np.ndarray) -> str:
                    return f"{v.std(ddof=1):.4f}" if len(v) > 1 else ""

                w.writerow([
                    r.section, r.method, r.setting, key, len(au), f"{au.mean():.4f}", sd(au), f"{fp.mean():.4f}",
                    sd(fp), f"{acc.mean():.4f}" if len(acc) else "", sd(acc) if len(acc) else "",
                    r.n.get("id_test", ""), r.n.get(key, ""), r.note,
                ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="feature cache (shared with common.py)")
    parser.add_argument("--text-cache", type=Path, default=DEFAULT_TEXT_CACHE, help="on-disk text-embedding cache")
    parser.add_argument("--save-every", type=int, default=10000, help="save the text cache every N new texts")
    parser.add_argument("--csp-prompts", choices=("official", "single"), default="official",
                        help="CSP / NegRefine prompts: their official ensembles, or one prompt of each (faster)")
    parser.add_argument("--shots", type=int, nargs="*", default=list(DEFAULT_SHOTS))
    parser.add_argument("--no-full", action="store_true", help="skip the few-shot 'full' setting")
    parser.add_argument("--patch-per-set", type=int, default=300, help="GL-MCM subsample size per test set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the AdaNeg stream order and the subsample")
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--skip-few-shot", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks_vlm.*")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    data = load_features(BACKBONE, cache=args.cache, progress=not args.quiet)
    vlm = create_backbone(VLM)
    sets = conse_sets(vlm, data)
    names = data.id_class_names
    text_cache = TextEmbeddingCache(args.text_cache, autosave=False)  # saved by SavingEncoder and at the end
    sizes = ", ".join(f"{k} {len(sets[k])}" for k in ("id_fit", *TEST_SETS))
    log(f"ConSE features: {sizes}; embedding dim {sets['id_test'].embedding.shape[1]}")

    zs_results: list[Result] = []
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if not args.skip_zero_shot:
        t0 = time.perf_counter()
        log("zero-shot")
        zs_results, info = run_zero_shot(vlm, sets, data.id_test_labels, names, text_cache, args, log)
        timings["zero-shot"] = time.perf_counter() - t0
    settings = [str(s) for s in args.shots] + ([] if args.no_full else [FULL])
    fs_results: list[Result] = []
    if not args.skip_few_shot:
        t0 = time.perf_counter()
        log("few-shot")
        fs_results = run_few_shot(vlm, sets, data.id_fit_labels, data.id_test_labels, names, text_cache, settings, log)
        timings["few-shot"] = time.perf_counter() - t0
    text_cache.save()
    total = time.perf_counter() - started

    main_zs = [r for r in zs_results if r.section == "zero-shot"]
    sub_zs = [r for r in zs_results if r.section != "zero-shot"]
    blocks = []
    if zs_results:
        blocks.append(("Zero-shot (all test images)", table(main_zs, False)))
        blocks.append((f"Zero-shot on the patch subsample ({args.patch_per_set} images per test set)",
                       table(sub_zs, False)))
    if fs_results:
        for s in settings:
            title = "Few-shot, full id_fit (6 x 1,000 images, one run)" if s == FULL else (
                f"Few-shot, {s} shot{'s' if s != '1' else ''} per class (mean ± std over seeds 0, 1, 2)")
            blocks.append((title, table([r for r in fs_results if r.setting == s], False)))
        blocks.append(("Few-shot summary: near / far AUROC", summary_table(fs_results, settings)))
    for title, text in blocks:
        print(f"\n### {title}\n\n{text}")
    print(f"\nruntime {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    if info:
        print(f"zero-shot info: {info}")

    if not args.no_doc:
        write_csv(CSV_PATH, zs_results + fs_results)
        DOC.write_text(render_doc(blocks, info, total, timings, args), encoding="utf-8")
        log(f"wrote {DOC} and {CSV_PATH}")
    return 0


DISCUSSION_START = "<!-- discussion: hand-written, kept when the script rewrites this file -->"
DISCUSSION_END = "<!-- /discussion -->"


def render_doc(blocks, info, total, timings, args) -> str:
    """Run facts and tables; the hand-written discussion between the markers of the existing file is kept."""
    cmd = "python benchmarks/vlm_table.py" + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    discussion = f"{DISCUSSION_START}\n(discussion to be written)\n{DISCUSSION_END}"
    if DOC.is_file():
        old = DOC.read_text(encoding="utf-8")
        if DISCUSSION_START in old and DISCUSSION_END in old:
            discussion = old[old.index(DISCUSSION_START) : old.index(DISCUSSION_END) + len(DISCUSSION_END)]
    facts = [
        "# Benchmarks: zero-shot and few-shot vision-language detectors (ConSE on Fashion-MNIST-OOD)",
        "",
        f"- Command: `{cmd}` (from the repository root, after `python benchmarks/common.py` has cached the "
        "EfficientNet-Lite0 features).",
        f"- Machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU; torch {torch.__version__}, "
        f"Python {platform.python_version()}. Date: {dt.date.today().isoformat()}.",
        f"- Runtime: {total:.0f} s with the features and the text embeddings already cached "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
        f"- Backbone: `{VLM}`; its embeddings are derived from the cached `{BACKBONE}` features "
        "(`ConSE.from_classifier_features`). Protocol, seeds and per-method settings: the docstring of "
        "`benchmarks/vlm_table.py`; all numbers are in `docs/benchmarks_vlm.csv`.",
        f"- EOE outlier names ({len(EOE_OUTLIERS)}): {', '.join(EOE_OUTLIERS)}.",
    ]
    if info:
        facts.append(
            f"- Zero-shot ID accuracy (argmax cosine to the class prompts): {100 * info['zs_acc6']:.1f} % on the "
            f"6 ID classes; {100 * info['zs_acc10']:.1f} % on all 10 Fashion-MNIST classes (ID test + near-OOD "
            "images, ten class names)."
        )
        nl, c, r = info["neglabel"], info["csp"], info["negrefine"]
        facts.append(
            f"- NegLabel (official recipe): {nl['negatives']:,} negatives, 15 % of each part of speech of "
            f"{nl['candidates']['noun']:,} nouns and {nl['candidates']['adj']:,} adjectives (WordNet head words); "
            f"the farthest: {', '.join(nl['examples'])}. Before (oodscope-v1): 10,000 of "
            f"{info['neglabel_before_candidates']:,} lemmas."
        )
        facts.append(
            f"- NegLabel (single-word corpus): `corpus_options={{'single_word': True, 'alphabetic': True, "
            f"'min_length': 3}}`, {info['neglabel_single']['candidates']:,} candidates; the farthest: "
            f"{', '.join(info['neglabel_single']['examples'])}."
        )
        facts.append(
            f"- CSP: {c['negatives']:,} negatives from {c['candidates']['noun']:,} nouns and "
            f"{c['candidates']['adj']:,} conjugated adjectives; the farthest conjugated ones: "
            f"{', '.join(c['examples'])}."
        )
        facts.append(
            f"- NegRefine: {r['initial']:,} mined (CSP pool, eta = 0), removed by the WordNet filter: "
            f"{r['removed']['unclean']} unclean, {r['removed']['proper_noun']} proper nouns, "
            f"{r['removed']['subcategory_or_synonym']} synonyms / sub-categories of an ID class "
            f"(e.g. {', '.join(r['removed_examples']) or 'none'}); {r['negatives']:,} kept; "
            f"{r['pair_texts']:,} 'class and negative' texts encoded for the multi-matching score."
        )
        if args.csp_prompts == "single":
            facts.append(
                "- CSP / NegRefine rows marked \"one prompt each\" (`--csp-prompts single`): ID classes, nouns and "
                "NegRefine's 'class and negative' texts prompted \"the nice {}\" only, conjugated labels \"{}\" only "
                "(one template of each official ensemble: 8 noun and 4 label templates), because encoding the "
                "ensembles' ~420,000 prompts did not fit the shared 2-core machine's time; every other setting "
                "is the detectors' default. Without the flag the script runs their full ensembles."
            )
        facts.append(f"- GL-MCM: {info['patches_per_image']} ConSE patch embeddings per image (7 x 7 cells).")
    body = [f"## {title}\n\n{text}\n" for title, text in blocks]
    return "\n".join(facts) + "\n\n" + discussion + "\n\n" + "\n".join(body)


if __name__ == "__main__":
    raise SystemExit(main())
