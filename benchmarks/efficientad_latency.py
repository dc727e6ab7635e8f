"""EfficientAD on CPU: training time, and per-image latency against the raw EfficientNet-Lite0 forward.

    nice .venv/bin/python benchmarks/efficientad_latency.py [--train-steps 30] [--repeats 10]

1. Training: ``efficientad`` fitted with its default CPU schedule settings (128 px, batch 1) but
   ``--train-steps`` steps on 40 crops of scikit-image's brick texture; prints the fit time, the time
   per step and the time the default schedule (``steps=300``) takes at that rate.
2. Latency at batch 1, 256 px (the paper's setting): one EfficientAD-S forward (teacher + student +
   autoencoder + normalised maps + score) against the plain EfficientNet-Lite0 classifier forward
   at the same size, interleaved (A B A B ...) so that a busy machine slows both alike; the median
   of ``--repeats`` runs each and their ratio.

3. With ``--quality-steps N`` (> 0): ``efficientad`` (128 px, N steps) fitted on
   ``synthetic-ad/<--category>/train`` and scored on its test split: image AUROC, pixel AUROC and AUPRO
   (maps upsampled with :func:`~oodscope.detectors._anomaly.upsample_maps`, sigma 4 px).

The machine's load average is printed with the numbers: on a shared machine the absolute times
move with it, the ratio much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def brick_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    from skimage import data

    img = np.repeat(np.asarray(data.brick())[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y:y + size, x:x + size])
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def quality(category: str, steps: int) -> dict:
    """Image AUROC, pixel AUROC, AUPRO of a ``steps``-step fit on synthetic-ad/<category>."""
    from oodscope.backbones.base import InputSpec
    from oodscope.backbones.preprocess import preprocess
    from oodscope.detectors import create
    from oodscope.detectors._anomaly import upsample_maps
    from oodscope.evaluation.anomaly_metrics import anomaly_metrics
    from oodscope.io import resolve_images

    spec = InputSpec(size=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="stretch")
    train, test = resolve_images(f"synthetic-ad/{category}/train"), resolve_images(f"synthetic-ad/{category}/test")
    batch = lambda src: preprocess([src.load(i) for i in range(len(src))], spec)  # noqa: E731
    det = create("efficientad", steps=steps)
    started = time.perf_counter()
    det.fit(parts=spec, images=batch(train))
    fit_s = time.perf_counter() - started
    scores, grid = det.score_image_maps(spec, batch(test))
    maps = upsample_maps(grid, (128, 128), 4.0)
    masks = [test.mask(i, (128, 128)) for i in range(len(test))]
    metrics = anomaly_metrics(test.labels, scores, masks, list(maps))
    return {"category": category, "steps": steps, "n_train": len(train), "n_test": len(test),
            "fit_seconds": round(fit_s, 1), **{k: (round(v, 4) if isinstance(v, float) else v)
                                               for k, v in metrics.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quality-steps", type=int, default=0)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)

    from oodscope.backbones.efficientnet import EfficientNetLite
    from oodscope.detectors import create

    result: dict = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "load_average_before": os.getloadavg()}
    if args.quality_steps > 0:
        result["quality"] = quality(args.category, args.quality_steps)
        print(json.dumps(result["quality"]))
    if args.skip_latency:
        return 0
    # 1. training
    det = create("efficientad", steps=args.train_steps)
    started = time.perf_counter()
    det.fit(parts=None, images=brick_crops(40, 128))
    fit_s = time.perf_counter() - started
    per_step = det.fit_info_["train_seconds"] / args.train_steps
    result["training"] = {"image_size": det.image_size, "steps": args.train_steps, "fit_seconds": round(fit_s, 1),
                          "seconds_per_step": round(per_step, 3),
                          "default_schedule_steps": 300, "default_schedule_seconds_at_this_rate": round(300 * per_step)}

    # 2. latency at batch 1
    size = args.size
    fast = create("efficientad", image_size=size, steps=1).fit(parts=None, images=brick_crops(2, size))
    lite = EfficientNetLite(0, image_size=size, device="cpu")
    pixels = torch.from_numpy(brick_crops(1, size, seed=1))
    lite_input = (pixels - 0.5) / 0.5
    ead_times, lite_times = [], []
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            fast._score_pixel_maps(pixels)
            lite.forward_logits(lite_input)
        for _ in range(args.repeats):
            t = time.perf_counter()
            fast._score_pixel_maps(pixels)
            ead_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            lite.forward_logits(lite_input)
            lite_times.append(time.perf_counter() - t)
    ead_ms, lite_ms = 1e3 * statistics.median(ead_times), 1e3 * statistics.median(lite_times)
    result["latency"] = {"size": size, "batch": 1, "repeats": args.repeats, "efficientad_ms": round(ead_ms, 1),
                         "lite0_ms": round(lite_ms, 1), "ratio": round(ead_ms / lite_ms, 2)}
    result["load_average_after"] = os.getloadavg()

    tr, lat = result["training"], result["latency"]
    print(f"| measure | value |\n|---|---|\n"
          f"| training, {tr['steps']} steps at {tr['image_size']} px (batch 1) | {tr['fit_seconds']} s "
          f"({tr['seconds_per_step']} s/step) |\n"
          f"| default schedule (300 steps) at that rate | {tr['default_schedule_seconds_at_this_rate']} s |\n"
          f"| EfficientAD-S forward, batch 1, {size} px | {lat['efficientad_ms']} ms |\n"
          f"| EfficientNet-Lite0 forward, batch 1, {size} px | {lat['lite0_ms']} ms |\n"
          f"| ratio EfficientAD / Lite0 | {lat['ratio']} |\n"
          f"\ntorch threads {result['torch_threads']}, cpu count {result['cpu_count']}, load average "
          f"{' '.join(f'{v:.1f}' for v in result['load_average_before'])} -> "
          f"{' '.join(f'{v:.1f}' for v in result['load_average_after'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
