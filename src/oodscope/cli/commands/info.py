"""``oodscope info MODEL_DIR``: what a saved model is, read from its ``model.json`` alone.

Backbone id and weights fingerprint, method and parameters, ID classes, class head, fit and
calibration sizes, alpha, the calibrated threshold with its uncertainty, prediction sets, notes,
and the oodscope version that wrote it (a field missing from ``model.json`` is said in words, never
as ``None``). Nothing is loaded (no weights); ``--check`` also loads the backbone and verifies that
its weights match the fingerprint. Exit codes: 0 = ok; 2 = MODEL_DIR is not a saved model; 1 =
``--check`` failed (the backbone here is another one, or has other weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodscope.cli.commands._common import EXIT_FAILED, EXIT_OK, UsageError

HELP = "describe a model written by `oodscope fit`"


def register(sub) -> None:
    parser = sub.add_parser("info", help=HELP, description=__doc__.split("\n\n")[0])
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
        reason = "no model.json" if isinstance(err, FileNotFoundError) else f"model.json is not readable: {err}"
        raise UsageError(f"{args.model} is not a saved oodscope model ({reason})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UsageError(f"{path} is not an oodscope model file (format {found or 'not given'}, "
                         f"expected {FORMAT})")
    if args.json:
        print(json.dumps(config, indent=2))
    else:
        version = config.get("format_version")
        print(f"model          {args.model}" + (f" (format version {version})" if version is not None else ""))
        print(describe_summary(config))
    if args.check:
        try:
            OODModel.load(args.model, progress=False)
        except (OODModelError, ValueError, OSError, ImportError, KeyError) as err:
            print(f"oodscope info: check failed: {err}", file=sys.stderr)
            return EXIT_FAILED
        print("check          backbone found; weights fingerprint matches", file=sys.stderr)
    return EXIT_OK
