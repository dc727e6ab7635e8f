"""Speed of ``oodscope serve``: requests/s and p50/p99 latency for 1, 8 and 32 concurrent clients, batched vs
unbatched, and the service's images/s as a ratio of ``OODModel.predict`` / ``oodscope score`` on the same images.

The server is a real ``oodscope serve`` process on a free loopback port (SQLite store, records committed
before each answer); the clients are threads of this process, each with its own HTTP connection, each
request one PNG image (multipart). Counts and durations are bounded. Usage::

    .venv/bin/python benchmarks/serve_speed.py --backbone tiny --requests 96
    .venv/bin/python benchmarks/serve_speed.py --backbone effnet-lite0 --clients 1,8,32 --requests 48

``--backbone tiny``: the TinyCNN of tests/tiny_models.py on digits (the service's own overhead dominates);
``effnet-lite0``: KNN on the packaged EfficientNet-Lite0 over Fashion-MNIST images (the forward pass
dominates). Prints a Markdown table and, with ``--out``, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def build(backbone: str, work: Path, n_images: int) -> tuple[Path, list[bytes], list[str]]:
    """A saved model, PNG bytes of ``n_images`` test images, and extra ``oodscope serve`` arguments."""
    from oodscope.pipeline import OODModel

    if backbone == "tiny":
        from test_serve_fixtures import build_model, digit_images

        model_dir = build_model(work / "model")
        images, _ = digit_images(range(10), n_images // 10 + 1, offset=60)
        return model_dir, [png(x) for x in images[:n_images]], ["--backbone-factory", "tiny_models:tiny_classifier"]
    from oodscope.io import Subset, fashion_mnist_ood

    fm = fashion_mnist_ood("test", per_class=20)
    model = OODModel(backbone, "knn", alpha=0.1, num_workers=0, progress=False)
    model.fit(Subset(fm.id, np.arange(0, len(fm.id), 2)), calibration_fraction=0.5)
    model.save(work / "model")
    pool = [np.asarray(fm.id.load(i)) for i in range(1, len(fm.id), 2)]
    pool += [np.asarray(fm.near_ood.load(i)) for i in range(len(fm.near_ood))]
    return work / "model", [png(pool[i % len(pool)]) for i in range(n_images)], []


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT / "tests") + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    return out


def run_clients(url: str, blobs: list[bytes], clients: int, requests: int, max_seconds: float,
                per_request: int = 1) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    batch_sizes: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.monotonic() + max_seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                parts = [("images", (f"{i}-{k}.png", blobs[(i * per_request + k) % len(blobs)], "image/png"))
                         for k in range(per_request)]
                response = client.post("/v1/score", files=parts)
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        batch_sizes.append(response.json()["batch_images"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)
    return {
        "clients": clients, "requests": len(lat), "statuses": statuses, "seconds": wall,
        "images_per_request": per_request, "requests_per_s": len(lat) / wall if wall else 0.0,
        "images_per_s": len(lat) * per_request / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else None,
    }


def offline_rates(model_dir: Path, blobs: list[bytes], backbone: str, work: Path, with_cli: bool) -> dict:
    """images/s of OODModel.predict (model loaded, no cache) and of the whole `oodscope score` command, on the
    same images (repeated to at least 256)."""
    from oodscope.pipeline import OODModel

    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    copies = max(1, -(-256 // len(blobs)))  # at least 256 images: start-up costs (DataLoader worker) amortised
    for c in range(copies):
        for i, b in enumerate(blobs):
            (folder / f"{c:02d}-{i:05d}.png").write_bytes(b)
    n_images = copies * len(blobs)
    kwargs = {}
    if backbone == "tiny":
        from tiny_models import tiny_classifier

        kwargs["backbone"] = tiny_classifier()
    model = OODModel.load(model_dir, progress=False, **kwargs)
    model.predict(sorted(folder.iterdir())[:8])  # warm-up
    rates = []
    for _ in range(2):  # the better of two runs: a conservative denominator on a shared machine
        started = time.perf_counter()
        model.predict(folder)
        rates.append(n_images / (time.perf_counter() - started))
    out = {"predict_images_per_s": max(rates), "predict_runs": rates}
    if with_cli:
        started = time.perf_counter()
        fresh = env() | {"OODSCOPE_CACHE": str(work / "cli-feature-cache")}  # empty: nothing is read from a cache
        done = subprocess.run([sys.executable, "-m", "oodscope.cli.main", "score", str(model_dir), str(folder),
                               "--format", "csv"], capture_output=True, text=True, env=fresh, timeout=900)
        seconds = time.perf_counter() - started
        out["score_cli_images_per_s"] = n_images / seconds if done.returncode in (0, 3) else None
        out["score_cli_returncode"] = done.returncode
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", choices=("tiny", "effnet-lite0"))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=96, help="requests per configuration")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap per configuration")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=64, help="oodscope serve --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server and of predict")
    parser.add_argument("--fixed-batch", action="store_true", help="oodscope serve --fixed-batch (no adaptive cap)")
    parser.add_argument("--store-sync", default="full", choices=("full", "normal"), help="oodscope serve --store-sync")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from oodscope.serve.testing import ServiceProcess

    clients = [int(c) for c in args.clients.split(",")]
    results = {"backbone": args.backbone, "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="oodscope-serve-bench-") as tmp:
        work = Path(tmp)
        model_dir, blobs, extra = build(args.backbone, work, args.requests * args.images_per_request)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        before = offline_rates(model_dir, blobs, args.backbone, work / "before", with_cli=False)
        for batching in (True, False):
            for n in clients:
                store = work / f"store-{batching}-{n}.db"
                flags = [model_dir, "--store", store, "--log-level", "warning", "--max-wait-ms",
                         str(args.max_wait_ms), "--max-queue", "2048", "--max-batch", str(args.max_batch), *extra]
                if args.threads:
                    flags += ["--threads", str(args.threads)]
                if args.fixed_batch:
                    flags.append("--fixed-batch")
                flags += ["--store-sync", args.store_sync]
                if not batching:
                    flags.append("--no-batching")
                with ServiceProcess(flags, env=env(), log_path=work / "server.log") as server:
                    run_clients(server.url, blobs, min(n, 4), min(8, args.requests), 30)  # warm-up
                    run = run_clients(server.url, blobs, n, args.requests, args.max_seconds, args.images_per_request)
                run.update(batching=batching)
                results["runs"].append(run)
                print(f"batching={batching!s:5} clients={n:3d}: {run['requests_per_s']:7.1f} req/s "
                      f"({run['images_per_s']:.1f} images/s)  "
                      f"p50 {run['p50_ms']:7.1f} ms  p99 {run['p99_ms']:7.1f} ms  mean batch {run['mean_batch']:.1f}  "
                      f"statuses {run['statuses']}", flush=True)
        results.update(offline_rates(model_dir, blobs, args.backbone, work, with_cli=args.backbone != "tiny"))
        results["predict_runs"] = before["predict_runs"] + results["predict_runs"]
        results["predict_images_per_s"] = max(results["predict_runs"])
        results.update(max_batch=args.max_batch, threads=args.threads, max_wait_ms=args.max_wait_ms,
                       adaptive_batch=not args.fixed_batch, store_sync=args.store_sync,
                       images_per_request=args.images_per_request)
    best = max(r["images_per_s"] for r in results["runs"] if r["batching"])
    results["service_images_per_s"] = best
    results["ratio_to_predict"] = best / results["predict_images_per_s"]
    if results.get("score_cli_images_per_s"):
        results["ratio_to_score_cli"] = best / results["score_cli_images_per_s"]
    print()
    print("| backbone | images/request | batching | clients | requests/s | images/s | p50 ms | p99 ms | images/pass |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(f"| {args.backbone} | {r['images_per_request']} | {'yes' if r['batching'] else 'no'} | {r['clients']} | "
              f"{r['requests_per_s']:.1f} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['mean_batch']:.1f} |")
    print()
    runs = ", ".join(f"{r:.1f}" for r in results["predict_runs"])
    print(f"OODModel.predict: {results['predict_images_per_s']:.1f} images/s (best of {runs}, before and after the "
          f"service runs); service (best batched): {best:.1f} "
          f"images/s; ratio {results['ratio_to_predict']:.2f}")
    if results.get("score_cli_images_per_s"):
        print(f"oodscope score (whole command): {results['score_cli_images_per_s']:.1f} images/s; ratio "
              f"{results['ratio_to_score_cli']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
