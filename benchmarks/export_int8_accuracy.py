"""What exporting changes: AUROC and OOD decisions of detectors on eager PyTorch vs exported networks.

Protocol: the registered benchmark ``fashion-mnist-ood`` (ID: 6 Fashion-MNIST classes; near-OOD: the
4 others; far-OOD: scikit-learn digits and simulated textiles), ``--per-set`` images of each set,
evenly spaced. The deployment scenario of ``OODModel.load(..., runtime=...)``: every detector is
fitted (on ``--fit`` ID fit images) and calibrated (conformal, alpha 0.05, on ``--per-set`` other
ID fit images) on eager PyTorch features, then the test images are scored from the features each
runtime computes: eager PyTorch, ONNX Runtime FP32, OpenVINO FP32, and INT8 (static QDQ,
calibrated on ``--calibration`` ID fit images not used for the detector) on ONNX Runtime and
OpenVINO.

Prints, per detector: AUROC on each OOD set per runtime, its change against PyTorch, how many of
the test images (ID test + every OOD set) change their OOD decision at alpha 0.05 and the share of
ID test images flagged (the conformal false-alarm rate, alpha in expectation); for INT8 also with
the conformal calibration redone on the INT8 scores (the detector kept); and the max |difference| of
the network outputs against PyTorch.

    python benchmarks/export_int8_accuracy.py --per-set 300 --fit 600 --calibration 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from oodscope.backbones import create
from oodscope.backbones.exported import ExportedBackbone, calibration_batches, export_network, max_abs_diff
from oodscope.evaluation.metrics import auroc
from oodscope.features.extract import extract
from oodscope.io import Subset, resolve_images
from oodscope.io.registry import get_benchmark
from oodscope.pipeline import OODModel


def spaced(source, n: int, offset: int = 0) -> Subset:
    """``n`` evenly spaced rows of ``source`` (class-sorted sets keep every class), shifted by ``offset``."""
    total = len(source)
    step = max(1, total // n)
    rows = (np.arange(n) * step + offset) % total
    return Subset(source, np.unique(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="effnet-lite0")
    parser.add_argument("--per-set", type=int, default=300)
    parser.add_argument("--fit", type=int, default=600)
    parser.add_argument("--calibration", type=int, default=256, help="INT8 calibration images")
    parser.add_argument("--detectors", default="msp,energy,react,knn,mahalanobis,vim")
    parser.add_argument("--runtimes", default="onnxruntime,openvino,onnxruntime-int8,openvino-int8")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    started = time.perf_counter()

    bench = get_benchmark("fashion-mnist-ood")
    id_fit_all = resolve_images(bench.id_fit)
    fit_set = spaced(id_fit_all, args.fit, 0)
    cal_set = spaced(id_fit_all, args.per_set, 3)  # conformal calibration: other ID fit images
    quant_set = spaced(id_fit_all, args.calibration, 7)  # INT8 ranges: others again
    tests = {"id": spaced(resolve_images(bench.id), args.per_set)}
    for name, spec in {**bench.near, **bench.far}.items():
        tests[name] = spaced(resolve_images(spec), args.per_set)
    ood_names = [k for k in tests if k != "id"]

    torch_backbone = create(args.backbone, device="cpu", layers=False)
    runtimes = args.runtimes.split(",")
    backbones = {"torch": torch_backbone}
    with tempfile.TemporaryDirectory() as tmp:
        quant = calibration_batches(quant_set, torch_backbone.input_spec, limit=None)
        for name in runtimes:
            runtime, _, precision = name.partition("-")
            export_network(torch_backbone, Path(tmp) / name, runtime=runtime, int8=precision == "int8",
                           calibration=quant)
            backbones[name] = ExportedBackbone(Path(tmp) / name)

        features = {}
        for name, backbone in backbones.items():
            sets = {"fit": fit_set, "cal": cal_set, **tests} if name == "torch" else {"cal": cal_set, **tests}
            for set_name, source in sets.items():
                features[name, set_name] = extract(backbone, source, progress=False).features

    print(f"backbone {torch_backbone.id}; fashion-mnist-ood, {args.per_set} images per test set "
          f"({', '.join(f'{k} {len(v)}' for k, v in tests.items())}); detectors fitted on {len(fit_set)} and "
          f"calibrated on {len(cal_set)} ID fit images (eager PyTorch features); INT8 calibrated on "
          f"{len(quant_set)} other ID fit images; alpha {args.alpha:g}")
    print()
    print("Max |difference| against eager PyTorch over all test images:")
    print()
    print("| runtime | " + " | ".join(["logits", "penultimate"]) + " |")
    print("|---|---|---|")
    for name in runtimes:
        worst: dict[str, float] = {}
        for set_name in tests:
            for field, value in max_abs_diff(features["torch", set_name], features[name, set_name]).items():
                worst[field] = max(worst.get(field, 0.0), value)
        print(f"| {name} | {worst['logits']:.2g} | {worst['penultimate']:.2g} |")
    print()

    header = "| detector | runtime | " + " | ".join(f"AUROC {k}" for k in ood_names) + \
        " | AUROC change (max abs) | decisions changed | ID test flagged |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    labels = np.asarray(fit_set.labels)
    n_test = sum(len(features["torch", k]) for k in tests)
    for method in args.detectors.split(","):
        model = OODModel(torch_backbone, method, alpha=args.alpha, head=None, prediction_sets=None,
                         progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(features["torch", "fit"], labels=labels)
            model.calibrate(features["torch", "cal"])
        reference = None
        rows = [("torch", False), *((name, False) for name in runtimes),
                *((name, True) for name in runtimes if name.endswith("int8"))]
        for name, recalibrated in rows:
            if recalibrated:  # the detector stays; the conformal calibration is redone on this runtime's scores
                model.calibrate(features[name, "cal"])
            preds = {k: model.predict(features[name, k]) for k in tests}
            aurocs = [auroc(preds["id"].scores, preds[k].scores) for k in ood_names]
            decisions = np.concatenate([preds[k].ood for k in tests])
            if reference is None:
                reference = (aurocs, decisions)
                change, changed = "", ""
            else:
                change = f"{max(abs(a - b) for a, b in zip(aurocs, reference[0], strict=True)):.4f}"
                changed = f"{int((decisions != reference[1]).sum())} / {n_test}"
            cells = " | ".join(f"{a:.4f}" for a in aurocs)
            label = f"{name}, recalibrated on it" if recalibrated else name
            print(f"| {method if name == 'torch' else ''} | {label} | {cells} | {change} | {changed} | "
                  f"{preds['id'].ood.mean():.1%} |")
    print()
    print(float64_reference(torch_backbone, backbones, tests["id"]))
    print()
    print(f"total {time.perf_counter() - started:.0f} s")


def float64_reference(torch_backbone, backbones, source, n: int = 64) -> str:
    """Max |difference| of each FP32 runtime's logits and penultimate from the same network in float64:
    how far eager PyTorch FP32 itself is from exact (the noise floor the exported graphs are held to)."""
    import copy

    import torch

    spec = torch_backbone.input_spec
    x = np.concatenate(calibration_batches(source, spec, limit=n))
    exact = copy.deepcopy(torch_backbone)
    exact.model.double()  # the fused FP32 weights, computed in float64
    with torch.no_grad():
        pooled = exact._feature_map(torch.from_numpy(x).double()).mean(dim=(2, 3))
        logits = exact.model._fc(pooled).numpy()
    pooled = pooled.numpy()
    parts = []
    for name, backbone in backbones.items():
        if name.endswith("int8"):
            continue
        f = backbone.encode_images(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        parts.append(f"{name} logits {np.abs(f.logits - logits).max():.2g}, penultimate "
                     f"{np.abs(f.penultimate - pooled).max():.2g}")
    return f"Max |difference| from the network in float64 on {len(x)} ID test images: " + "; ".join(parts)


if __name__ == "__main__":
    main()
