"""``oodscope score MODEL_DIR IMAGES_OR_DIRS...``: OOD decisions for images, streamed as they are scored.

Each image gets a row: item (path), score (higher = more OOD), conformal p-value, OOD decision at
the model's alpha (p-value <= alpha), predicted ID class and its probability, prediction set (empty
when flagged OOD) and, for images that could not be read, the error. Rows are written chunk by
chunk (``--chunk-size``). With ``--fdr Q`` the Benjamini-Hochberg decision over all images of the
run is added (column ``ood_fdr``); since it needs every p-value, rows are then written at the end.
A model that is not calibrated (zero-shot, fitted from class names alone) gives scores and classes:
the p-value and decision columns are empty, one line on stderr says so, and ``--fdr`` is refused.

With ``--maps DIR`` (image anomaly methods) each image's anomaly map is also written, as a float16
``.npy`` at the image's resolution and a PNG heat-map overlay (:mod:`oodscope.cli.commands._maps`).

Formats: ``table`` (aligned text), ``csv`` (header row; booleans ``true``/``false``, empty = none,
prediction set joined with ``|``), ``jsonl`` (one JSON object per line; ``prediction_set`` a list).

Exit codes: 0 = every image was scored; 3 = some images could not be read (they are rows with an
``error``; every other image is scored; a missing file inside a list file is such a row); 2 = bad
arguments, nothing scored (MODEL_DIR is not a model, a path given is not there, ``--fdr`` on an
uncalibrated model, ``-o`` exists without ``--overwrite``); 1 = nothing scored, the model could not
be loaded here (another backbone or other weights). Flagged images do not change the exit code.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from oodscope.backbones.base import RUNTIMES
from oodscope.cli.commands._common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageError,
    add_backbone_options,
    add_max_pixels_option,
    add_overwrite_option,
    check_output,
    checking,
    counted,
    default_cache_dir,
    level,
    print_failures,
)
from oodscope.cli.commands._engine import add_engine_options, check_engine_args, score_on_ray, uses_ray
from oodscope.cli.commands._maps import add_maps_option, check_maps_args, predictions_writing_maps

HELP = "score images with a fitted model: p-values, OOD decisions, ID class, prediction sets"
CSV_SET_SEPARATOR = "|"


def register(sub) -> None:
    parser = sub.add_parser(
        "score", help=HELP,
        description="Score images with a model written by `oodscope fit`. Exit codes: 0 all images scored, "
        "1 failed (model not loadable here), 2 bad arguments, 3 some images could not be read (rows with an "
        "error).",
    )
    parser.add_argument("model", type=Path, help="model directory written by `oodscope fit`")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or .txt/.csv lists")
    parser.add_argument("--format", choices=["table", "csv", "jsonl"], default="table", help="output format")
    parser.add_argument("--fdr", type=level, default=None, metavar="Q",
                        help="also flag with Benjamini-Hochberg at FDR level Q in (0, 1) over all images (column "
                        "ood_fdr); needs a calibrated model")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write rows to this file (default stdout)")
    add_overwrite_option(parser, "the file is replaced")
    parser.add_argument("--chunk-size", type=counted(1), default=256, help="images per streamed chunk (default 256)")
    parser.add_argument("--no-cache", action="store_true", help="do not use the feature cache ($OODSCOPE_CACHE)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="run the network on torch (default) or on the model's export (oodscope export)")
    add_backbone_options(parser)
    add_max_pixels_option(parser)
    add_engine_options(parser, "scoring")  # --engine / --address (issue 13: cli/commands/_engine.py)
    add_maps_option(parser)  # --maps DIR (issue 11: cli/commands/_maps.py)
    parser.set_defaults(func=run)


def _fmt_float(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


class _Writer:
    def __init__(self, out: TextIO, with_fdr: bool) -> None:
        self.out = out
        self.with_fdr = with_fdr

    def start(self) -> None:
        pass

    def write(self, rows: list[dict[str, Any]]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def flush(self) -> None:
        self.out.flush()


class _JsonlWriter(_Writer):
    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.out.write(json.dumps(row) + "\n")


class _CsvWriter(_Writer):
    def start(self) -> None:
        fields = ["item", "score", "p_value", "ood"] + (["ood_fdr"] if self.with_fdr else []) + [
            "predicted_class", "class_probability", "prediction_set", "error"]
        self.fields = fields
        self.writer = csv.writer(self.out, lineterminator="\n")
        self.writer.writerow(fields)

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            values = []
            for key in self.fields:
                v = row.get(key)
                if isinstance(v, bool):
                    values.append("true" if v else "false")
                elif isinstance(v, float):
                    values.append(_fmt_float(v))
                elif isinstance(v, list):
                    values.append(CSV_SET_SEPARATOR.join(v))
                else:
                    values.append("" if v is None else str(v))
            self.writer.writerow(values)


class _TableWriter(_Writer):
    def start(self) -> None:
        bh = f"{'BH':<4} " if self.with_fdr else ""
        self.out.write(f"{'decision':<8} {bh}{'score':>11} {'p-value':>8} {'class':<16} {'prob':>5} "
                       f"{'prediction set':<24} item\n")

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["error"] is not None:
                bh = f"{'':<4} " if self.with_fdr else ""
                self.out.write(f"{'ERROR':<8} {bh}{'':>11} {'':>8} {'':<16} {'':>5} {'':<24} {row['item']}  "
                               f"({row['error']})\n")
                continue
            decision = "" if row["ood"] is None else ("OOD" if row["ood"] else "ID")
            bh = f"{('OOD' if row['ood_fdr'] else 'ID'):<4} " if self.with_fdr else ""
            cls = _clip(row["predicted_class"] or "-", 16)
            prob = "" if row["class_probability"] is None else f"{row['class_probability']:.2f}"
            p_value = "" if row["p_value"] is None else f"{row['p_value']:.4f}"
            members = row["prediction_set"]
            shown = "-" if members is None else "{" + ", ".join(members) + "}"
            self.out.write(f"{decision:<8} {bh}{row['score']:>11.5g} {p_value:>8} {cls:<16} {prob:>5} "
                           f"{_clip(shown, 24):<24} {row['item']}\n")


WRITERS = {"table": _TableWriter, "csv": _CsvWriter, "jsonl": _JsonlWriter}


def run(args: argparse.Namespace) -> int:
    from oodscope.pipeline import OODModel, Predictions

    if uses_ray(args):  # --engine ray (issue 13): Parquet partitions in -o DIR, computed on a Ray cluster
        return score_on_ray(args, check)
    with checking():
        check_engine_args(args)  # --address without --engine ray is refused (issue 13)
        source = check(args)
    model = OODModel.load(args.model, runtime=args.runtime, device=args.device,
                          cache_dir=None if args.no_cache else default_cache_dir(),
                          batch_size=args.batch_size, num_workers=args.num_workers)
    calibrated = model.is_calibrated
    if not calibrated:
        print(f"oodscope score: note: {args.model} is not calibrated: scores and classes only, the p-value and "
              "decision columns stay empty; decisions need calibration (oodscope fit ... --calibration-dir "
              "ID_IMAGES)", file=sys.stderr)
    stream = model.predict_iter(source, chunk_size=args.chunk_size, require_calibration=False) if args.maps is None \
        else predictions_writing_maps(model, source, args.chunk_size, args.maps)
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout  # noqa: SIM115
    writer = WRITERS[args.format](out, with_fdr=args.fdr is not None)
    n = n_ood = 0
    failures: list[tuple[str, str]] = []
    try:
        writer.start()
        kept: list[Predictions] = []
        for part in stream:
            if args.fdr is not None:
                kept.append(part)  # BH needs every p-value of the run
            else:
                writer.write(part.to_dicts())
                writer.flush()
            n += len(part)
            n_ood += int(part.ood[part.ok].sum())
            failures.extend(part.failures)
        n_bh = None
        if args.fdr is not None and kept:
            everything = Predictions.concatenate(kept).with_fdr(args.fdr)
            n_bh = int(everything.ood_fdr.sum())
            writer.write(everything.to_dicts())
            writer.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    scored = n - len(failures)
    if calibrated:
        summary = f"{scored}/{n} image(s) scored; {n_ood} flagged OOD at alpha = {model.alpha:g} (p-value <= alpha)"
    else:
        summary = f"{scored}/{n} image(s) scored; no decisions (the model is not calibrated)"
    if n_bh is not None:
        summary += f"; {n_bh} flagged by Benjamini-Hochberg at FDR {args.fdr:g}"
    print(summary, file=sys.stderr)
    if failures:
        print_failures(failures, None, sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def check(args: argparse.Namespace) -> Any:
    """The images to score, once the arguments are checked (the model's ``model.json`` alone is read)."""
    from oodscope.io.registry import known_name
    from oodscope.pipeline import as_image_source
    from oodscope.pipeline.persistence import read_config

    if not args.model.is_dir():
        raise UsageError(f"{args.model}: no such model directory (write one with `oodscope fit`)")
    config = read_config(args.model)
    check_maps_args(args, config)
    calibrated = bool(config.get("threshold")) and bool(config.get("calibration"))
    if args.fdr is not None and not calibrated:
        raise UsageError(f"--fdr needs p-values, and {args.model} is not calibrated (it gives scores only); "
                         "calibrate it: oodscope fit ... --calibration-dir ID_IMAGES")
    if args.output is not None:
        check_output(args.output, overwrite=args.overwrite, kind="file")
    for item in args.images:
        if not Path(item).expanduser().exists() and not known_name(item):
            raise UsageError(f"{item}: no such file or directory (nor a registered data set name)")
    return as_image_source(args.images, missing_ok=True)  # a missing file inside a list file is an error row
