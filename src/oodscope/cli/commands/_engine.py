"""``--engine local|ray [--address auto|HOST:PORT]`` of ``oodscope extract``, ``score`` and ``bench``
(issue 13): the options, their checks (before any image is read: exit 2, Ray missing included) and
the dispatch to :mod:`oodscope.engines.ray`. Without ``--engine ray`` nothing here runs.

* ``extract --engine ray``: the same ``-o DIR`` (feature store, ``items.jsonl``, ``failures.jsonl``,
  ``summary.json``), computed on the cluster;
* ``score --engine ray -o DIR``: Parquet partitions ``DIR/part-NNNNNN.parquet`` with the columns of
  ``--format csv``; a re-run into DIR resumes (``--chunk-size`` is the partition size; ``--fdr`` and
  ``--format`` are for the local engine; the feature cache is not used);
* ``bench --engine ray``: the features of every set are extracted on the cluster into the bench's feature
  cache, then the benchmark runs here on them (it only reads and hashes the images again).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from oodscope.cli.commands._common import UsageError, check_output, checking, people


def add_engine_options(parser: argparse.ArgumentParser, what: str) -> None:
    from oodscope.engines import ENGINES

    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help=f"where {what} runs: local (this machine; the default) or ray (a Ray cluster through Ray "
                        "Data, same results; pip install 'oodscope[ray]')")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="with --engine ray, the cluster: auto (the one `ray start` runs on this machine) or "
                        "HOST:PORT of its head (default: $RAY_ADDRESS, else a one-machine cluster for this command)")


def uses_ray(args: argparse.Namespace) -> bool:
    return getattr(args, "engine", "local") == "ray"


def check_engine_args(args: argparse.Namespace) -> None:
    """Inside :func:`checking`: a malformed ``--address``, ``--address`` without ``--engine ray`` or Ray not
    installed is a usage error (exit 2)."""
    from oodscope.engines import EngineUnavailable, check_engine

    try:
        check_engine(getattr(args, "engine", "local"), getattr(args, "address", None))
    except EngineUnavailable as err:
        raise UsageError(f"--engine ray: {err}") from None
    except ValueError as err:
        raise UsageError(f"--address: {err}" if "address" in str(err) else str(err)) from None


# ------------------------------------------------------------------------------------------ extract
def extract_on_ray(args: argparse.Namespace, source: Any, description: str):
    from oodscope.engines import ray as ray_engine

    options = {"patches": True} if args.patches else {}
    return ray_engine.extract(args.backbone, source, cache_dir=args.output, backbone_options=options,
                              device=args.device, address=args.address, batch_size=args.batch_size,
                              keep_in_memory=False, description=description)


# ------------------------------------------------------------------------------------------ score
def score_on_ray(args: argparse.Namespace, check) -> int:
    """``oodscope score --engine ray``: same checks as the local command, Parquet partitions in ``-o DIR``."""
    from oodscope.cli.commands._common import EXIT_OK, EXIT_SOME_FAILED, print_failures
    from oodscope.engines import ray as ray_engine

    with checking():
        check_engine_args(args)
        if args.output is None:
            raise UsageError("--engine ray writes Parquet partitions: give -o DIR")
        if args.fdr is not None:
            raise UsageError("--fdr needs every p-value of the run in one place: it is for the local engine; "
                             "apply Benjamini-Hochberg to the p_value column of the partitions")
        if args.format != "table":
            raise UsageError(f"--format {args.format} is for the local engine; --engine ray writes Parquet "
                             "partitions with the columns of --format csv")
        output, args.output = args.output, None
        try:
            source = check(args)  # the model, the images: as the local command checks them
        finally:
            args.output = output
        check_output(output, overwrite=args.overwrite, kind="dir", markers=("_job.json",),
                     what="the output (Parquet partitions)")
        plan = ray_engine.plan_score(args.model, source, output, partition_size=args.chunk_size,
                                     overwrite=args.overwrite, runtime=getattr(args, "runtime", "torch"))
    if not plan.calibrated:
        print(f"oodscope score: note: {args.model} is not calibrated: scores and classes only, the p-value and "
              "decision columns stay empty; decisions need calibration (oodscope fit ... --calibration-dir "
              "ID_IMAGES)", file=sys.stderr)
    run = ray_engine.score(plan=plan, device=args.device, address=args.address, batch_size=args.batch_size)
    n = run.images
    if run.calibrated:
        summary = (f"{run.scored}/{n} image(s) scored; {run.n_ood} flagged OOD at alpha = {run.alpha:g} "
                   "(p-value <= alpha)")
    else:
        summary = f"{run.scored}/{n} image(s) scored; no decisions (the model is not calibrated)"
    print(summary, file=sys.stderr)
    print(f"{len(run.partitions)} Parquet partition(s) in {run.output} ({run.written} written now, {run.skipped} "
          "already there)", file=sys.stderr)
    if run.failures:
        print_failures(run.failures, None, sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------------ bench
def bench_features_on_ray(cfg: Any, args: argparse.Namespace) -> None:
    """Extract every set of the benchmark on the cluster into its feature cache (one job per network)."""
    from oodscope.engines import ray as ray_engine
    from oodscope.evaluation.bench import _plan_backbones, _plan_sets
    from oodscope.io import Concat, Relabel

    with checking():
        check_engine_args(args)
    try:
        sets, _ = _plan_sets(cfg)  # the runner's own planning: the same sets, limits and backbones
        entries = _plan_backbones(cfg)
    except (ValueError, LookupError) as err:
        raise UsageError(people(err)) from None
    sources = [Relabel(s.source, None) for s in sets.values()]
    source = sources[0] if len(sources) == 1 else Concat(sources)
    seen: set[str] = set()
    for item, entry in zip(cfg.backbones, entries, strict=True):
        key = entry.network_key
        if key in seen:
            continue
        seen.add(key)
        spec = item if isinstance(item, str) else entry.network
        options = cfg.backbone_options.get(item, {}) if isinstance(item, str) else {}
        ray_engine.extract(spec, source, cache_dir=cfg.cache_dir, backbone_options=options, device=cfg.device,
                           address=args.address, batch_size=cfg.batch_size, keep_in_memory=False,
                           progress=cfg.progress, description=f"{entry.network.id} all sets")
