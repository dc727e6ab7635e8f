"""The anomaly part of ``oodscope demo``: PatchCore on one offline category, with its maps.

PatchCore (Roth et al., CVPR 2022) on EfficientNet-Lite0's dense maps is fitted on the 60 good
training crops of ``synthetic-ad/brick`` (scikit-image's brick photograph, built offline) and scores
its 60 test crops (20 good, 40 with synthetic Perlin / scratch / hole / stain defects and their
masks), through the benchmark's anomaly mode (:mod:`oodscope.evaluation.bench_anomaly`): image AUROC,
pixel AUROC, AUPRO, and a gallery of the highest- and lowest-scoring crops with their maps and masks.
About 120 images through the network: 20-40 s on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_ANOMALY_CATEGORY = "synthetic-ad/brick"
DEMO_ANOMALY_DETECTOR = "patchcore"


@dataclass
class AnomalyDemo:
    output: Path  # the anomaly bench's results directory
    table: str  # its results.md
    html: str  # the report section (tables + gallery)


def run_anomaly_demo(output: str | Path, *, cache_dir: str | Path | None = None, backbone: str = "effnet-lite0",
                     limit: int | None = None, gallery: int = 3, progress: bool = True) -> AnomalyDemo:
    """Run the anomaly part into ``output``; ``limit``: at most that many train and test images (tests)."""
    import json

    from oodscope.evaluation.bench import BenchConfig, run_benchmark
    from oodscope.reports.anomaly import anomaly_section

    config = BenchConfig(backbones=[backbone], detectors=[DEMO_ANOMALY_DETECTOR], anomaly=[DEMO_ANOMALY_CATEGORY],
                         limit=limit, output=output, cache_dir=cache_dir, anomaly_gallery=gallery, report=False,
                         progress=progress)
    result = run_benchmark(config)
    payload = json.loads((result.output / "results.json").read_text(encoding="utf-8"))
    html = "\n".join(anomaly_section(result.output, payload, anchor="anomaly-demo")[1:])  # the caller's heading
    return AnomalyDemo(result.output, (result.output / "results.md").read_text(encoding="utf-8"), html)
