"""``oodscope bench``: every detector on every backbone over an ID set and OOD sets, features extracted once.

Either a configuration file (``--config FILE.toml`` / ``.yaml``; keys are the fields of
:class:`oodscope.evaluation.bench.BenchConfig`) or flags; flags given next to a file override it
(``--ood`` and ``--backbone`` add to its lists). Data are registry names (``--list-datasets``),
the built-ins of ``oodscope extract`` or paths. Writes ``results.{csv,md,json}``, per-detector scores
and ``report.html`` to ``-o DIR``. Exit code 0 when every (backbone, detector) ran, 3 when some
were recorded as not run / failed (see ``failures.csv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oodscope.cli.commands._common import default_cache_dir

EXIT_SOME_FAILED = 3


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmark detectors x backbones on ID vs OOD sets (tables + HTML report)",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML (or YAML, with PyYAML) file with the BenchConfig keys")
    parser.add_argument("--benchmark", help="a registered protocol, e.g. fashion-mnist-ood, openood-v1.5/cifar10, "
                        "clip-zero-shot/imagenet-1k (fills --id, --id-fit, --ood, --classes)")
    parser.add_argument("--backbone", action="append", default=None, metavar="B",
                        help="backbone spec (repeatable), e.g. effnet-lite0, conse:effnet-lite0")
    parser.add_argument("--detectors", help="comma-separated detector names, or 'all' (default)")
    parser.add_argument("--id", dest="id_data", metavar="DATA", help="ID test set")
    parser.add_argument("--id-fit", metavar="DATA", help="ID set the detectors are fitted on")
    parser.add_argument("--ood", action="append", default=None, metavar="[near:|far:]NAME=DATA",
                        help="an OOD set (repeatable), tagged near or far for the averages")
    parser.add_argument("--classes", help="ID class names for zero-shot detectors: comma-separated, or @FILE "
                        "(one per line); default: the ID set's class names")
    parser.add_argument("--limit", type=int, help="at most N images per set, spread evenly through it")
    parser.add_argument("--fit-limit", type=int, help="at most N images in the fit set (default: --limit)")
    parser.add_argument("-o", "--output", type=Path, help="output directory (default bench-results)")
    parser.add_argument("--cache", type=Path,
                        help="feature cache (default $OODSCOPE_CACHE or ~/.cache/oodscope/features)")
    parser.add_argument("--stream", action="store_true", help="score from the cache in batches (flat memory)")
    parser.add_argument("--model-based", action="store_true", help="also run ODIN / GradNorm / RankFeat (slow)")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--list-datasets", action="store_true", help="list registered data sets and benchmarks")
    parser.set_defaults(func=run)


def _classes(text: str) -> list[str]:
    if text.startswith("@"):
        return [line.strip() for line in Path(text[1:]).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [c.strip() for c in text.split(",") if c.strip()]


def build_config(args: argparse.Namespace):
    from oodscope.evaluation.bench import BenchConfig, load_config, parse_ood_flag

    cfg = load_config(args.config) if args.config else BenchConfig(cache_dir=default_cache_dir())
    if args.config and cfg.cache_dir is None:
        cfg.cache_dir = default_cache_dir()
    if args.benchmark:
        cfg.benchmark = args.benchmark
    if args.backbone:
        cfg.backbones = list(cfg.backbones) + [b for b in args.backbone if b not in cfg.backbones]
    if args.detectors:
        cfg.detectors = args.detectors
    if args.id_data:
        cfg.id = args.id_data
    if args.id_fit:
        cfg.id_fit = args.id_fit
    if args.ood:
        cfg.ood = list(cfg.ood) + [parse_ood_flag(o) for o in args.ood]
    if args.classes:
        cfg.classes = _classes(args.classes)
    for flag, field in (("limit", "limit"), ("fit_limit", "fit_limit"), ("device", "device"),
                        ("batch_size", "batch_size"), ("workers", "num_workers"), ("cache", "cache_dir"),
                        ("output", "output")):
        if getattr(args, flag) is not None:
            setattr(cfg, field, getattr(args, flag))
    if args.stream:
        cfg.stream = True
    if args.model_based:
        cfg.model_based = True
    if args.no_report:
        cfg.report = False
    if args.quiet:
        cfg.progress = False
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.list_datasets:
        from oodscope.cli.commands.datasets import print_listing

        print_listing()
        return 0
    from oodscope.evaluation.bench import run_benchmark

    cfg = build_config(args)
    try:
        result = run_benchmark(cfg)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
        print(f"oodscope bench: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.output)
    if cfg.report:
        from oodscope.reports import render_report

        try:
            render_report(out, out / "report.html")
        except Exception as err:  # noqa: BLE001 - the numbers are written; a report problem must not lose them
            print(f"oodscope bench: report.html not written: {type(err).__name__}: {err}", file=sys.stderr)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"results in {out}" + (f" (report: {out / 'report.html'})" if (out / "report.html").is_file() else ""))
    return EXIT_SOME_FAILED if result.failures else 0
