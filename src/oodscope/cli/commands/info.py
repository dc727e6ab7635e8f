"""``oodscope info MODEL_DIR``: what a saved model is, read from its ``model.json`` alone.

Backbone id and weights fingerprint, method and parameters, ID classes, class head, fit and
calibration sizes, alpha, the calibrated threshold with its uncertainty, prediction sets, and the
oodscope version that wrote it. Nothing is loaded (no weights); ``--check`` also loads the backbone
and verifies that its weights match the fingerprint. Exit codes: 0 = ok; 1 = not a model, or
``--check`` failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_ERROR = 1


def register(sub) -> None:
    parser = sub.add_parser("info", help="describe a model written by `oodscope fit`")
    parser.add_argument("model", type=Path, help="model directory")
    parser.add_argument("--json", action="store_true", help="print model.json as it is")
    parser.add_argument("--check", action="store_true",
                        help="also load the backbone and verify its weights fingerprint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.pipeline import OODModel, OODModelError
    from oodscope.pipeline.persistence import FORMAT, MODEL_FILE, describe_summary

    path = args.model / MODEL_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"oodscope info: error: {args.model} is not a saved oodscope model ({err})", file=sys.stderr)
        return EXIT_ERROR
    if config.get("format") != FORMAT:
        print(f"oodscope info: error: {path} has format {config.get('format')!r}, not {FORMAT!r}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(config, indent=2))
    else:
        print(f"model          {args.model} (format version {config.get('format_version')})")
        print(describe_summary(config))
    if args.check:
        try:
            OODModel.load(args.model, progress=False)
        except (OODModelError, ValueError, FileNotFoundError, ImportError) as err:
            print(f"oodscope info: check failed: {err}", file=sys.stderr)
            return EXIT_ERROR
        print("check          backbone found; weights fingerprint matches", file=sys.stderr)
    return 0
