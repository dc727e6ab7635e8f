"""``oodscope demo``: a small but real end-to-end OOD study on the packaged offline backbones.

1. Data: Fashion-MNIST-OOD — ID = {T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag}, near-OOD =
   {Pullover, Coat, Shirt, Ankle boot}, far-OOD = scikit-learn digits and conformal-clip-data
   textiles. Full Fashion-MNIST from the Debian package when installed, else the committed sample
   (the same first images of each class).
2. Benchmark: a handful of representative detectors — post-hoc on the EfficientNet-Lite0 classifier
   (MSP, Energy, ViM), feature-space (KNN, Mahalanobis), zero-shot from class names on the default
   zero-shot backbone ConSE over EfficientNet-Lite1 (MCM, label_vocabulary) and few-shot (GDA, linear
   probe) — with AUROC / FPR@95 per OOD set. Each image goes through each of the two networks once
   (Lite1 costs about 1.3x Lite0; docs/zero_shot.md says why it is the zero-shot default).
3. Deployment: one calibrated model (KNN on EfficientNet-Lite0 features, conformal p-values at
   alpha = 0.05) fitted on ID images, calibrated on other ID images, scoring a mixed folder of ID,
   OOD and one corrupt file — the corrupt file is reported, everything else is scored.
4. Anomaly detection (:mod:`oodscope.cli.demo_anomaly`): PatchCore fitted on the good crops of the
   offline ``synthetic-ad/brick`` category, scoring crops with synthetic defects: image AUROC, pixel
   AUROC, AUPRO and a gallery of maps and masks (``anomaly=False`` skips it).
5. A self-contained HTML report with the tables, ROC curves and score histograms.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodscope.backbones import DEFAULT_ZERO_SHOT_BACKBONE
from oodscope.io import Subset, digits, fashion_mnist_ood, textiles, write_image_folder
from oodscope.io.realdata import fashion_mnist_root, fashion_mnist_sample_root

DEMO_DETECTORS = {
    "effnet-lite0": ["msp", "energy", "vim", "knn", "mahalanobis"],
    # the default zero-shot backbone (conse:effnet-lite1, chosen in docs/zero_shot.md) and the
    # zero-shot default there, label_vocabulary, beside MCM
    DEFAULT_ZERO_SHOT_BACKBONE: ["mcm", "label_vocabulary", "gda", "linear_probe"],
}


@dataclass
class DemoResult:
    output: Path
    report: Path
    table: str
    deployment: dict
    seconds: float


def _spread(source, n: int):
    """n items spread evenly over a source (deterministic)."""
    if n >= len(source):
        return source
    return Subset(source, np.linspace(0, len(source) - 1, n).round().astype(int))


def run_demo(output: str | Path = "oodscope-demo", *, per_class: int = 40, far: int = 200,
             progress: bool = True, anomaly: bool = True) -> DemoResult:
    from oodscope.evaluation.bench import BenchConfig, OODSet, run_benchmark
    from oodscope.pipeline import OODModel
    from oodscope.reports.html import render_report

    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache = output / "cache"
    root = fashion_mnist_root(allow_sample=True)
    sample = root == fashion_mnist_sample_root()
    if sample:
        per_class = min(per_class, 30)  # the committed sample holds 80 train / 60 test per class
    train = fashion_mnist_ood("train", per_class=2 * per_class, root=root)
    test = fashion_mnist_ood("test", per_class=per_class, root=root)
    # Train images: the first per_class of each ID class fit the detectors, the next per_class calibrate.
    fit_rows = np.concatenate([np.flatnonzero(train.id.labels == c)[:per_class] for c in range(6)])
    cal_rows = np.concatenate([np.flatnonzero(train.id.labels == c)[per_class:] for c in range(6)])
    id_fit, id_cal = Subset(train.id, np.sort(fit_rows)), Subset(train.id, np.sort(cal_rows))
    far_sets = {"digits": _spread(digits(), far), "textiles": _spread(textiles(), far)}
    classes = [name.lower() for name in test.id_class_names]

    say = print if progress else (lambda *a, **k: None)
    say(f"[1/3] benchmark: {len(id_fit)} ID fit images, {len(test.id)} ID test, {len(test.near_ood)} near-OOD, "
        f"{sum(len(s) for s in far_sets.values())} far-OOD"
        + (" (committed Fashion-MNIST sample)" if sample else ""))
    # Sized to a fit set of a few hundred images: ViM's default subspace (512 of EfficientNet-Lite0's
    # 1,280 dimensions) must be smaller than the fit set, and KNN's k=50 was set for banks of 50,000.
    params = {"vim": {"dim": min(512, len(id_fit) // 2)}, "knn": {"k": min(10, len(id_fit))}}
    config = BenchConfig(
        backbones=list(DEMO_DETECTORS), detectors=DEMO_DETECTORS, id=test.id, id_fit=id_fit, classes=classes,
        detector_params=params,
        ood=[OODSet("fashion_near", test.near_ood, "near")]
        + [OODSet(name, src, "far") for name, src in far_sets.items()],
        output=output / "bench", cache_dir=cache, report=False, progress=progress,
    )
    result = run_benchmark(config)

    say("[2/3] deployment: a calibrated KNN model scoring a mixed folder")
    mixed = output / "mixed"
    if mixed.exists():
        shutil.rmtree(mixed)
    groups = {"id": _spread(test.id, 30), "near_ood": _spread(test.near_ood, 10),
              "digits": _spread(far_sets["digits"], 10), "textiles": _spread(far_sets["textiles"], 10)}
    for name, src in groups.items():
        write_image_folder(src, mixed / name, indices=None)
    (mixed / "id" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this file was cut short")
    model = OODModel("effnet-lite0", method="knn", method_params=params["knn"], alpha=0.05,
                     cache_dir=cache, progress=progress)
    model.fit(id_fit, calibration=id_cal)
    model.save(output / "model")
    files = sorted(p for p in mixed.rglob("*") if p.is_file())
    predictions = model.predict([str(p) for p in files])
    deployment = _deployment_summary(files, mixed, predictions, model)
    (output / "deployment.json").write_text(json.dumps(deployment, indent=2))

    extra, anomaly_table = [], ""
    if anomaly:
        from oodscope.cli.demo_anomaly import DEMO_ANOMALY_CATEGORY, DEMO_ANOMALY_DETECTOR, run_anomaly_demo

        say(f"[anomaly] {DEMO_ANOMALY_DETECTOR} fitted on good {DEMO_ANOMALY_CATEGORY} crops, scoring defective ones")
        part = run_anomaly_demo(output / "anomaly", cache_dir=cache, progress=progress)
        extra.append((f"Anomaly detection: {DEMO_ANOMALY_DETECTOR} on {DEMO_ANOMALY_CATEGORY}", part.html))
        anomaly_table = "\n" + part.table

    say("[3/3] report")
    report = render_report(result.output, output / "report.html", title="oodscope demo: Fashion-MNIST-OOD",
                           sections=[("Deployment: a calibrated model scoring a mixed folder",
                                      _deployment_html(deployment)), *extra])
    table = (result.output / "results.md").read_text() + anomaly_table
    return DemoResult(output, report, table, deployment, time.perf_counter() - started)


def _deployment_summary(files, root: Path, predictions, model) -> dict:
    groups: dict[str, dict] = {}
    errors = []
    for path, row_ood, error in zip(files, predictions.ood, predictions.errors, strict=True):
        group = path.relative_to(root).parts[0]
        if error is not None:
            errors.append({"file": str(path.relative_to(root)), "error": error})
            continue
        g = groups.setdefault(group, {"images": 0, "flagged_ood": 0})
        g["images"] += 1
        g["flagged_ood"] += int(row_ood)
    return {
        "model": f"knn (k={model.method_params['k']}) on effnet-lite0 features, conformal p-values",
        "alpha": model.alpha,
        "calibration_images": model.info_.get("calibration", {}).get("n"),
        "groups": groups,
        "unreadable": errors,
    }


def _deployment_html(deployment: dict) -> str:
    from html import escape

    from oodscope.reports.markup import html_table

    rows = [(group, g["images"], g["flagged_ood"]) for group, g in deployment["groups"].items()]
    rows += [(f"unreadable: {bad['file']}", "", bad["error"]) for bad in deployment["unreadable"]]
    return (f"<p>{escape(deployment['model'])}, alpha = {deployment['alpha']}, "
            f"{deployment['calibration_images']} calibration images. Images flagged OOD per folder of the "
            "mixed set (<code>id</code> should stay near alpha; the others should be flagged); unreadable files "
            "are reported, not fatal.</p>" + html_table(["folder", "images", "flagged OOD"], rows))
