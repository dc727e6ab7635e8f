"""End-to-end images/s from image files: eager PyTorch vs ONNX Runtime and OpenVINO, FP32 and INT8.

1. N Fashion-MNIST test images are written as PNG files (an ImageFolder).
2. The backbone's network is exported (``oodscope.backbones.exported.export_network``) for each
   runtime: FP32, and INT8 calibrated on 256 Fashion-MNIST-OOD ID fit images (QDQ; OpenVINO runs the
   same quantised graph).
3. For every runtime, each round times
   - raw forward: the images decoded and preprocessed up front into one tensor, only the forward
     pass timed (batches of ``--batch-size``; torch: ``forward_logits``, exported: the graph), and
   - end-to-end: ``oodscope.features.extract`` on the PNG folder — reading, hashing, decoding,
     resizing in DataLoader workers, forward, every output to NumPy as Features — no cache.
   Runtimes and paths are interleaved for ``--rounds`` rounds and the median of each is used, so
   that background load on the machine affects all of them alike.

Prints images/s, the ratio of each runtime's end-to-end rate to eager PyTorch's, and each runtime's
end-to-end rate over its own raw forward (as ``extract_speed.py`` does). Every runtime uses
``--threads`` intra-op threads (default: torch's, = the cores).

    python benchmarks/export_speed.py --images 512 --rounds 3 --backbone effnet-lite0
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodscope.backbones import create
from oodscope.backbones.exported import ExportedBackbone, calibration_batches, export_network
from oodscope.backbones.preprocess import preprocess
from oodscope.features.extract import extract
from oodscope.io import ImageFolder, Subset, fashion_mnist, resolve_images, write_image_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--backbone", default="effnet-lite0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of every runtime")
    parser.add_argument("--runtimes", default="torch,onnxruntime,openvino,onnxruntime-int8,openvino-int8")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    wanted = args.runtimes.split(",")
    torch_backbone = create(args.backbone, device="cpu")
    data = Subset(fashion_mnist("test"), np.arange(args.images))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_image_folder(data, tmp / "images")
        source = ImageFolder(folder)
        n = len(source)
        backbones: dict[str, object] = {"torch": torch_backbone}
        calibration = None
        export_seconds = {}
        for name in wanted[1:] if wanted[0] == "torch" else wanted:
            runtime, _, precision = name.partition("-")
            int8 = precision == "int8"
            if int8 and calibration is None:
                calibration = calibration_batches(resolve_images("fashion-mnist-ood/id-fit"),
                                                  torch_backbone.input_spec, limit=256)
            t0 = time.perf_counter()
            export_network(torch_backbone, tmp / name, runtime=runtime, int8=int8, calibration=calibration)
            export_seconds[name] = time.perf_counter() - t0
            backbones[name] = ExportedBackbone(tmp / name, threads=threads)

        tensors = preprocess([source.load(i) for i in range(n)], torch_backbone.input_spec)
        arrays = np.ascontiguousarray(tensors.numpy())

        def forward(name: str):
            backbone = backbones[name]
            if name == "torch":
                return lambda batch: backbone.forward_logits(tensors[batch])
            return lambda batch: backbone.forward(arrays[batch])

        for name in backbones:  # warm-up: weights, sessions, first-call allocations
            forward(name)(slice(0, args.batch_size))
            backbones[name].encode_images(tensors[: args.batch_size])

        def raw(name: str) -> float:
            run = forward(name)
            t0 = time.perf_counter()
            for b in range(0, n, args.batch_size):
                run(slice(b, b + args.batch_size))
            return time.perf_counter() - t0

        def end_to_end(name: str) -> float:
            t0 = time.perf_counter()
            result = extract(backbones[name], source, batch_size=args.batch_size, num_workers=args.workers,
                             progress=False)
            seconds = time.perf_counter() - t0
            assert len(result.indices) == n and not result.failures
            return seconds

        runs = {name: {"raw": [], "e2e": []} for name in backbones}
        for _ in range(args.rounds):
            for name in backbones:
                runs[name]["raw"].append(raw(name))
                runs[name]["e2e"].append(end_to_end(name))

    load = os.getloadavg()
    print(f"backbone {torch_backbone.id}, {n} PNG images, batch {args.batch_size}, {threads} intra-op threads "
          f"per runtime, DataLoader workers {args.workers if args.workers is not None else 'default'}, median of "
          f"{args.rounds} interleaved rounds; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average after the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    versions = [f"torch {torch.__version__}"]
    for module in ("onnxruntime", "openvino"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    print(", ".join(versions) + "; export seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in export_seconds.items()))
    torch_e2e = n / float(np.median(runs["torch"]["e2e"])) if "torch" in runs else None
    torch_raw = n / float(np.median(runs["torch"]["raw"])) if "torch" in runs else None
    print()
    print("| runtime | raw forward img/s | end-to-end img/s | end-to-end vs torch eager | same, per round "
          "(median, range) | raw vs torch raw | end-to-end / own raw |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        raw_rate = n / float(np.median(r["raw"]))
        e2e_rate = n / float(np.median(r["e2e"]))
        vs = f"{e2e_rate / torch_e2e:.2f}x" if torch_e2e else "-"
        vs_raw = f"{raw_rate / torch_raw:.2f}x" if torch_raw else "-"
        per_round = "-"
        if "torch" in runs:  # the runs of one round are minutes apart at most: the least load-sensitive ratio
            ratios = np.asarray(runs["torch"]["e2e"]) / np.asarray(r["e2e"])
            per_round = f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"
        label = "torch eager (FP32)" if name == "torch" else name.replace("-int8", " INT8") + (
            "" if name.endswith("int8") else " FP32")
        print(f"| {label} | {raw_rate:.1f} | {e2e_rate:.1f} | **{vs}** | {per_round} | {vs_raw} | "
              f"{e2e_rate / raw_rate:.3f} |")
    print()
    for name, r in runs.items():
        print(f"{name}: raw rounds (s) " + ", ".join(f"{t:.2f}" for t in r["raw"])
              + "; end-to-end rounds (s) " + ", ".join(f"{t:.2f}" for t in r["e2e"]))


if __name__ == "__main__":
    main()
