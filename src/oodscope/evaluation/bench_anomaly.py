"""The benchmark's anomaly mode: per category, fit each anomaly detector on the good training images,
score the test images, and tabulate image AUROC, pixel AUROC and AUPRO.

``run_benchmark(config)`` comes here when ``config.anomaly`` names categories
(``oodscope bench --anomaly synthetic-ad``). A category entry is

- a family (``synthetic-ad``, ``textiles-ad``, ``mvtec-ad``, ``visa``, ``mpdd``): every category of it
  (:func:`oodscope.io.registry.anomaly_categories`; MVTec AD / VisA / MPDD must be placed by hand);
- ``family/category`` (``synthetic-ad/brick``, ``textiles-ad/local``): that one category;
- a path to a folder in MVTec AD's layout (``train/good``, ``test/<type>``, ``ground_truth/<type>``);
- a table ``{name, train, test}`` of data specs (:func:`oodscope.io.resolve_images`), e.g. a custom
  folder layout built with :func:`oodscope.io.anomaly_folder`.

For each backbone (asked for its default dense maps, as ``OODModel`` does for anomaly methods) the
train and test images of a category go through the network once (feature cache); every detector of
kind ``anomaly`` is fitted on the train features with its kind's inputs
(:func:`oodscope.detectors.fitting.fit_detector`) and gives image scores and maps
(``score_maps``). Maps are brought to each image (bilinear upsampling + Gaussian smoothing, sigma = 4
px at the network's input, then the inverse of the preprocessing geometry:
:mod:`oodscope.pipeline.maps`), at the image's own resolution but at most ``anomaly_eval_size`` px on
the longer side (masks resized nearest-neighbour to the same size), where pixel AUROC and AUPRO
(:mod:`oodscope.evaluation.anomaly_metrics`) are computed. Pixel columns are left empty, with the
reason in ``note``, for image-level methods (``pixel_maps = False``: Gaussian AD) and for categories
without ground-truth masks (the textiles).

Outputs in ``output``: ``results.csv`` / ``results.md`` / ``results.json`` (``"mode": "anomaly"``;
rows per backbone, detector, category, plus a ``mean`` row per backbone and detector), ``timings.csv``,
``failures.csv``, ``scores/<backbone>/<detector>.safetensors`` (per category: ``<category>`` scores
and ``<category>.labels``), and the gallery ``gallery/...png``: for every (backbone, detector,
category) the ``anomaly_gallery`` highest- and lowest-scoring test images, each with its map as an
overlay and its ground-truth mask (listed in ``results.json["gallery"]``), which the HTML report shows.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.backbones.base import InputSpec
from oodscope.evaluation.anomaly_metrics import aupro, image_metrics, pixel_auroc
from oodscope.evaluation.bench_config import BenchConfig, describe, spread
from oodscope.evaluation.bench_output import FORMAT, FORMAT_VERSION, _json_default, _write_csv, environment
from oodscope.io import ImageSource, Subset, resolve_images

#: Columns of the anomaly results (results.csv, results.json rows).
ANOMALY_FIELDS = ("backbone", "detector", "category", "family", "image_auroc", "image_aupr", "image_f1_max",
                  "pixel_auroc", "aupro", "n_train", "n_test", "n_defective", "fit_s", "score_s", "note")
#: Metric columns of the markdown table (in %).
TABLE_METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))


@dataclass
class AnomalyCategory:
    name: str  # unique in the run (a table column / file name)
    family: str
    train: Any  # data specs
    test: Any


def object_name(category: str) -> str:
    """The object a category shows, in words, for prompts: ``synthetic-ad/brick`` -> ``brick``,
    ``mvtec-ad/metal_nut`` -> ``metal nut``, ``textiles-ad`` -> ``textiles``."""
    last = category.rstrip("/").split("/")[-1]
    return last.removesuffix("-ad").replace("_", " ").replace("-", " ")


def anomaly_categories_of(entries: Sequence[Any]) -> list[AnomalyCategory]:
    """The categories named by ``config.anomaly`` (see the module docstring); unknown names raise."""
    from oodscope.io.registry import anomaly_categories

    families = ("synthetic-ad", "textiles-ad", "mvtec-ad", "visa", "mpdd")
    out: list[AnomalyCategory] = []
    for entry in entries:
        if isinstance(entry, Mapping):
            missing = {"name", "train", "test"} - set(entry)
            if missing:
                raise ValueError(f"anomaly category {dict(entry)!r}: missing {sorted(missing)} (name, train, test)")
            out.append(AnomalyCategory(str(entry["name"]), str(entry.get("family", "custom")), entry["train"],
                                       entry["test"]))
            continue
        text = str(entry)
        family, _, category = text.partition("/")
        if family in families:
            found = anomaly_categories(family)
            if category:
                found = [c for c in found if c[0] == category]
                if not found:
                    raise ValueError(f"anomaly category {text!r}: {family} has "
                                     f"{', '.join(c[0] for c in anomaly_categories(family))}")
            # textiles-ad's categories (local, global) are named after the family: "textiles-local"
            prefix = "textiles-" if family == "textiles-ad" else ""
            out += [AnomalyCategory(f"{prefix}{c}", family, train, test) for c, train, test in found]
            continue
        path = Path(text).expanduser()
        if (path / "train").is_dir() and (path / "test").is_dir():
            from oodscope.io import mvtec_category

            split = mvtec_category(path)
            out.append(AnomalyCategory(path.name, "mvtec-layout", split.train, split.test))
            continue
        raise ValueError(f"anomaly category {text!r}: not a family ({', '.join(families)}), family/category, "
                         "or a folder in MVTec AD's layout (train/good, test/<type>)")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"anomaly categories listed twice: {names}")
    if not out:
        raise ValueError("no anomaly category: give anomaly (--anomaly synthetic-ad, ...)")
    return out


def anomaly_detector_names(selection: Any, available: Mapping[str, type]) -> tuple[list[str], list[str]]:
    """(anomaly detectors to run, other names given that are not anomaly detectors)."""
    from oodscope.detectors.kinds import DetectorKind

    if isinstance(selection, Mapping):
        raise ValueError("the anomaly mode takes one detector list for every backbone")
    names = [s.strip() for s in selection.split(",") if s.strip()] if isinstance(selection, str) else list(selection)
    if names == ["all"]:
        return [n for n, c in available.items() if c.kind == DetectorKind.ANOMALY], []
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; registered: {', '.join(available)}")
    chosen = list(dict.fromkeys(names))
    return ([n for n in chosen if available[n].kind == DetectorKind.ANOMALY],
            [n for n in chosen if available[n].kind != DetectorKind.ANOMALY])


# ============================================================================ per image
def _image_size(source: ImageSource, i: int) -> tuple[int, int]:
    """(W, H) of item ``i`` from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(source.read(i))) as img:
        return img.size


def eval_size(size: tuple[int, int], limit: int | None) -> tuple[int, int]:
    """(W, H) at which maps and masks are compared: the image's own, the longer side at most ``limit``."""
    w, h = size
    if limit is None or max(w, h) <= limit:
        return w, h
    scale = limit / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _masks(source: ImageSource, labels: np.ndarray, sizes: list[tuple[int, int]]) -> tuple[list[np.ndarray] | None,
                                                                                           str]:
    """Each image's mask at its evaluation size, or (None, why not)."""
    from oodscope.io.anomaly import MaskError, find_anomaly_source, load_mask

    if find_anomaly_source(source, 0) is None:
        return None, "the test set has no ground-truth masks"
    out = []
    for i, (w, h) in enumerate(sizes):
        try:
            out.append(load_mask(source, i, (h, w)))
        except MaskError:
            return None, "the test set has no ground-truth masks (image labels only)"
    if not any(m.any() for m, y in zip(out, labels, strict=True) if y == 1):
        return None, "the masks of the defective images are empty"
    return out, ""


# ============================================================================ the run
def run_anomaly_benchmark(cfg: BenchConfig) -> Any:
    """Run the anomaly mode of ``cfg`` (see the module docstring); returns a ``BenchResult``."""
    from oodscope.backbones import create
    from oodscope.detectors import registered
    from oodscope.detectors.base import parameters
    from oodscope.detectors.fitting import build_detector
    from oodscope.evaluation.bench import BenchResult, _Log
    from oodscope.features.extract import extract

    started_at = dt.datetime.now(dt.timezone.utc)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    categories = anomaly_categories_of(cfg.anomaly)
    names, others = anomaly_detector_names(cfg.detectors, registered())
    if not cfg.backbones:
        raise ValueError("no backbone: give backbones (--backbone B)")
    log = _Log(cfg.progress)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    gallery: list[dict[str, Any]] = []
    datasets: dict[str, dict[str, Any]] = {}
    score_files: dict[str, dict[str, str]] = {}
    plans = []
    for cat in categories:  # resolved before any image is read: a bad name is refused here
        fit_limit = cfg.fit_limit if cfg.fit_limit is not None else cfg.limit
        train = _limited(resolve_images(cat.train), fit_limit)
        test = _limited(resolve_images(cat.test), cfg.limit)
        plans.append((cat, train, test))
        datasets[f"{cat.name}/train"] = {"role": "fit", "kind": cat.family, "data": describe(cat.train),
                                         "images": len(train)}
        datasets[f"{cat.name}/test"] = {"role": "test", "kind": cat.family, "data": describe(cat.test),
                                        "images": len(test)}

    for item in cfg.backbones:
        spec = item if isinstance(item, str) else item.id
        options = dict(cfg.backbone_options.get(spec, {})) if isinstance(item, str) else {}
        options.setdefault("dense_layers", True)  # anomaly methods read the backbone's default dense maps
        backbone = create(item, device=cfg.device, **options) if isinstance(item, str) else item
        for name in others:
            failures.append({"backbone": spec, "detector": name, "stage": "plan",
                             "reason": "not an anomaly detector (the anomaly mode runs detectors of kind anomaly)"})
        saved: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
        for cat, train, test in plans:
            log(f"anomaly {spec} {cat.name}: {len(train)} train, {len(test)} test images")
            feats = {}
            for role, source in (("train", train), ("test", test)):
                result = extract(backbone, source, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 cache_dir=cfg.cache_dir, progress=cfg.progress,
                                 description=f"{backbone.id} {cat.name} {role}")
                timings.append(_timing(spec, "extract", result.seconds, set_name=f"{cat.name}/{role}"))
                if result.failures:
                    failures.append({"backbone": spec, "detector": "", "stage": f"extract {cat.name}/{role}",
                                     "reason": f"{len(result.failures)} unreadable image(s), left out; first: "
                                     f"{result.failures[0].__dict__}"})
                feats[role] = result
            kept = np.asarray(feats["test"].indices)
            test_kept = test if len(kept) == len(test) else Subset(test, kept)
            labels = np.asarray(test_kept.labels)
            sizes = [eval_size(_image_size(test_kept, i), cfg.anomaly_eval_size) for i in range(len(test_kept))]
            masks, no_mask_reason = _masks(test_kept, labels, sizes)
            for name in names:
                params = dict(cfg.params_for(name))
                if "object_name" in parameters(registered()[name]) and "object_name" not in params:
                    params["object_name"] = object_name(cat.name)  # WinCLIP's state prompts name the object
                det = build_detector(name, params)
                try:
                    scores, grid, map_spec, fit_s, score_s = _fit_and_score(det, backbone, feats, train, test_kept,
                                                                            cfg.batch_size)
                except Exception as err:  # noqa: BLE001 - recorded with its reason; the run goes on
                    failures.append({"backbone": spec, "detector": name, "stage": f"fit/score {cat.name}",
                                     "reason": f"{type(err).__name__}: {err}"})
                    continue
                timings.append(_timing(spec, "fit", fit_s, name, f"{cat.name}/train"))
                timings.append(_timing(spec, "score", score_s, name, f"{cat.name}/test"))
                has_maps = type(det).pixel_maps
                maps = _image_maps(grid, map_spec, sizes) if has_maps else None
                row = {"backbone": spec, "detector": name, "category": cat.name, "family": cat.family,
                       "n_train": len(feats["train"].indices), "n_test": len(labels),
                       "n_defective": int(labels.sum()), "fit_s": round(fit_s, 3), "score_s": round(score_s, 3)}
                try:
                    m = image_metrics(labels, scores)
                    row |= {k: m[k] for k in ("image_auroc", "image_aupr", "image_f1_max")}
                    if not has_maps:
                        row["note"] = f"{name} is image-level (no localisation): no pixel metrics"
                    elif masks is None:
                        row["note"] = f"{no_mask_reason}: no pixel metrics"
                    else:
                        row |= {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps)}
                except ValueError as err:
                    failures.append({"backbone": spec, "detector": name, "stage": f"metrics {cat.name}",
                                     "reason": str(err)})
                    continue
                rows.append(row)
                saved[name][cat.name] = np.asarray(scores, np.float64)
                saved[name][f"{cat.name}.labels"] = labels.astype(np.int64)
                gallery += _write_gallery(out, spec, name, cat.name, test_kept, labels, scores, sizes, maps, masks,
                                          cfg.anomaly_gallery)
        score_files[spec] = _save_scores(out, spec, saved)
        rows += _means(spec, names, [r for r in rows if r["backbone"] == spec])

    result = BenchResult(output=out, rows=rows, failures=failures, timings=timings, datasets=datasets,
                         config=cfg.to_dict(), environment=environment(started_at), scores=score_files)
    write_anomaly_results(result, gallery)
    return result


def _fit_and_score(det: Any, backbone: Any, feats: dict[str, Any], train: ImageSource, test: ImageSource,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray, InputSpec, float, float]:
    """Fit on the good training images, score the test images: (scores, grid maps, the InputSpec the maps
    are framed in, fit s, score s). Methods that train their own networks on the images (EfficientAD,
    ``fit_needs().images``) get the images themselves, stretched to the detector's ``image_size`` as [0, 1]
    pixels; the others the cached dense features (and the backbone as text encoder when it has one)."""
    from oodscope.backbones import is_vision_language
    from oodscope.detectors.fitting import fit_detector

    t0 = time.perf_counter()
    if det.fit_needs().images:
        size = int(det.get_params().get("image_size", backbone.input_spec.size))
        pixels = InputSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="stretch")
        fit_detector(det, parts=pixels, images=_pixel_batches(train, pixels, batch_size))
        fit_s, t0 = time.perf_counter() - t0, time.perf_counter()
        scores, grid = det.score_image_maps(pixels, _pixel_batches(test, pixels, batch_size))
        return scores, grid, pixels, fit_s, time.perf_counter() - t0
    fit_detector(det, feats["train"].features, text_encoder=backbone if is_vision_language(backbone) else None)
    fit_s, t0 = time.perf_counter() - t0, time.perf_counter()
    scores, grid = det.score_maps(feats["test"].features)
    return scores, grid, backbone.input_spec, fit_s, time.perf_counter() - t0


def _pixel_batches(source: ImageSource, spec: InputSpec, batch_size: int) -> Iterator[Any]:
    from oodscope.backbones.preprocess import preprocess

    for start in range(0, len(source), batch_size):
        yield preprocess([source.load(i) for i in range(start, min(start + batch_size, len(source)))], spec, "cpu")


def _limited(source: ImageSource, limit: int | None) -> ImageSource:
    idx = spread(len(source), limit)
    return source if len(idx) == len(source) else Subset(source, idx)


def _timing(backbone: str, stage: str, seconds: float, detector: str = "", set_name: str = "") -> dict[str, Any]:
    return {"backbone": backbone, "stage": stage, "detector": detector, "set": set_name,
            "seconds": round(float(seconds), 6), "cpu_seconds": None}


def _image_maps(grid: np.ndarray, spec: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Grid maps (N, h, w) -> each image's map at its evaluation size (W, H), as ``OODModel.score_maps``."""
    from oodscope.detectors._anomaly import upsample_maps
    from oodscope.pipeline.maps import DEFAULT_SIGMA, to_image_geometry

    out = []
    for start in range(0, len(grid), 64):  # 64 input-square maps at a time
        at_input = upsample_maps(grid[start:start + 64], (spec.size, spec.size), DEFAULT_SIGMA)
        out += [to_image_geometry(m, spec, sizes[start + k]) for k, m in enumerate(at_input)]
    return out


def _means(backbone: str, names: Sequence[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``mean`` row per detector over its categories (a metric's mean only where every category has it)."""
    out = []
    for name in names:
        mine = [r for r in rows if r["detector"] == name]
        if len(mine) < 2:
            continue
        row: dict[str, Any] = {"backbone": backbone, "detector": name, "category": "mean", "family": "",
                               "n_train": "", "n_test": sum(r["n_test"] for r in mine),
                               "n_defective": sum(r["n_defective"] for r in mine),
                               "fit_s": round(sum(r["fit_s"] for r in mine), 3),
                               "score_s": round(sum(r["score_s"] for r in mine), 3)}
        for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"):
            values = [r.get(key) for r in mine]
            if all(v is not None for v in values):
                row[key] = float(np.mean(values))
            elif any(v is not None for v in values) and key in ("pixel_auroc", "aupro"):
                row["note"] = "pixel means left out: some categories have no pixel metrics"
        out.append(row)
    return out


def _save_scores(out: Path, backbone: str, saved: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    from safetensors.numpy import save_file

    files = {}
    for name, arrays in saved.items():
        if not arrays:
            continue
        rel = Path("scores") / _safe(backbone) / f"{name}.safetensors"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / rel))
        files[name] = rel.as_posix()
    return files


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


# ============================================================================ gallery
def _write_gallery(out: Path, backbone: str, detector: str, category: str, source: ImageSource, labels: np.ndarray,
                   scores: np.ndarray, sizes: list[tuple[int, int]], maps: list[np.ndarray] | None,
                   masks: list[np.ndarray] | None, k: int) -> list[dict[str, Any]]:
    """The ``k`` highest- and ``k`` lowest-scoring test images as PNGs: the image, its map over it, its mask."""
    from PIL import Image

    from oodscope.pipeline.maps import heatmap_overlay

    if k <= 0 or len(scores) == 0:
        return []
    order = np.argsort(-np.asarray(scores), kind="stable")
    picks = [("highest", r, int(i)) for r, i in enumerate(order[:k])]
    picks += [("lowest", r, int(i)) for r, i in enumerate(order[::-1][:k]) if int(i) not in order[:k]]
    folder = Path("gallery") / _safe(backbone) / detector / _safe(category)
    (out / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for which, rank, i in picks:
        stem = folder / f"{which}-{rank + 1}"
        image = source.decode(i, source.read(i)).convert("RGB").resize(sizes[i], Image.BILINEAR)
        entry = {"backbone": backbone, "detector": detector, "category": category, "which": which, "rank": rank + 1,
                 "item": source.item_id(i), "score": float(scores[i]), "label": int(labels[i]),
                 "image": f"{stem.as_posix()}-image.png", "overlay": None, "mask": None}
        image.save(out / entry["image"])
        if maps is not None:
            entry["overlay"] = f"{stem.as_posix()}-overlay.png"
            heatmap_overlay(image, maps[i]).save(out / entry["overlay"])
        if masks is not None:
            entry["mask"] = f"{stem.as_posix()}-mask.png"
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(out / entry["mask"])
        entries.append(entry)
    return entries


# ============================================================================ files
def write_anomaly_results(result: Any, gallery: list[dict[str, Any]]) -> None:
    """results.{csv,json,md}, timings.csv and failures.csv of an anomaly run."""
    out = result.output
    _write_csv(out / "results.csv", ANOMALY_FIELDS, result.rows)
    _write_csv(out / "timings.csv", ("backbone", "stage", "detector", "set", "seconds", "cpu_seconds"), result.timings)
    _write_csv(out / "failures.csv", ("backbone", "detector", "stage", "reason"), result.failures)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "mode": "anomaly", "config": result.config,
               "environment": result.environment, "datasets": result.datasets, "results": result.rows,
               "failures": result.failures, "timings": result.timings, "scores": result.scores, "gallery": gallery}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    (out / "results.md").write_text(anomaly_markdown(payload))


def anomaly_tables(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """Per (backbone, metric): ``(backbone, metric label, header, rows)``; rows = detectors, columns =
    categories then ``mean``, values in %, empty where the metric does not exist (see the notes)."""
    out = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        cats = list(dict.fromkeys(r["category"] for r in mine if r["category"] != "mean"))
        if any(r["category"] == "mean" for r in mine):
            cats.append("mean")
        detectors = list(dict.fromkeys(r["detector"] for r in mine))
        for key, label in TABLE_METRICS:
            if all(r.get(key) is None for r in mine):
                continue
            table = []
            for det in detectors:
                cells = {r["category"]: r for r in mine if r["detector"] == det}
                table.append([det] + [_pct(cells.get(c, {}).get(key)) for c in cats])
            out.append((backbone, label, ["detector", *cats], table))
    return out


def _pct(value: Any) -> str:
    return "" if value is None or value == "" else f"{100 * float(value):.1f}"


def anomaly_markdown(payload: Mapping[str, Any]) -> str:
    """results.md of an anomaly run: one table per backbone and metric, notes, what did not run."""
    rows = payload["results"]
    lines = ["# Anomaly benchmark", "",
             "Per category: fitted on the good training images, scored on the test images (good + defective). "
             "Image AUROC (defective = positive), pixel AUROC over all test pixels, AUPRO to FPR 0.3 (normalised), "
             "in %; `mean` = over the categories. Empty cells: see the notes.", ""]
    for backbone, label, header, table in anomaly_tables(rows):
        lines += [f"## {backbone}: {label}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in table]
        lines.append("")
    notes = sorted({f"`{r['detector']}` on {r['category']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if payload.get("failures"):
        lines += ["## Not run", ""] + [f"- {f['backbone']} / {f['detector'] or '-'} ({f['stage']}): {f['reason']}"
                                       for f in payload["failures"]] + [""]
    return "\n".join(lines)

