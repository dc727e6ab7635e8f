"""The benchmark's files: results.{csv,parquet,json,md}, timings.csv, failures.csv, per-detector scores,
and the environment they were measured in."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodscope.evaluation.tables import METRICS, markdown

FORMAT = "oodscope-bench"
FORMAT_VERSION = 1


def environment(started_at: dt.datetime | None = None) -> dict[str, Any]:
    import oodscope

    env = {
        "date": (started_at or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "numpy": np.__version__, "oodscope": oodscope.__version__,
    }
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    return env


ROW_FIELDS = ("backbone", "detector", "set", "kind", *METRICS, "n_id", "n_ood", "id_accuracy",
              "id_accuracy_source", "fit_s", "score_s", "note")


def write_results(result: Any) -> None:
    """Write every output file of a :class:`~oodscope.evaluation.bench.BenchResult`."""
    out = result.output
    _write_csv(out / "results.csv", ROW_FIELDS, result.rows)
    _write_csv(out / "timings.csv", ("backbone", "stage", "detector", "set", "seconds", "cpu_seconds"), result.timings)
    _write_csv(out / "failures.csv", ("backbone", "detector", "stage", "reason"), result.failures)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        columns = {k: [r.get(k) for r in result.rows] for k in ROW_FIELDS}
        pq.write_table(pa.table(columns), out / "results.parquet")
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": result.config,
        "environment": result.environment, "datasets": result.datasets, "results": result.rows,
        "failures": result.failures, "timings": result.timings, "scores": result.scores,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    (out / "results.md").write_text(markdown(payload))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    return repr(value)


def _write_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
