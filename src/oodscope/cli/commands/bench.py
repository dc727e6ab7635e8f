"""``oodscope bench``: every detector on every backbone over an ID set and OOD sets, features extracted once.

Either a configuration file (``--config FILE.toml`` / ``.yaml``; keys are the fields of
:class:`oodscope.evaluation.bench.BenchConfig`) or flags; flags given next to a file override it
(``--ood`` and ``--backbone`` add to its lists, ``--params`` to its detector parameters). The flags
are built from the fields of :class:`~oodscope.evaluation.bench_config.BenchConfig` (their
``metadata``: flag, help, ...), so every key that has a flag is spelled once. Data are registry names
(``--list-datasets``), the built-ins of ``oodscope extract`` or paths. Writes
``results.{csv,md,json}``, per-detector scores and ``report.html`` to ``-o DIR``; a directory an
earlier bench wrote is rewritten (its feature cache is reused), any other non-empty directory is
refused unless ``--overwrite``.

Exit codes: 0 when every (backbone, detector) ran; 3 when some were recorded as not run / failed
(see ``failures.csv``); 2 = bad arguments, refused before any image is read (unknown detector,
parameter, backbone, benchmark or data set name, a missing path, an invalid value, a non-empty
``-o``); 1 = the work failed (a data set or weights not installed here, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from oodscope.cli.commands._common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageError,
    add_max_pixels_option,
    add_overwrite_option,
    check_detector_params,
    check_output,
    checking,
    class_names,
    counted,
    default_cache_dir,
    people,
)
from oodscope.cli.commands._engine import add_engine_options, bench_features_on_ray, check_engine_args, uses_ray

HELP = "benchmark detectors x backbones on ID vs OOD sets (tables + HTML report)"
#: What an earlier ``oodscope bench`` leaves in its output directory (rewritten without --overwrite).
RESULT_MARKERS = ("results.json", "results.md", "scores", "feature-cache", "report.html")


def register(sub) -> None:
    parser = sub.add_parser("bench", help=HELP, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML (or YAML, with PyYAML) file with the BenchConfig keys")
    add_config_options(parser)
    add_overwrite_option(parser, "write the results into a directory that holds other files")
    add_max_pixels_option(parser)
    parser.add_argument("--list-datasets", action="store_true", help="list registered data sets and benchmarks")
    add_engine_options(parser, "feature extraction")  # --engine / --address (issue 13: cli/commands/_engine.py)
    parser.set_defaults(func=run)


def config_fields() -> list[dataclasses.Field]:
    """The fields of BenchConfig that have a command-line flag (``metadata["flag"]``)."""
    from oodscope.evaluation.bench_config import BenchConfig

    return [f for f in dataclasses.fields(BenchConfig) if "flag" in f.metadata]


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field with ``metadata["flag"]``; a flag not given leaves the key alone."""
    from oodscope.evaluation.bench_config import BenchConfig

    hints = typing.get_type_hints(BenchConfig)
    for f in config_fields():
        meta = f.metadata
        flags = (meta["flag"],) if isinstance(meta["flag"], str) else tuple(meta["flag"])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if isinstance(f.default, bool):
            kw.update(action="store_const", const=not f.default)
        else:
            kw["type"] = _converter(f, hints[f.name])
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if meta.get("repeat"):
                kw["action"] = "append"
        parser.add_argument(*flags, **kw)


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.metadata.get("syntax") == "names":
        from oodscope.cli.commands._common import CLASSES_SYNTAX

        text += f"; {CLASSES_SYNTAX}"
    shown = f.default
    if shown is not dataclasses.MISSING and shown is not None and not isinstance(shown, bool) \
            and "default" not in text:
        text += f" (default {shown})"
    return text


def _converter(f: dataclasses.Field, hint: Any):
    syntax = f.metadata.get("syntax")
    if syntax == "names":
        return class_names
    if syntax == "json":
        return _json_table
    if syntax == "ood":
        return _ood_set
    options = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if int in options:
        return counted(f.metadata.get("min", 0))
    if any(o is Path or (isinstance(o, type) and issubclass(o, Path)) or "PathLike" in repr(o) for o in options):
        return Path
    return str


def _json_table(text: str) -> dict[str, dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('expected {"detector": {"parameter": value, ...}, ...}')
    return value


def _ood_set(text: str):
    from oodscope.evaluation.bench_config import parse_ood_flag

    try:
        return parse_ood_flag(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_config(args: argparse.Namespace):
    """The BenchConfig of a command line: the --config file (if any), then the flags given."""
    from oodscope.evaluation.bench_config import BenchConfig, load_config

    if args.config is not None and not args.config.is_file():
        raise UsageError(f"--config {args.config}: no such file")
    cfg = load_config(args.config) if args.config else BenchConfig()
    for f in config_fields():
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("repeat"):
            current = list(getattr(cfg, f.name) or [])
            value = current + [v for v in value if v not in current]
        elif f.metadata.get("syntax") == "json":
            value = {**(getattr(cfg, f.name) or {}), **value}
        setattr(cfg, f.name, value)
    if cfg.cache_dir is None:
        cfg.cache_dir = default_cache_dir()  # the CLI always caches features
    return cfg


def check_config(cfg, overwrite: bool) -> None:
    """What can be checked without reading an image: names, parameters, values, the output directory."""
    from oodscope.detectors import registered

    available = registered()
    for f in config_fields():  # values from a --config file, checked as their flags would be
        value, meta = getattr(cfg, f.name), f.metadata
        flag = meta["flag"] if isinstance(meta["flag"], str) else meta["flag"][-1]
        if "min" in meta and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                     or value < meta["min"]):
            raise UsageError(f"{f.name} ({flag}) must be a whole number >= {meta['min']}, got {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise UsageError(f"{f.name} ({flag}) must be one of {', '.join(meta['choices'])}, got {value!r}")
    if cfg.classes is not None and (isinstance(cfg.classes, str)
                                    or not all(isinstance(c, str) and c for c in cfg.classes)):
        raise UsageError(f"classes must be a list of names, got {cfg.classes!r}")
    selection = cfg.detectors
    lists = selection.values() if isinstance(selection, dict) else [selection]
    for chosen in lists:
        names = [s.strip() for s in chosen.split(",") if s.strip()] if isinstance(chosen, str) else list(chosen)
        unknown = [n for n in names if n != "all" and n not in available]
        if unknown:
            raise UsageError(f"unknown detector(s) {', '.join(map(str, unknown))}; registered: "
                             f"{', '.join(available)} (`oodscope detectors`)")
    for name, params in (cfg.detector_params or {}).items():
        if name not in available:
            raise UsageError(f"detector parameters for {name!r}, which is not a registered detector")
        check_detector_params(name, dict(params))
    if cfg.preset is not None:
        from oodscope.detectors.presets import check_preset

        check_preset(cfg.preset)  # an unknown name: refused with the presets listed (exit 2)
    if cfg.benchmark:
        from oodscope.io.registry import get_benchmark

        get_benchmark(cfg.benchmark)  # an unknown name: KeyError listing the known ones
    check_output(Path(cfg.output), overwrite=overwrite, kind="dir", markers=RESULT_MARKERS, what="the results")


def run(args: argparse.Namespace) -> int:
    if args.list_datasets:
        from oodscope.cli.commands.datasets import print_listing

        print_listing()
        return EXIT_OK
    from oodscope.evaluation.bench import run_benchmark

    with checking():
        cfg = build_config(args)
        check_config(cfg, args.overwrite)
        check_engine_args(args)  # --engine ray: Ray installed, --address well formed (issue 13)
    if uses_ray(args):  # --engine ray (issue 13): every set's features extracted on the cluster into the cache
        bench_features_on_ray(cfg, args)
    try:
        result = run_benchmark(cfg)
    except (ValueError, LookupError) as err:
        # Refused while planning (data specs, backbone specs, detectors per backbone), before any image is
        # read; once extraction runs, a detector's failure is recorded and the run goes on.
        raise UsageError(people(err)) from None
    out = Path(cfg.output)
    if cfg.report:
        from oodscope.reports import render_report

        try:
            render_report(out, out / "report.html")
        except Exception as err:  # noqa: BLE001 - the numbers are written; a report problem must not lose them
            print(f"oodscope bench: report.html not written: {people(err)}", file=sys.stderr)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"results in {out}" + (f" (report: {out / 'report.html'})" if (out / "report.html").is_file() else ""))
    return EXIT_SOME_FAILED if result.failures else EXIT_OK
