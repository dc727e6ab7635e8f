"""What dense feature maps cost in extraction: speed, cache bytes per image and peak memory.

Run from the repository root (``nice`` on a shared machine)::

    nice python benchmarks/dense_extraction.py            # effnet-lite0 at 224 px, 64 and 256 images
    nice python benchmarks/dense_extraction.py --size 96 --counts 64 512
    nice python benchmarks/dense_extraction.py --memory-only --chunk-mib 8 --counts 64 256   # flat memory

Protocol: N RGB crops (256 x 256) of scikit-image's brick, grass and gravel textures, as an in-memory
``ArrayDataset`` (so file reading is not measured); :func:`oodscope.features.extract.extract` with one
batch size (32), no DataLoader worker (decoding is in the process, the same for both backbones),
a fresh cache directory, ``keep_in_memory=False``. Backbones: ``effnet-lite0@SIZE`` (no dense
maps) and ``effnet-lite0@SIZE?dense`` (stage3 + stage5, float16). Reported: images per second (best
of ``--repeats`` runs, fresh cache each), cache bytes per image (the chunk files), and the peak
traced memory of the run (``tracemalloc``: NumPy's arrays are traced, PyTorch's are not) — which
stays flat in N for the streamed dense maps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def images(n: int, seed: int = 0) -> np.ndarray:
    import skimage.data

    textures = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 256, 256, 3), np.uint8)
    for i in range(n):
        t = textures[i % 3]
        y, x = rng.integers(0, t.shape[0] - 256), rng.integers(0, t.shape[1] - 256)
        out[i] = t[y:y + 256, x:x + 256, None]
    return out


def run(spec: str, pixels: np.ndarray, *, traced: bool, chunk_bytes: int | None = None) -> tuple[float, float, int]:
    """(seconds, cache bytes per image, peak traced bytes) of one streamed extraction into a fresh cache."""
    from oodscope.backbones import create_shared
    from oodscope.features.extract import extract
    from oodscope.io import ArrayDataset

    backbone = create_shared(spec, device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        if traced:
            tracemalloc.start()
        started = time.perf_counter()
        extract(backbone, ArrayDataset(pixels), batch_size=32, num_workers=0, cache_dir=cache, progress=False,
                keep_in_memory=False, **({} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}))
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if traced else 0
        if traced:
            tracemalloc.stop()
        size = sum(p.stat().st_size for p in Path(cache).rglob("chunk-*.safetensors"))
    return seconds, size / len(pixels), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-mib", type=float, default=None,
                        help="cache chunk size in MiB (default: extract's chunk_bytes, 64 MiB)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timed runs")
    args = parser.parse_args()
    chunk = None if args.chunk_mib is None else int(args.chunk_mib * 2**20)
    import torch

    torch.set_num_threads(2)
    specs = [f"effnet-lite0@{args.size}", f"effnet-lite0@{args.size}?dense"]
    run(specs[0], images(8), traced=False)  # load the weights once, outside the measurement
    run(specs[1], images(8), traced=False)
    print("| backbone | images | images/s | cache KiB/image | peak traced MiB |\n|---|---|---|---|---|")
    for n in args.counts:
        pixels = images(n, seed=n)
        for spec in specs:
            rate = "" if args.memory_only else \
                f"{n / min(run(spec, pixels, traced=False, chunk_bytes=chunk)[0] for _ in range(args.repeats)):.1f}"
            _, per_image, peak = run(spec, pixels, traced=True, chunk_bytes=chunk)
            print(f"| `{spec}` | {n} | {rate} | {per_image / 1024:.1f} | {peak / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
