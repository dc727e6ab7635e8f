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

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from oodscope.backbones.base import Features
from oodscope.evaluation.corruptions import CORRUPTION_NAMES, REFERENCE_SIZE, CorruptedSource
from oodscope.evaluation.metrics import auroc, fpr_at_tpr

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "oodscope-audit"
AUDIT_FORMAT_VERSION = 1
MEAN_KEY = "mean"  # summary entry averaged over OOD sets / corruptions

# --------------------------------------------------------------------------------- prompt variants
BASELINE_TEMPLATE = "a photo of a {}."  # MCM's single prompt (the detectors' "simple" templates)

#: Paraphrases of the baseline with the same information (written for this audit).
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "a picture of a {}.",
    "an image of a {}.",
    "a photograph of a {}.",
    "a snapshot of a {}.",
    "this is a {}.",
    "this is a photo of a {}.",
    "there is a {} in the picture.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a {} in a photo.",
)

#: Context words removed from or added to the baseline.
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a blurry photo of a {}.",
    "a low-resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a bright, high-quality photo of a {}.",
    "a drawing of a {}.",
)

#: Context templates that name the domain (used when ``domain`` is given; ``{domain}`` is replaced).
DOMAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of {domain}.",
    "a product photo of a {}, a type of {domain}.",
    "a {} ({domain}).",
    "a photo of a {domain} item: a {}.",
)

# WordNet lexicographer categories of photographable things; the most frequent sense of a class name in
# one of them gives its synonyms (so "sneaker" means the shoe, not someone who sneaks). People are left
# out because many object names also have a person sense; a name with only person senses falls back to
# its most frequent sense.
CONCRETE_CATEGORIES: tuple[str, ...] = (
    "noun.artifact", "noun.animal", "noun.plant", "noun.food", "noun.object", "noun.body",
    "noun.substance", "noun.location", "noun.phenomenon",
)


@dataclass(frozen=True)
class PromptVariant:
    """One way of phrasing the ID prompts.

    ``templates``: the templates applied to each class name (several = a prompt ensemble);
    ``names``: class -> the name(s) used in place of the class name (absent = the class name itself;
    several names = an ensemble over them).
    """

    id: str
    kind: str  # "baseline" | "template" | "context" | "class_name" | "ensemble" | "custom"
    label: str
    templates: tuple[str, ...]
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def prompts(self, classes: Sequence[str]) -> dict[str, list[str]]:
        """Class -> prompt texts (passed to a zero-shot detector as ``custom_prompts``)."""
        out = {}
        for c in classes:
            out[c] = [t.format(n) for n in self.names.get(c, (c,)) for t in self.templates]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "label": self.label, "templates": list(self.templates),
                "names": {k: list(v) for k, v in self.names.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptVariant:
        return cls(d["id"], d["kind"], d["label"], tuple(d["templates"]),
                   {k: tuple(v) for k, v in d.get("names", {}).items()})


def _wordnet_index(directory: Path) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    with open(directory / "index.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            fields = line.split()
            # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt synset_offset*synset_cnt
            count = int(fields[2])
            index[fields[0]] = [int(x) for x in fields[-count:]]
    return index


_WORDNET_CACHE: dict[str, dict[str, list[int]]] = {}


def wordnet_synonyms(
    name: str,
    *,
    directory: str | os.PathLike | None = None,
    categories: Sequence[str] = CONCRETE_CATEGORIES,
) -> list[str]:
    """Other names of ``name``: the lemmas of its most frequent WordNet noun sense in ``categories``.

    A name with ``/`` ("T-shirt/top") is split and each part is an alternative too. WordNet is read
    from ``directory`` (default ``/usr/share/wordnet``, the Debian ``wordnet-base`` package); without
    it, the lemmas of the ImageNet-1k synset that contains the name (shipped with oodscope) are used.
    """
    from oodscope.text.lexicon import LEXNAMES, SYSTEM_WORDNET

    parts = [p.strip() for p in name.split("/") if p.strip()]
    out: list[str] = [p for p in parts if p != name] if len(parts) > 1 else []
    folder = Path(directory) if directory is not None else SYSTEM_WORDNET
    have_wordnet = (folder / "index.noun").is_file() and (folder / "data.noun").is_file()
    for part in parts:
        lemmas: list[str] = []
        if have_wordnet:
            key = str(folder)
            if key not in _WORDNET_CACHE:
                _WORDNET_CACHE[key] = _wordnet_index(folder)
            offsets = _WORDNET_CACHE[key].get(part.lower().replace(" ", "_"), [])
            senses = []
            with open(folder / "data.noun", "rb") as fh:
                for offset in offsets:
                    fh.seek(offset)
                    fields = fh.readline().decode("utf-8", errors="replace").split()
                    count = int(fields[3], 16)
                    senses.append((LEXNAMES.get(int(fields[1]), ""),
                                   [fields[4 + 2 * i].replace("_", " ") for i in range(count)]))
            chosen = next((s for s in senses if s[0] in categories), senses[0] if senses else None)
            lemmas = chosen[1] if chosen else []
        else:
            from oodscope.backbones.imagenet import imagenet_lemmas

            lemmas = next((g for g in imagenet_lemmas() if part.lower() in (x.lower() for x in g)), [])
        for lemma in lemmas:
            if lemma.lower() != part.lower() and lemma.lower() != name.lower():
                out.append(lemma)
    seen: set[str] = set()
    return [x for x in out if not (x.lower() in seen or seen.add(x.lower()))]


def prompt_variants(
    classes: Sequence[str],
    *,
    domain: str | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    wordnet: bool = True,
    max_name_variants: int = 3,
    paraphrases: Sequence[str] = PARAPHRASE_TEMPLATES,
    contexts: Sequence[str] = CONTEXT_TEMPLATES,
    ensemble: bool = True,
) -> list[PromptVariant]:
    """The default set of phrasings of the ID prompts, baseline first.

    - ``baseline``: "a photo of a {}." with the class names as given;
    - ``template``: paraphrases with the same content (``paraphrases``);
    - ``context``: context words removed ("{}") or added ("a blurry photo of a {}.") (``contexts``),
      plus domain phrases ("a product photo of a {}, a type of clothing.") when ``domain`` is given;
    - ``class_name``: the baseline template with synonyms of the class names — variant ``k`` uses
      the ``k``-th alternative of every class that has one (``synonyms`` from the user first, then
      :func:`wordnet_synonyms`), and one variant ensembles the prompts of all names of each class;
    - ``ensemble``: the 16 templates of :data:`oodscope.text.prompts.DEFAULT_TEMPLATES` ensembled.

    Variants whose prompts are identical to an earlier one are dropped.
    """
    from oodscope.text.prompts import DEFAULT_TEMPLATES, resolve_templates

    classes = list(classes)
    unknown = sorted(set(synonyms or {}) - set(classes))
    if unknown:
        raise ValueError(f"synonyms given for unknown classes: {unknown}")
    variants = [PromptVariant("baseline", "baseline", BASELINE_TEMPLATE, (BASELINE_TEMPLATE,))]
    for k, t in enumerate(resolve_templates(list(paraphrases)) if paraphrases else (), 1):
        variants.append(PromptVariant(f"template-{k:02d}", "template", t, (t,)))
    context = list(contexts) + [t.replace("{domain}", domain) for t in DOMAIN_TEMPLATES] if domain else list(contexts)
    for k, t in enumerate(resolve_templates(context) if context else (), 1):
        variants.append(PromptVariant(f"context-{k:02d}", "context", t, (t,)))
    alternatives: dict[str, list[str]] = {}
    for c in classes:
        alts = [s for s in (synonyms or {}).get(c, []) if s.strip() and s != c]
        if wordnet:
            alts += wordnet_synonyms(c)
        seen = {c.lower()}
        alternatives[c] = [a for a in alts if not (a.lower() in seen or seen.add(a.lower()))]
    deepest = max((len(a) for a in alternatives.values()), default=0)
    for k in range(1, min(max_name_variants, deepest) + 1):
        names = {c: (a[k - 1],) for c, a in alternatives.items() if len(a) >= k}
        shown = ", ".join(f"{c}->{n[0]}" for c, n in names.items())
        variants.append(PromptVariant(f"name-{k}", "class_name", f"synonym {k}: {shown}", (BASELINE_TEMPLATE,), names))
    if deepest:
        names = {c: (c, *a) for c, a in alternatives.items() if a}
        variants.append(PromptVariant("name-all", "class_name", "all names of each class, ensembled",
                                      (BASELINE_TEMPLATE,), names))
    if ensemble:
        variants.append(PromptVariant("ensemble", "ensemble", f"{len(DEFAULT_TEMPLATES)}-template ensemble",
                                      tuple(DEFAULT_TEMPLATES)))
    unique, seen_prompts = [], set()
    for v in variants:
        key = json.dumps(v.prompts(classes), sort_keys=True)
        if key not in seen_prompts:
            seen_prompts.add(key)
            unique.append(v)
    return unique


# ------------------------------------------------------------------------------------ helpers
@dataclass
class _Data:
    features: Features
    labels: np.ndarray | None
    class_names: list[str] | None
    n_failed: int


def _is_source(data: Any) -> bool:
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

    A ConSE backbone is run as its classifier and converted with ``from_classifier_features``, so
    the classifier's feature cache (e.g. the benchmarks' EfficientNet-Lite features) is reused.
    """
    from oodscope.features.extract import extract

    derived = callable(getattr(backbone, "from_classifier_features", None)) and hasattr(backbone, "classifier")
    runner = backbone.classifier if derived else backbone
    result = extract(runner, source, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                     progress=progress, description=description)
    if not len(result.indices):
        raise ValueError(f"{description}: no image could be read ({len(result.failures)} failures)")
    features = result.features
    if derived:
        features = backbone.from_classifier_features(features)
    return features, result.labels, len(result.failures)


def _as_data(backbone: Any, data: Any, description: str, options: dict[str, Any]) -> _Data:
    if isinstance(data, Features):
        return _Data(data, None, None, 0)
    if not _is_source(data):
        raise TypeError(f"{description}: expected an ImageSource or Features, got {type(data).__name__}")
    if backbone is None or not callable(getattr(backbone, "encode_images", None)):
        raise TypeError(f"{description}: images need a backbone with encode_images to extract features")
    features, labels, failed = extract_features(backbone, data, description=description, **options)
    return _Data(features, labels, getattr(data, "class_names", None), failed)


def _label_map(labels: np.ndarray | None, names: Sequence[str] | None, classes: Sequence[str]) -> np.ndarray | None:
    """Labels of a source re-indexed to ``classes`` by name (-1 where the class is not one of them)."""
    if labels is None or names is None:
        return None
    lookup = {c: k for k, c in enumerate(classes)}
    remap = np.asarray([lookup.get(n, -1) for n in names] + [-1], dtype=np.int64)
    return remap[np.asarray(labels, dtype=np.int64)]


def _check_ood_names(ood_data: Mapping[str, Any]) -> None:
    if not ood_data:
        raise ValueError("at least one OOD set is needed")
    if MEAN_KEY in ood_data:
        raise ValueError(f"{MEAN_KEY!r} is reserved for the average over OOD sets; rename that OOD set")


def _is_stateful(detector: Any) -> bool:
    return callable(getattr(detector, "reset", None))


def _pair_metrics(detector: Any, id_f: Features, ood_f: Features, id_scores: np.ndarray | None,
                  seed: int) -> dict[str, float]:
    """AUROC / FPR@95 of one ID-vs-OOD pair. Test-time adaptive detectors (with ``reset()``, e.g.
    AdaNeg) see a fresh stream of the ID and OOD images in a seeded random interleaving."""
    if _is_stateful(detector):
        both = Features.concatenate([id_f, ood_f])
        order = np.random.default_rng(seed).permutation(len(both))
        detector.reset()
        shuffled = detector.score(both.subset(order))
        scores = np.empty_like(shuffled)
        scores[order] = shuffled
        s_id, s_ood = scores[: len(id_f)], scores[len(id_f):]
    else:
        s_id = detector.score(id_f) if id_scores is None else id_scores
        s_ood = detector.score(ood_f)
    return {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, 0.95)}


def _distribution(values: Mapping[str, float]) -> dict[str, Any]:
    keys = list(values)
    arr = np.asarray([values[k] for k in keys], dtype=np.float64)
    best, worst = int(np.argmax(arr)), int(np.argmin(arr))
    return {
        "n": len(arr), "min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max()),
        "mean": float(arr.mean()), "std": float(arr.std()), "spread": float(arr.max() - arr.min()),
        "best": keys[best], "worst": keys[worst],
    }


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
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


def _merge_audit_json(directory: Path, kind: str, payload: dict[str, Any]) -> Path:
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
class _AuditRecord:
    """JSON round trip of an audit result dataclass: its fields plus its ``kind``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class PromptAuditResult(_AuditRecord):
    """Per phrasing and OOD set: AUROC / FPR@95; per OOD set (and ``"mean"`` over sets): the
    distribution over phrasings (min, median, max, mean, std, spread = max - min, best, worst).

    ``rows``: one dict per (variant, OOD set): ``variant, kind, label, ood_set, auroc, fpr95``.
    ``variants``: each variant's ``to_dict()`` plus ``id_accuracy`` (zero-shot top-1 on labelled ID
    images, ``None`` without labels), ``mean_auroc`` and ``mean_fpr95`` over the OOD sets.
    ``summary``: OOD set -> {"auroc": distribution, "fpr95": distribution, "baseline_auroc",
    "baseline_fpr95"}; for FPR@95 "best" is the lowest.
    """

    kind = "prompt_sensitivity"

    method: str
    method_params: dict[str, Any]
    backbone_id: str | None
    classes: list[str]
    n_id: int
    n_ood: dict[str, int]
    variants: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    seconds: float = 0.0
    n_failed: int = 0

    @property
    def ood_sets(self) -> list[str]:
        return list(self.n_ood)

    def variant(self, variant_id: str) -> dict[str, Any]:
        return next(v for v in self.variants if v["id"] == variant_id)

    def aurocs(self, ood_set: str) -> dict[str, float]:
        """Variant id -> AUROC on ``ood_set`` (``"mean"``: averaged over the OOD sets)."""
        if ood_set == MEAN_KEY:
            return {v["id"]: v["mean_auroc"] for v in self.variants}
        return {r["variant"]: r["auroc"] for r in self.rows if r["ood_set"] == ood_set}

    def save(self, directory: str | os.PathLike) -> Path:
        """``audit.json`` (entry ``prompt_sensitivity``), ``prompt_audit.csv`` (per variant and OOD
        set), ``prompt_variants.csv`` (per variant) and ``prompt_summary.csv`` (per OOD set)."""
        directory = Path(directory)
        path = _merge_audit_json(directory, self.kind, self.to_dict())
        _write_csv(directory / "prompt_audit.csv", self.rows, ("variant", "kind", "label", "ood_set", "auroc", "fpr95"))
        first = self.classes[0]
        variant_rows = [{**v, "example": PromptVariant.from_dict(v).prompts([first])[first][0]} for v in self.variants]
        _write_csv(directory / "prompt_variants.csv", variant_rows,
                   ("id", "kind", "label", "example", "id_accuracy", "mean_auroc", "mean_fpr95"))
        summary_rows = []
        for name, s in self.summary.items():
            a, f = s["auroc"], s["fpr95"]
            summary_rows.append({
                "ood_set": name, "variants": a["n"], "baseline_auroc": s["baseline_auroc"],
                "auroc_min": a["min"], "auroc_median": a["median"], "auroc_max": a["max"], "auroc_mean": a["mean"],
                "auroc_std": a["std"], "auroc_spread": a["spread"], "best": a["best"],
                "best_label": self.variant(a["best"])["label"], "worst": a["worst"],
                "worst_label": self.variant(a["worst"])["label"], "baseline_fpr95": s["baseline_fpr95"],
                "fpr95_min": f["min"], "fpr95_max": f["max"], "fpr95_spread": f["spread"],
            })
        _write_csv(directory / "prompt_summary.csv", summary_rows, list(summary_rows[0]) if summary_rows else [])
        return path

    def table(self) -> str:
        """A plain-text summary table (one line per OOD set)."""
        head = f"{'OOD set':<16} {'base':>6} {'min':>6} {'median':>6} {'max':>6} {'spread':>6} {'std':>6}  best / worst"
        lines = [head, "-" * len(head)]
        for name, s in self.summary.items():
            a = s["auroc"]
            lines.append(
                f"{name:<16} {s['baseline_auroc']:6.3f} {a['min']:6.3f} {a['median']:6.3f} {a['max']:6.3f} "
                f"{a['spread']:6.3f} {a['std']:6.3f}  {_short(self.variant(a['best'])['label'])} / "
                f"{_short(self.variant(a['worst'])['label'])}"
            )
        return "\n".join(lines)


def _short(text: str, width: int = 38) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def prompt_sensitivity(
    backbone: Any,
    id_data: Any,
    ood_data: Mapping[str, Any],
    classes: Sequence[str] | None = None,
    method: str = "mcm",
    variants: Sequence[PromptVariant | str] | None = None,
    *,
    method_params: Mapping[str, Any] | None = None,
    id_labels: np.ndarray | Sequence[int] | None = None,
    text_encoder: Any = None,
    text_cache: Any = None,
    domain: str | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    wordnet: bool = True,
    max_name_variants: int = 3,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> PromptAuditResult:
    """Score ID vs each OOD set with a zero-shot detector under many prompt phrasings.

    ``id_data`` / ``ood_data`` values: an :class:`~oodscope.io.ImageSource` (features are extracted
    once with ``backbone``, cached in ``cache_dir``) or ready :class:`Features`. ``classes``: the ID
    class names (default: the ID source's ``class_names``). ``method``: a registered zero-shot
    detector; ``method_params`` go to it (except ``templates``/``custom_prompts``, set per variant).
    ``variants``: :class:`PromptVariant` objects or template strings; default
    :func:`prompt_variants` (with ``domain``, ``synonyms``, ``wordnet``, ``max_name_variants``).
    ``text_encoder``: what encodes prompts (default: the backbone). ``id_labels``: ID class indices
    into ``classes`` for the zero-shot accuracy (default: the ID source's labels, matched by name).
    """
    from tqdm.auto import tqdm

    from oodscope.detectors import create, registered

    started = time.perf_counter()
    registry = registered()
    if method not in registry:
        raise ValueError(f"unknown detector {method!r}")
    if not getattr(registry[method], "needs_text_encoder", False):
        raise ValueError(f"{method!r} is not a zero-shot detector: the prompt audit needs one (e.g. mcm)")
    encoder = text_encoder if text_encoder is not None else backbone
    if not callable(getattr(encoder, "encode_texts", None)):
        raise TypeError("the prompt audit needs a vision-language backbone or a text_encoder with encode_texts")
    _check_ood_names(ood_data)
    params = dict(method_params or {})
    for key in ("classes", "templates", "custom_prompts"):
        if key in params:
            raise ValueError(f"method_params must not set {key!r}: the audit sets it per variant")

    options = {"cache_dir": cache_dir, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    id_d = _as_data(backbone, id_data, "ID", options)
    if classes is None:
        if not id_d.class_names:
            raise ValueError("classes are needed (the ID data has no class names)")
        classes = list(id_d.class_names)
    classes = list(classes)
    ood = {name: _as_data(backbone, data, name, options) for name, data in ood_data.items()}
    labels = np.asarray(id_labels, dtype=np.int64) if id_labels is not None else _label_map(
        id_d.labels, id_d.class_names, classes)
    if labels is not None and len(labels) != len(id_d.features):
        raise ValueError(f"id_labels has {len(labels)} entries for {len(id_d.features)} ID images")

    if variants is None:
        variants = prompt_variants(classes, domain=domain, synonyms=synonyms, wordnet=wordnet,
                                   max_name_variants=max_name_variants)
    resolved: list[PromptVariant] = []
    for k, v in enumerate(variants):
        if isinstance(v, str):
            v = PromptVariant(f"custom-{k:02d}", "custom", v, (v,))
        resolved.append(v)
    ids = [v.id for v in resolved]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt variant ids must be unique")

    # Encode every prompt text of every variant in one call (each detector's fit then hits the cache).
    from oodscope.text.prompts import default_cache

    text_cache = text_cache if text_cache is not None else default_cache()
    all_texts = list(dict.fromkeys(t for v in resolved for texts in v.prompts(classes).values() for t in texts))
    text_cache.encode(encoder, all_texts)

    rows: list[dict[str, Any]] = []
    variant_dicts: list[dict[str, Any]] = []
    for v in tqdm(resolved, desc="prompt variants", disable=not progress, dynamic_ncols=True):
        detector = create(method, classes=classes, templates="simple", custom_prompts=v.prompts(classes), **params)
        detector.fit(text_encoder=encoder, cache=text_cache)
        id_scores = None if _is_stateful(detector) else detector.score(id_d.features)
        per_set = {}
        for name, d in ood.items():
            per_set[name] = _pair_metrics(detector, id_d.features, d.features, id_scores, seed)
            rows.append({"variant": v.id, "kind": v.kind, "label": v.label, "ood_set": name, **per_set[name]})
        accuracy = None
        if labels is not None and "class_text" in detector.state_ and (labels >= 0).any():
            emb = id_d.features.embedding[labels >= 0]
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            pred = (emb @ detector.state_["class_text"].numpy().T).argmax(axis=1)
            accuracy = float(np.mean(pred == labels[labels >= 0]))
        variant_dicts.append({
            **v.to_dict(), "id_accuracy": accuracy,
            "mean_auroc": float(np.mean([m["auroc"] for m in per_set.values()])),
            "mean_fpr95": float(np.mean([m["fpr95"] for m in per_set.values()])),
        })

    summary: dict[str, dict[str, Any]] = {}
    for name in [*ood, MEAN_KEY] if len(ood) > 1 else list(ood):
        if name == MEAN_KEY:
            a = {v["id"]: v["mean_auroc"] for v in variant_dicts}
            f = {v["id"]: v["mean_fpr95"] for v in variant_dicts}
        else:
            a = {r["variant"]: r["auroc"] for r in rows if r["ood_set"] == name}
            f = {r["variant"]: r["fpr95"] for r in rows if r["ood_set"] == name}
        fpr = _distribution({k: -x for k, x in f.items()})  # best = lowest FPR
        fpr.update(min=-fpr["max"], max=-fpr["min"], median=-fpr["median"], mean=-fpr["mean"])
        summary[name] = {"auroc": _distribution(a), "fpr95": fpr,
                         "baseline_auroc": a[resolved[0].id], "baseline_fpr95": f[resolved[0].id],
                         "baseline": resolved[0].id}
    return PromptAuditResult(
        method=method, method_params=params, backbone_id=getattr(id_d.features, "backbone_id", None),
        classes=classes, n_id=len(id_d.features), n_ood={k: len(d.features) for k, d in ood.items()},
        variants=variant_dicts, rows=rows, summary=summary, seconds=time.perf_counter() - started,
        n_failed=id_d.n_failed + sum(d.n_failed for d in ood.values()),
    )


# -------------------------------------------------------------------------- corruption audit
DetectorSpec = Any  # "name" | ("name", {params}) | {"name": ..., **params} | an unfitted Detector


def _make_detector(spec: DetectorSpec, classes: Sequence[str] | None):
    from oodscope.detectors import Detector, create, registered

    if isinstance(spec, Detector):
        detector = spec
    else:
        if isinstance(spec, str):
            name, params = spec, {}
        elif isinstance(spec, tuple) and len(spec) == 2:
            name, params = spec[0], dict(spec[1])
        elif isinstance(spec, Mapping):
            params = dict(spec)
            name = params.pop("name")
        else:
            raise TypeError(f"a detector spec is a name, (name, params), a dict or a Detector; got {spec!r}")
        cls = registered().get(name)
        if cls is None:
            create(name)  # raises with the list of names
        if getattr(cls, "needs_text_encoder", False) and "classes" not in params:
            if classes is None:
                raise ValueError(f"{name}: zero-shot detectors need the ID class names (classes=...)")
            params["classes"] = list(classes)
        detector = create(name, **params)
    if "model" in type(detector).requires:
        raise ValueError(f"{detector.name} needs the model in the loop; the corruption audit scores cached features")
    return detector


@dataclass
class CorruptionAuditResult(_AuditRecord):
    """AUROC / FPR@95 per detector, corruption, severity and OOD set, and a degradation summary.

    ``rows``: one dict per (detector, corruption, severity, OOD set). Severity 0 is the clean
    measurement, computed once and repeated under every corruption so that each curve starts there.
    ``summary``: detector -> corruption (and ``"mean"`` over corruptions) -> {"auroc": {severity:
    mean over OOD sets}, "fpr95": {...}, "drop_at_3", "drop_at_5"} where ``drop_at_s`` = AUROC at
    severity 0 minus AUROC at ``s`` (``None`` when either severity was not run).
    Severities are strings in the JSON (``"0"``, ``"3"``); :meth:`curve` returns them as ints.
    """

    kind = "corruption_robustness"

    backbone_id: str | None
    detectors: dict[str, Any]
    corruptions: list[str]
    severities: list[int]
    apply_to: str
    seed: int
    work_size: int | None
    n_id: int
    n_ood: dict[str, int]
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    seconds: float = 0.0
    n_failed: int = 0

    @property
    def ood_sets(self) -> list[str]:
        return list(self.n_ood)

    def curve(self, detector: str, corruption: str = MEAN_KEY, metric: str = "auroc",
              ood_set: str | None = None) -> tuple[list[int], list[float]]:
        """(severities, metric) for one detector; averaged over OOD sets unless ``ood_set`` is given."""
        if ood_set is None:
            values = self.summary[detector][corruption][metric]
            return [int(s) for s in values], [float(x) for x in values.values()]
        sev = []
        out = []
        names = self.corruptions if corruption == MEAN_KEY else [corruption]
        for s in self.severities:
            picked = [r[metric] for r in self.rows if r["detector"] == detector and r["severity"] == s
                      and r["ood_set"] == ood_set and r["corruption"] in names]
            sev.append(s)
            out.append(float(np.mean(picked)))
        return sev, out

    def save(self, directory: str | os.PathLike) -> Path:
        """``audit.json`` (entry ``corruption_robustness``), ``corruption_audit.csv`` (every
        measurement) and ``corruption_summary.csv`` (per detector and corruption: AUROC by severity,
        averaged over OOD sets, and the drops)."""
        directory = Path(directory)
        path = _merge_audit_json(directory, self.kind, self.to_dict())
        _write_csv(directory / "corruption_audit.csv", self.rows,
                   ("detector", "corruption", "severity", "ood_set", "auroc", "fpr95"))
        rows = []
        for det, per in self.summary.items():
            for corruption, s in per.items():
                row = {"detector": det, "corruption": corruption, "drop_at_3": s["drop_at_3"],
                       "drop_at_5": s["drop_at_5"]}
                row.update({f"auroc_s{k}": v for k, v in s["auroc"].items()})
                row.update({f"fpr95_s{k}": v for k, v in s["fpr95"].items()})
                rows.append(row)
        columns = (["detector", "corruption"] + [f"auroc_s{s}" for s in self.severities]
                   + [f"fpr95_s{s}" for s in self.severities] + ["drop_at_3", "drop_at_5"])
        _write_csv(directory / "corruption_summary.csv", rows, columns)
        return path

    def table(self) -> str:
        """Plain text: mean AUROC over OOD sets by severity, per detector and corruption."""
        sev = self.severities
        head = f"{'detector':<14} {'corruption':<18}" + "".join(f" {'s' + str(s):>6}" for s in sev) + "  drop@3 drop@5"
        lines = [head, "-" * len(head)]
        for det, per in self.summary.items():
            for corruption, s in per.items():
                vals = "".join(f" {s['auroc'][str(k)]:6.3f}" for k in sev)
                drops = "".join(f" {'-' if s[k] is None else format(s[k], '+.3f'):>6}"
                                for k in ("drop_at_3", "drop_at_5"))
                lines.append(f"{det:<14} {corruption:<18}{vals} {drops}")
        return "\n".join(lines)


def corruption_robustness(
    backbone: Any,
    detectors: Mapping[str, DetectorSpec] | Sequence[str],
    id_data: Any,
    ood_data: Mapping[str, Any],
    *,
    corruptions: Sequence[str] = CORRUPTION_NAMES,
    severities: Sequence[int] = (0, 1, 2, 3, 4, 5),
    apply_to: str = "both",
    id_fit: Any = None,
    id_fit_labels: np.ndarray | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    text_encoder: Any = None,
    seed: int = 0,
    work_size: int | None = REFERENCE_SIZE,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> CorruptionAuditResult:
    """Detection quality of ``detectors`` as ID and/or OOD images are corrupted.

    ``detectors``: display name -> spec (a registered name, ``(name, params)``, ``{"name": ...,
    **params}`` or an unfitted Detector), or a list of names. Zero-shot detectors are fitted with
    the text encoder (``text_encoder``, default the backbone) and ``classes`` (default: the ID
    source's class names); detectors that learn from ID data are fitted once on the **clean**
    ``id_fit`` (an ImageSource or Features, with ``id_fit_labels`` or the source's labels).
    ``id_data`` / ``ood_data``: ImageSources (their images are corrupted). ``apply_to``: corrupt
    ``"both"`` ID and OOD images, only ``"id"`` or only ``"ood"`` (the other side stays clean).
    ``severities``: integers in 0..5; 0 (clean) is always measured, as the reference of the drops.
    ``work_size``: see :class:`~oodscope.evaluation.corruptions.CorruptedSource`.
    Features go through the content-hash cache in ``cache_dir``: clean images (severity 0) share it
    with every other run, and a repeated audit only re-reads and re-corrupts the images.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if apply_to not in ("both", "id", "ood"):
        raise ValueError("apply_to must be 'both', 'id' or 'ood'")
    unknown = [c for c in corruptions if c not in CORRUPTION_NAMES]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; available: {', '.join(CORRUPTION_NAMES)}")
    if not corruptions:
        raise ValueError("at least one corruption is needed")
    severities = sorted({int(s) for s in severities})
    if not severities or severities[0] < 0 or severities[-1] > 5:
        raise ValueError("severities must be integers in 0..5")
    if 0 not in severities:
        severities = [0, *severities]  # the clean reference is always measured
    _check_ood_names(ood_data)
    for name, data in {"ID": id_data, **ood_data}.items():
        if not _is_source(data):
            raise TypeError(f"{name}: the corruption audit needs an ImageSource (its images are corrupted)")
    if isinstance(detectors, Sequence) and not isinstance(detectors, str):
        detectors = {d: d for d in detectors}
    if not detectors:
        raise ValueError("at least one detector is needed")

    options = {"cache_dir": cache_dir, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    n_failed = 0

    def features_of(source: Any, label: str) -> _Data:
        nonlocal n_failed
        d = _as_data(backbone, source, label, options)
        n_failed += d.n_failed
        return d

    clean_id = features_of(id_data, "ID clean")
    if classes is None and getattr(id_data, "class_names", None):
        classes = list(id_data.class_names)
    fitted: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    fit_data: _Data | None = None
    encoder = text_encoder if text_encoder is not None else backbone
    for name, spec in detectors.items():
        det = _make_detector(spec, classes)
        if getattr(type(det), "needs_text_encoder", False):
            det.fit(text_encoder=encoder)
        elif det.needs_fit or det.needs_labels or id_fit is not None:
            if id_fit is None:
                raise ValueError(f"{name} learns from ID data: pass id_fit (clean in-distribution images or features)")
            if fit_data is None:
                fit_data = features_of(id_fit, "ID fit") if _is_source(id_fit) else _Data(id_fit, None, None, 0)
                if id_fit_labels is not None:
                    fit_data.labels = np.asarray(id_fit_labels, dtype=np.int64)
            if det.needs_labels and fit_data.labels is None:
                raise ValueError(f"{name} needs the labels of the ID fit data (id_fit_labels=...)")
            det.fit(fit_data.features, fit_data.labels)
        else:
            # Nothing is learned (needs_fit is False): fit only marks the detector ready.
            det.fit(clean_id.features)
        fitted[name] = det
        specs[name] = {"name": det.name, "params": _jsonable(det.get_params())}

    clean_ood = {name: features_of(src, f"{name} clean") for name, src in ood_data.items()}

    def measure(id_f: Features, ood_f: Mapping[str, Features], corruption: str, severity: int) -> list[dict]:
        out = []
        for det_name, det in fitted.items():
            id_scores = None if _is_stateful(det) else det.score(id_f)
            for ood_name, f in ood_f.items():
                m = _pair_metrics(det, id_f, f, id_scores, seed)
                out.append({"detector": det_name, "corruption": corruption, "severity": severity,
                            "ood_set": ood_name, **m})
        return out

    clean_rows = measure(clean_id.features, {k: d.features for k, d in clean_ood.items()}, "none", 0)
    rows: list[dict[str, Any]] = []
    conditions = [(c, s) for c in corruptions for s in severities if s > 0]
    bar = tqdm(total=len(conditions), desc="corruptions", disable=not progress, dynamic_ncols=True, position=0)
    try:
        for corruption in corruptions:
            rows.extend({**r, "corruption": corruption} for r in clean_rows)
            for severity in (s for s in severities if s > 0):
                bar.set_postfix_str(f"{corruption}@{severity}")
                tag = f"{corruption}@{severity}"
                if apply_to in ("both", "id"):
                    id_f = features_of(CorruptedSource(id_data, corruption, severity, seed, work_size=work_size),
                                       f"ID {tag}").features
                else:
                    id_f = clean_id.features
                if apply_to in ("both", "ood"):
                    ood_f = {name: features_of(CorruptedSource(src, corruption, severity, seed, work_size=work_size),
                                               f"{name} {tag}").features for name, src in ood_data.items()}
                else:
                    ood_f = {k: d.features for k, d in clean_ood.items()}
                rows.extend(measure(id_f, ood_f, corruption, severity))
                bar.update(1)
    finally:
        bar.close()

    summary: dict[str, dict[str, Any]] = {}
    for det_name in fitted:
        per: dict[str, Any] = {}
        for corruption in [*corruptions, MEAN_KEY] if len(corruptions) > 1 else list(corruptions):
            names = corruptions if corruption == MEAN_KEY else [corruption]
            entry: dict[str, Any] = {"auroc": {}, "fpr95": {}}
            for s in severities:
                picked = [r for r in rows
                          if r["detector"] == det_name and r["severity"] == s and r["corruption"] in names]
                entry["auroc"][str(s)] = float(np.mean([r["auroc"] for r in picked]))
                entry["fpr95"][str(s)] = float(np.mean([r["fpr95"] for r in picked]))
            for s in (3, 5):
                have = str(s) in entry["auroc"]
                entry[f"drop_at_{s}"] = entry["auroc"]["0"] - entry["auroc"][str(s)] if have else None
            per[corruption] = entry
        summary[det_name] = per

    return CorruptionAuditResult(
        backbone_id=getattr(clean_id.features, "backbone_id", None), detectors=specs,
        corruptions=list(corruptions), severities=severities, apply_to=apply_to, seed=seed, work_size=work_size,
        n_id=len(clean_id.features), n_ood={k: len(d.features) for k, d in clean_ood.items()}, rows=rows,
        summary=summary, seconds=time.perf_counter() - started, n_failed=n_failed,
    )


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


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


# ------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


_KIND_COLORS = {"baseline": "black", "template": "tab:blue", "context": "tab:orange", "class_name": "tab:green",
                "ensemble": "tab:purple", "custom": "tab:gray"}


def plot_prompt_sensitivity(result: PromptAuditResult | Mapping[str, Any], path: str | os.PathLike,
                            metric: str = "auroc", dpi: int = 110) -> Path:
    """Box plot of ``metric`` over the prompt variants for each OOD set (and the mean), with every
    variant as a dot coloured by kind, the baseline as a black diamond and best/worst annotated."""
    if not isinstance(result, PromptAuditResult):
        result = PromptAuditResult.from_dict(result)
    if metric not in ("auroc", "fpr95"):
        raise ValueError("metric must be 'auroc' or 'fpr95'")
    plt = _pyplot()
    sets = list(result.summary)
    kinds = {v["id"]: v["kind"] for v in result.variants}
    labels = {v["id"]: v["label"] for v in result.variants}
    fig, ax = plt.subplots(figsize=(max(4.5, 2.3 * len(sets) + 1.5), 4.6))
    rng = np.random.default_rng(0)
    for x, name in enumerate(sets):
        if name == MEAN_KEY:
            values = {v["id"]: v[f"mean_{metric}"] for v in result.variants}
        else:
            values = {r["variant"]: r[metric] for r in result.rows if r["ood_set"] == name}
        ax.boxplot([list(values.values())], positions=[x], widths=0.5, showfliers=False,
                   medianprops={"color": "0.3"}, boxprops={"color": "0.6"}, whiskerprops={"color": "0.6"},
                   capprops={"color": "0.6"})
        for vid, val in values.items():
            if kinds[vid] == "baseline":
                ax.scatter([x], [val], marker="D", s=36, color="black", zorder=4)
            else:
                ax.scatter([x + rng.uniform(-0.16, 0.16)], [val], s=14, color=_KIND_COLORS.get(kinds[vid], "gray"),
                           alpha=0.8, zorder=3)
        high, low = max(values, key=values.get), min(values, key=values.get)
        best, worst = (high, low) if metric == "auroc" else (low, high)
        for vid, va, tag in ((best, "bottom", "best"), (worst, "top", "worst")):
            ax.annotate(f"{tag}: {_short(labels[vid], 28)}", (x, values[vid]), xytext=(0, 6 if va == "bottom" else -6),
                        textcoords="offset points", ha="center", va=va, fontsize=6.5, color="0.15")
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s}\nspread {result.summary[s][metric]['spread']:.3f}" for s in sets], fontsize=8)
    ax.set_ylabel("AUROC" if metric == "auroc" else "FPR@95")
    ax.set_title(f"{result.method} prompt sensitivity ({len(result.variants)} phrasings, {result.backbone_id})",
                 fontsize=9)
    handles = [plt.Line2D([], [], marker="D" if k == "baseline" else "o", linestyle="", color=c, label=k)
               for k, c in _KIND_COLORS.items() if k in set(kinds.values())]
    ax.legend(handles=handles, fontsize=7, loc="best", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.04 * (hi - lo), hi + 0.06 * (hi - lo))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_corruption_curves(result: CorruptionAuditResult | Mapping[str, Any], path: str | os.PathLike,
                           metric: str = "auroc", dpi: int = 110) -> Path:
    """``metric`` (mean over OOD sets) against severity, one line per detector, one panel per
    corruption plus one averaged over the corruptions."""
    if not isinstance(result, CorruptionAuditResult):
        result = CorruptionAuditResult.from_dict(result)
    if metric not in ("auroc", "fpr95"):
        raise ValueError("metric must be 'auroc' or 'fpr95'")
    plt = _pyplot()
    panels = list(result.corruptions) + ([MEAN_KEY] if len(result.corruptions) > 1 else [])
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols + 0.4, 2.6 * rows_n + 0.4), sharey=True, squeeze=False)
    for ax, corruption in zip(axes.flat, panels, strict=False):
        for det in result.summary:
            sev, vals = result.curve(det, corruption, metric)
            ax.plot(sev, vals, marker="o", markersize=3.5, label=det)
        ax.set_title("mean over corruptions" if corruption == MEAN_KEY else corruption, fontsize=9)
        ax.set_xticks(result.severities)
        ax.set_xlabel("severity", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(("AUROC" if metric == "auroc" else "FPR@95") + " (mean over OOD sets)", fontsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8, frameon=False)
    who = "ID+OOD" if result.apply_to == "both" else result.apply_to.upper()
    fig.suptitle(f"Corruption robustness ({who} corrupted, {result.backbone_id})", fontsize=10)
    legend_rows = math.ceil(len(names) / 6)
    fig.tight_layout(rect=(0, (0.05 + 0.04 * legend_rows) / rows_n, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
