"""Ray engine throughput vs the local engine on the same images, and the per-image costs behind docs/scale.md.

1. The first N Fashion-MNIST test images are written as PNG files (one flat folder: real reads and
   PNG decodes, as for a bucket of files).
2. **Stage costs**, one process, one torch thread, on a sample of the images: read + content hash,
   decode + resize, the network's forward pass (batches of 64) and KNN scoring of features — the
   per-image numbers the capacity plan is computed from; and hash + decode + resize of JPEG photos of
   0.27, 2.5 and 10.7 megapixels (Fashion-MNIST's 28x28 PNGs cost almost nothing to decode).
3. **Extraction throughput**, each run into a fresh feature store, wall time from call to result:
   ``local`` (``oodscope.features.extract.extract``: DataLoader workers + 2 torch threads; ``local-1t`` the
   same with 1 torch thread, as each Ray actor runs) and
   ``ray-1`` / ``ray-2`` (``oodscope.engines.ray.extract`` with 1 or 2 forward actors) on a local Ray
   cluster of 2 CPUs on 127.0.0.1 (``ray.init(address="local", num_cpus=2)``; started once, its start
   timed apart, stopped at the end). ``ray-1``: one actor (1 CPU) + decode tasks (1 CPU); ``ray-2``:
   two actors of 0.5 CPU each + decode tasks (1 CPU): on 2 cores the processes share them.
   Every engine also runs a 64-image job: its wall time is the **fixed cost of a job** (start-up, actors
   created, model loaded), and ``(wall(N) - wall(64)) / (N - 64)`` the **marginal cost per image**.
4. **Ray's overhead per image**: the same runs with a near-free network (one 3x3 convolution at 32 px,
   sent to the actors as an object): what is left is reading, decoding and the engine; the overhead is
   Ray's marginal cost per image minus the local engine's, plus the difference in fixed cost per job.

Prints one table per backbone and the ratios ray-1 / local, ray-2 / local, ray-2 / ray-1.

    python benchmarks/ray_scale.py --images 10000 --backbone effnet-lite0@96
    python benchmarks/ray_scale.py --images 1000 --backbone effnet-lite0 --skip-overhead
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the cluster listens on 127.0.0.1 only

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oodscope.backbones import InputSpec, create  # noqa: E402
from oodscope.backbones.preprocess import normalize_batch, prepare_pixels  # noqa: E402
from oodscope.features.extract import content_hash  # noqa: E402
from oodscope.features.extract import extract as local_extract  # noqa: E402
from oodscope.io import FlatFolder, Subset, fashion_mnist  # noqa: E402


class Conv32(torch.nn.Module):
    """A near-free network: one 3x3 convolution, global pooling, a linear head (32 px inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def near_free_backbone():
    from oodscope.backbones import TorchClassifier

    torch.manual_seed(0)
    return TorchClassifier(Conv32(), "fc", input_spec=InputSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3),
                           id="conv32", device="cpu")


def write_pngs(n: int, folder: Path) -> FlatFolder:
    from PIL import Image

    data = Subset(fashion_mnist("test"), np.arange(n))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.asarray(data.load(i))).save(folder / f"{i:05d}.png")
    return FlatFolder(folder)


def stage_costs(backbone, source, sample: int, batch: int = 64) -> dict[str, float]:
    """Milliseconds per image of each stage, one process, one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idx = np.arange(min(sample, len(source)))
        t0 = time.perf_counter()
        raws = [source.read(int(i)) for i in idx]
        for raw in raws:
            content_hash(raw)
        t1 = time.perf_counter()
        pixels = np.stack([prepare_pixels(source.decode(int(i), raw), backbone.input_spec)
                           for i, raw in zip(idx, raws, strict=True)])
        t2 = time.perf_counter()
        backbone.encode_images(normalize_batch(pixels[:batch], backbone.input_spec))  # warm-up
        t3 = time.perf_counter()
        feats = [backbone.encode_images(normalize_batch(pixels[b:b + batch], backbone.input_spec))
                 for b in range(0, len(pixels), batch)]
        t4 = time.perf_counter()
        from oodscope import detectors
        from oodscope.backbones.base import Features

        everything = Features.concatenate(feats)
        knn = detectors.create("knn").fit(everything.subset(slice(0, len(everything) // 2)))
        t5 = time.perf_counter()
        knn.score(everything.subset(slice(len(everything) // 2, None)))
        t6 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    n = len(idx)
    return {"read+hash": 1e3 * (t1 - t0) / n, "decode+resize": 1e3 * (t2 - t1) / n,
            "forward": 1e3 * (t4 - t3) / n, "knn score": 1e3 * (t6 - t5) / (n - n // 2)}


def photo_costs(spec: InputSpec, repeats: int = 40) -> dict[str, float]:
    """Milliseconds to read, decode and resize one JPEG photo (one core): scikit-learn's two sample photos
    (640x427) and the same photos enlarged to 1920x1280 and 4000x2667 (saved at JPEG quality 90)."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from oodscope.io.images import decode_image

    out = {}
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for label, size in (("0.27 MP", None), ("2.5 MP", (1920, 1280)), ("10.7 MP", (4000, 2667))):
        blobs = []
        for photo in photos:
            buffer = io.BytesIO()
            (photo if size is None else photo.resize(size, Image.BICUBIC)).save(buffer, "JPEG", quality=90)
            blobs.append(buffer.getvalue())
        t0 = time.perf_counter()
        for r in range(repeats):
            raw = blobs[r % len(blobs)]
            content_hash(raw)
            prepare_pixels(decode_image(raw, path="photo.jpg"), spec)
        out[f"{label} JPEG ({len(blobs[0]) // 1024} KB)"] = 1e3 * (time.perf_counter() - t0) / repeats
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(label: str, backbone, spec, source, folder: Path, rounds: int, batch: int,
               small: int = 64) -> dict[str, dict[str, float]]:
    """Per engine: median wall seconds of a job over every image (``wall``) and over the first ``small``
    images (``fixed``: start-up, actors and model loading included), each into a fresh feature store."""
    from oodscope.engines import ray as ray_engine

    first = Subset(source, np.arange(min(small, len(source))))
    names = ("local", "local-1t", "ray-1", "ray-2")
    walls: dict[str, dict[str, list[float]]] = {n: {"wall": [], "fixed": []} for n in names}
    for r in range(rounds):  # interleaved, so that background load hits every engine alike
        for name, kinds in walls.items():
            for kind, data in (("fixed", first), ("wall", source)):
                cache = folder / f"cache-{label}-{name}-{kind}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                if name.startswith("local"):
                    threads = torch.get_num_threads()
                    if name == "local-1t":  # the local engine with the actors' torch setting: one thread
                        torch.set_num_threads(1)
                    try:
                        wall = timed(lambda c=cache, d=data: local_extract(backbone, d, cache_dir=c, batch_size=batch,
                                                                           progress=False, keep_in_memory=False))
                    finally:
                        torch.set_num_threads(threads)
                else:
                    actors = int(name[-1])
                    wall = timed(lambda c=cache, d=data, a=actors: ray_engine.extract(
                        spec, d, cache_dir=c, batch_size=batch, num_actors=a, actor_cpus=1.0 / a, task_cpus=1.0,
                        progress=False, keep_in_memory=False))
                kinds[kind].append(wall)
                shutil.rmtree(cache, ignore_errors=True)
                print(f"  {label} {name} {len(data)} images, round {r + 1}: {wall:.1f} s "
                      f"({len(data) / wall:.1f} img/s)", flush=True)
    return {name: {k: statistics.median(v) for k, v in kinds.items()} | {"small": len(first)}
            for name, kinds in walls.items()}


def report(label: str, n: int, walls: dict[str, dict[str, float]]) -> dict[str, float]:
    """The table; returns the marginal milliseconds per image of each engine."""
    print(f"\n{label}, {n} images (median wall seconds)")
    print("| engine | wall s | img/s | job of 64 images, s | marginal ms/img |")
    print("|---|---|---|---|---|")
    marginal = {}
    for name, w in walls.items():
        marginal[name] = 1e3 * (w["wall"] - w["fixed"]) / max(n - w["small"], 1)
        print(f"| {name} | {w['wall']:.1f} | {n / w['wall']:.1f} | {w['fixed']:.1f} | {marginal[name]:.2f} |")
    for base in ("local", "local-1t"):
        local = walls[base]["wall"]
        print(f"ratios (throughput): ray-1/{base} {local / walls['ray-1']['wall']:.2f}, ray-2/{base} "
              f"{local / walls['ray-2']['wall']:.2f}")
    print(f"ratio (throughput): ray-2/ray-1 {walls['ray-1']['wall'] / walls['ray-2']['wall']:.2f}")
    return marginal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--backbone", default="effnet-lite0@96")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sample", type=int, default=512, help="images for the stage costs")
    parser.add_argument("--skip-overhead", action="store_true", help="no near-free-network runs")
    args = parser.parse_args()

    import ray

    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors.*")  # the 64-image jobs
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = write_pngs(args.images, folder / "images")
        backbone = create(args.backbone, device="cpu")
        costs = stage_costs(backbone, source, args.sample, args.batch_size)
        print(f"stage costs, {args.backbone}, ms per image on one core: "
              + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()), flush=True)
        print(f"hash + decode + resize to {backbone.input_spec.size} px of photos, ms on one core: "
              + ", ".join(f"{k} {v:.1f}" for k, v in photo_costs(backbone.input_spec).items()), flush=True)
        started = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
                 _node_ip_address="127.0.0.1")
        print(f"cluster start: {time.perf_counter() - started:.1f} s", flush=True)
        try:
            from oodscope.engines import ray as ray_engine

            warm = Subset(source, np.arange(64))
            ray_engine.extract(args.backbone, warm, cache_dir=folder / "warm", progress=False)  # worker imports
            walls = throughput(args.backbone, backbone, args.backbone, source, folder, args.rounds, args.batch_size)
            report(args.backbone, len(source), walls)
            if not args.skip_overhead:
                tiny = near_free_backbone()
                tiny_costs = stage_costs(tiny, source, args.sample, args.batch_size)
                print("stage costs, near-free network (32 px), ms per image: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in tiny_costs.items()), flush=True)
                walls = throughput("conv32", tiny, tiny, source, folder, args.rounds, args.batch_size)
                marginal = report("near-free network (32 px)", len(source), walls)
                for name in ("ray-1", "ray-2"):
                    for base in ("local", "local-1t"):
                        print(f"Ray overhead, {name} vs {base}: {marginal[name] - marginal[base]:.2f} ms per image "
                              f"(marginal, near-free network) + {walls[name]['fixed'] - walls[base]['fixed']:.1f} s "
                              "per job")
        finally:
            ray.shutdown()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
