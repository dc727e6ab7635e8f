"""The local engine's batch job: the Parquet partitions of :mod:`oodscope.engines.jobs`, written by this
process (the same files, resume and columns as the Ray engine's ``score``, without a cluster)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from oodscope.engines.jobs import (
    DEFAULT_PARTITION_SIZE,
    ScorePlan,
    ScoreRun,
    done_partitions,
    finish_score,
    part_name,
    partition_bounds,
    plan_score,
    write_job,
    write_score_partition,
)


def score(
    model_dir: str | os.PathLike | None = None,
    images: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    plan: ScorePlan | None = None,
    backbone: Any = None,
    device: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    runtime: str = "torch",
) -> ScoreRun:
    """Score images with a saved model into ``out_dir/part-NNNNNN.parquet`` here (see
    :func:`oodscope.engines.ray.score` for the files and the resume rule)."""
    from tqdm.auto import tqdm

    from oodscope.io import Subset
    from oodscope.pipeline import OODModel, Predictions

    started = time.perf_counter()
    if plan is None:
        if model_dir is None or images is None or out_dir is None:
            raise ValueError("score needs model_dir, images and out_dir (or a plan from plan_score)")
        plan = plan_score(model_dir, images, out_dir, partition_size=partition_size, overwrite=overwrite,
                          runtime=runtime)
    model = OODModel.load(plan.model_dir, backbone=backbone, device=device, cache_dir=cache_dir,
                          batch_size=batch_size, num_workers=num_workers, progress=False, runtime=plan.runtime)
    write_job(plan.out, plan.job)
    bounds = partition_bounds(plan.job.images, plan.job.partition_size)
    done = done_partitions(plan.out, ".parquet", len(bounds))
    pending = [k for k in range(len(bounds)) if k not in done]
    with tqdm(total=plan.job.images, initial=sum(bounds[k][1] - bounds[k][0] for k in done), unit="img",
              desc="score", disable=not progress, dynamic_ncols=True) as bar:
        for k in pending:
            start, stop = bounds[k]
            part = Subset(plan.source, np.arange(start, stop))
            chunks = model.predict_iter(part, chunk_size=stop - start, progress=False, require_calibration=False)
            write_score_partition(plan.out / part_name(k, ".parquet"), Predictions.concatenate(list(chunks)).to_dicts())
            bar.update(stop - start)
    return finish_score(plan, model, written=len(pending), skipped=len(done), started=started)
