"""PatchCore on CPU: fit time and memory against the number of training images, scoring speed, the
detector's cost relative to feature extraction, and image AUROC of the coreset against the full bank.

Data: the conformal-clip-data simulated textiles through the registry (offline):
``textiles-ad/train`` (the even-numbered nominal images; the first N are used) and a seeded sample of
``textiles-ad/test`` (odd-numbered nominal images against local and global defects). Backbone: the
packaged EfficientNet-Lite0 at 224 px, dense maps ``stage3`` (40 ch, 28 x 28, stride 8) + ``stage5``
(112 ch, 14 x 14, stride 16), the analogue of the paper's WideResNet-50 layer2 + layer3. Images are
decoded once up front; the times below are the network's forward pass (feature extraction) and the
detector's fit / score on the features it produced.

Each measured fit runs in a fresh process (``--child``) that loads the features from .npy files, so
memory is measured without the allocator's reuse of earlier runs, two ways: the peak resident set
size above the level before ``fit`` (a thread samples /proc/self/statm every 2 ms) and tracemalloc's
peak (numpy allocations: the coreset selection). Both are compared with the bank and with the full
(N * 784, 152) float32 patch matrix that an unstreamed selection would hold.

    nice -n 10 .venv/bin/python benchmarks/patchcore_scale.py            # the docs' numbers
    nice -n 10 .venv/bin/python benchmarks/patchcore_scale.py --sizes 20 40 --auroc-train 20   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from oodscope.backbones.base import Features
from oodscope.backbones.efficientnet import EfficientNetLite
from oodscope.backbones.preprocess import preprocess
from oodscope.detectors import create
from oodscope.evaluation.metrics import auroc
from oodscope.io import resolve_images

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def above(self) -> int:
        return self.peak - self.base


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def extract(backbone: EfficientNetLite, images: list, batch: int) -> tuple[Features, float]:
    """Features of ``images`` and the seconds spent in the network."""
    parts, seconds = [], 0.0
    for s in range(0, len(images), batch):
        x = preprocess(images[s : s + batch], backbone.input_spec)
        t0 = time.perf_counter()
        parts.append(backbone.encode_images(x))
        seconds += time.perf_counter() - t0
    return Features.concatenate(parts), seconds


def fit_measured(params: dict, train: Features) -> tuple[object, float, PeakRSS, int]:
    det = create("patchcore", **params)
    tracemalloc.start()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        det.fit(train)
        seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return det, seconds, mem, traced


def save_features(f: Features, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, v in f.dense.items():
        np.save(folder / f"{name}.npy", v)


def load_features(folder: Path) -> Features:
    dense = {p.stem: np.load(p, allow_pickle=False) for p in sorted(folder.glob("*.npy"))}
    n = len(next(iter(dense.values())))
    return Features(embedding=np.zeros((n, 1), np.float32), dense=dense)


def child(work: Path, n: int, params: dict, threads: int) -> None:
    """One measured fit + scoring in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(threads)
    train = load_features(work / "train").subset(np.arange(n))
    test = load_features(work / "test")
    # warm up on one image: torch's thread pools and kernels, FAISS — first-use costs, not the fit's
    create("patchcore", **{**params, "coreset_ratio": 0.5}).fit(train.subset([0])).score(test.subset([0]))
    det, fit_s, mem, traced = fit_measured(params, train)
    t0 = time.perf_counter()
    scores = det.score(test)
    score_s = (time.perf_counter() - t0) / len(test)
    print(json.dumps({"fit_s": fit_s, "rss_above": mem.above, "traced": traced, "score_s": score_s,
                      "scores": scores.tolist(), "info": det.fit_info_}))


def run_child(work: Path, n: int, params: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(work), str(n), json.dumps(params), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--test-good", type=int, default=60)
    ap.add_argument("--test-defects", type=int, default=60, help="local and global together")
    ap.add_argument("--auroc-train", type=int, default=50, help="training images of the coreset vs full bank run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child", nargs=3, metavar=("DIR", "N", "PARAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), json.loads(args.child[2]), args.threads)
        return
    torch.set_num_threads(args.threads)

    train_src, test_src = resolve_images("textiles-ad/train"), resolve_images("textiles-ad/test")
    rng = np.random.default_rng(0)
    good = rng.choice(np.flatnonzero(test_src.labels == 0), args.test_good, replace=False)
    bad = rng.choice(np.flatnonzero(test_src.labels == 1), args.test_defects, replace=False)
    test_rows = np.concatenate([good, bad])
    types = np.array([test_src.defect_types[i] for i in test_rows])
    t0 = time.perf_counter()
    train_imgs = [train_src.load(i) for i in range(max(args.sizes + [args.auroc_train]))]
    test_imgs = [test_src.load(int(i)) for i in test_rows]
    print(f"decoded {len(train_imgs) + len(test_imgs)} textile images in {time.perf_counter() - t0:.1f} s; test: "
          f"{args.test_good} good, {(types == 'local').sum()} local, {(types == 'global').sum()} global defects")

    backbone = EfficientNetLite(0, dense_layers=True, device="cpu")
    extract(backbone, train_imgs[:2], args.batch)  # load the weights, warm up
    train_all, train_s = extract(backbone, train_imgs, args.batch)
    test, test_s = extract(backbone, test_imgs, args.batch)
    per_image_extract = (train_s + test_s) / (len(train_imgs) + len(test_imgs))
    shapes = {k: v.shape[1:] for k, v in test.dense.items()}
    print(f"EfficientNet-Lite0 @224 dense {shapes}: {1 / per_image_extract:.1f} images/s "
          f"({1000 * per_image_extract:.1f} ms/image, {args.threads} threads)")

    def auc(scores: list) -> tuple[float, float, float]:
        s = np.asarray(scores)
        ok = types == "good"
        return (auroc(s[ok], s[~ok]), auroc(s[ok], s[types == "local"]), auroc(s[ok], s[types == "global"]))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_features(train_all, work / "train")
        save_features(test, work / "test")

        # ---- fit and score against the number of training images (10 % bank, streamed)
        print("\n| train images | patches | bank | fit s | fit peak RSS above start MiB | tracemalloc peak MiB "
              "| bank MiB | full patch matrix MiB | score images/s | detector / extraction | image AUROC |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in args.sizes:
            r = run_child(work, n, {}, args.threads)
            info = r["info"]
            full = info["train_patches"] * info["dim"] * 4
            bank = info["bank_size"] * info["dim"] * 4
            print(f"| {n} | {info['train_patches']} | {info['bank_size']} | {r['fit_s']:.1f} | {mib(r['rss_above'])} "
                  f"| {mib(r['traced'])} | {mib(bank)} | {mib(full)} | {1 / r['score_s']:.1f} "
                  f"| {r['score_s'] / per_image_extract:.2f} | {auc(r['scores'])[0]:.3f} |", flush=True)

        # ---- coreset against the full bank
        n = args.auroc_train
        print(f"\n{n} training images; image AUROC good vs defects (all / local / global):\n")
        print("| bank | size | fit s | score images/s | detector / extraction | AUROC all | local | global "
              "| certified ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, params in (("full (100 %)", {"coreset_ratio": 1.0}),
                              ("10 % streamed", {}), ("10 % exact greedy", {"coreset": "exact"}),
                              ("1 % streamed", {"coreset_ratio": 0.01}),
                              ("10 % streamed, FAISS IVF", {"index": "approximate"})):
            r = run_child(work, n, params, args.threads)
            a = auc(r["scores"])
            ratio = r["info"]["coreset"].get("approximation_ratio")
            print(f"| {label} | {r['info']['bank_size']} | {r['fit_s']:.1f} | {1 / r['score_s']:.1f} "
                  f"| {r['score_s'] / per_image_extract:.2f} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} "
                  f"| {'-' if ratio is None else f'{ratio:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
