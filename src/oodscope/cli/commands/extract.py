"""``oodscope extract BACKBONE DATA -o DIR``: features for every image, with a progress bar.

DATA is a data spec of :func:`oodscope.io.resolve_images`: a folder, a ``.txt`` / ``.csv`` list
file, an image file, or a registered data set name (``fashion-mnist/test``, ``textiles/local``,
``digits``; ``oodscope datasets list``). DIR is a feature store (resumable: re-running into the same
DIR after an interruption only hashes the images already done) plus ``items.jsonl`` (one row per
image that loaded), ``failures.jsonl`` (path and reason of each image that did not) and
``summary.json``. ``-o`` may be a new or empty directory or one an earlier ``extract`` wrote (it
resumes); anything else is refused unless ``--overwrite``.

Exit codes: 0 = all images done; 3 = finished, but some images failed (listed); 2 = bad arguments,
nothing extracted (unknown backbone or data, ``--limit`` < 1, ``-o`` not an extract directory);
1 = the work failed (weights not installed, disk full, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodscope.cli.commands._common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    add_backbone_options,
    add_max_pixels_option,
    add_overwrite_option,
    check_output,
    checking,
    counted,
    open_images,
    print_failures,
    write_jsonl,
)
from oodscope.cli.commands._engine import add_engine_options, check_engine_args, extract_on_ray, uses_ray

HELP = "extract features of a folder / list / data set into a resumable store"
#: What an earlier ``oodscope extract`` leaves in its directory (a feature store's manifest, the summary).
EXTRACT_MARKERS = ("summary.json", "*/manifest.json")


def register(sub) -> None:
    parser = sub.add_parser("extract", help=HELP, description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", help="backbone spec, e.g. effnet-lite0, conse:effnet-lite0, hf:DIR")
    parser.add_argument("data", help="image folder, .txt/.csv list, image file, or a registered data set: "
                        "fashion-mnist/test, digits, textiles/local, ... (`oodscope datasets list`)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output directory (new, empty, or an earlier extract's: it resumes)")
    add_overwrite_option(parser, "write into a directory that holds other files")
    parser.add_argument("--patches", action="store_true", help="also store local/patch features")
    parser.add_argument("--limit", type=counted(1), default=None, help="only the first N images")
    add_backbone_options(parser)
    add_max_pixels_option(parser)
    add_engine_options(parser, "extraction")  # --engine / --address (issue 13: cli/commands/_engine.py)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from oodscope.backbones import create
    from oodscope.features.extract import extract
    from oodscope.io import Subset

    with checking():
        check_output(args.output, overwrite=args.overwrite, kind="dir", markers=EXTRACT_MARKERS,
                     what="the features")
        source = open_images(args.data, "DATA")
        if args.limit is not None:
            source = Subset(source, np.arange(min(args.limit, len(source))))
        options = {"patches": True} if args.patches else {}
        backbone = create(args.backbone, device=args.device, **options)  # an unknown spec is refused here
        check_engine_args(args)  # --engine ray: Ray installed, --address well formed (issue 13)
    args.output.mkdir(parents=True, exist_ok=True)
    if uses_ray(args):  # --engine ray (issue 13): the same store and files, computed on a Ray cluster
        result = extract_on_ray(args, source, f"extract {backbone.id}")
    else:
        result = extract(backbone, source, batch_size=args.batch_size, num_workers=args.num_workers,
                         cache_dir=args.output, keep_in_memory=False, description=f"extract {backbone.id}")
    labels = result.labels.tolist() if result.labels is not None else [None] * len(result.indices)
    write_jsonl(args.output / "items.jsonl", (
        {"index": int(i), "item": item, "hash": h.hex(), "label": lab}
        for i, item, h, lab in zip(result.indices, result.item_ids, result.hashes, labels, strict=True)))
    write_jsonl(args.output / "failures.jsonl", (f.__dict__ for f in result.failures))
    summary = {
        "backbone": backbone.id, "data": args.data, "images": len(source), "extracted": len(result.indices),
        "computed": result.n_computed, "from_cache": result.n_cached, "failed": len(result.failures),
        "seconds": round(result.seconds, 2), "store": str(result.store.root),
    }
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    rate = result.n_computed / result.seconds if result.seconds > 0 else 0.0
    print(f"{summary['extracted']}/{summary['images']} images -> {result.store.root} "
          f"({result.n_computed} computed, {result.n_cached} from cache, {rate:.1f} img/s)")
    if result.failures:
        print_failures([(f.item_id, f.reason) for f in result.failures], None, sys.stderr,
                       where=str(args.output / "failures.jsonl"))
        return EXIT_SOME_FAILED
    return EXIT_OK
