"""Prompt sensitivity of a zero-shot detector: many phrasings of the ID prompts, image features fixed.

The audit runner, its result and its plot; the phrasings themselves are :mod:`oodscope.evaluation.audit.variants`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.evaluation.audit._common import (
    MEAN_KEY,
    AuditRecord,
    as_data,
    check_ood_names,
    distribution,
    is_stateful,
    label_map,
    merge_audit_json,
    pair_metrics,
    pyplot,
    write_csv,
)
from oodscope.evaluation.audit.variants import PromptVariant, prompt_variants


@dataclass
class PromptAuditResult(AuditRecord):
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
        path = merge_audit_json(directory, self.kind, self.to_dict())
        write_csv(directory / "prompt_audit.csv", self.rows, ("variant", "kind", "label", "ood_set", "auroc", "fpr95"))
        first = self.classes[0]
        variant_rows = [{**v, "example": PromptVariant.from_dict(v).prompts([first])[first][0]} for v in self.variants]
        write_csv(directory / "prompt_variants.csv", variant_rows,
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
        write_csv(directory / "prompt_summary.csv", summary_rows, list(summary_rows[0]) if summary_rows else [])
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
    from oodscope.detectors.fitting import class_needs

    started = time.perf_counter()
    registry = registered()
    if method not in registry:
        raise ValueError(f"unknown detector {method!r}")
    if not class_needs(registry[method]).text_encoder:
        raise ValueError(f"{method!r} is not a zero-shot detector: the prompt audit needs one (e.g. mcm)")
    encoder = text_encoder if text_encoder is not None else backbone
    if not callable(getattr(encoder, "encode_texts", None)):
        raise TypeError("the prompt audit needs a vision-language backbone or a text_encoder with encode_texts")
    check_ood_names(ood_data)
    params = dict(method_params or {})
    for key in ("classes", "templates", "custom_prompts"):
        if key in params:
            raise ValueError(f"method_params must not set {key!r}: the audit sets it per variant")

    options = {"cache_dir": cache_dir, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    id_d = as_data(backbone, id_data, "ID", options)
    if classes is None:
        if not id_d.class_names:
            raise ValueError("classes are needed (the ID data has no class names)")
        classes = list(id_d.class_names)
    classes = list(classes)
    ood = {name: as_data(backbone, data, name, options) for name, data in ood_data.items()}
    labels = np.asarray(id_labels, dtype=np.int64) if id_labels is not None else label_map(
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
        id_scores = None if is_stateful(detector) else detector.score(id_d.features)
        per_set = {}
        for name, d in ood.items():
            per_set[name] = pair_metrics(detector, id_d.features, d.features, id_scores, seed)
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
        fpr = distribution({k: -x for k, x in f.items()})  # best = lowest FPR
        fpr.update(min=-fpr["max"], max=-fpr["min"], median=-fpr["median"], mean=-fpr["mean"])
        summary[name] = {"auroc": distribution(a), "fpr95": fpr,
                         "baseline_auroc": a[resolved[0].id], "baseline_fpr95": f[resolved[0].id],
                         "baseline": resolved[0].id}
    return PromptAuditResult(
        method=method, method_params=params, backbone_id=getattr(id_d.features, "backbone_id", None),
        classes=classes, n_id=len(id_d.features), n_ood={k: len(d.features) for k, d in ood.items()},
        variants=variant_dicts, rows=rows, summary=summary, seconds=time.perf_counter() - started,
        n_failed=id_d.n_failed + sum(d.n_failed for d in ood.values()),
    )


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
    plt = pyplot()
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
