"""``oodscope monitor STORE``: what a service's monitoring store says, as text (or JSON).

Per model: records, flagged and unreadable images; the shift alarm (the conformal test martingale
against its threshold 1/delta); the OOD rate per time bucket; the score distribution of the most
recent images against the calibration scores (with the Kolmogorov-Smirnov distance); the most recent
flagged images; the alarm history. STORE is a SQLite file or a ``sqlite:///`` / ``postgresql://``
URL, as given to ``oodscope serve --store``. Exit codes: 0 = done; 1 = the store cannot be read;
2 = bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HELP = "summarise a service's monitoring store: OOD rate, scores vs calibration, flagged images, alarms"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``1d`` -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"must be a duration like 90s, 15m, 1h or 1d, got {text!r}")
    seconds = float(found.group(1)) * _UNITS[found.group(2) or "s"]
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 s, got {text!r}")
    return seconds


def register(sub) -> None:
    parser = sub.add_parser("monitor", help=HELP, description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="SQLite file, sqlite:///PATH or postgresql://... URL")
    parser.add_argument("--model", default=None, help="only this model (default: every model in the store)")
    parser.add_argument("--bucket", type=duration, default=3600.0, help="OOD-rate time bucket (default 1h)")
    parser.add_argument("--buckets", type=int, default=24, help="how many recent buckets (default 24)")
    parser.add_argument("--recent", type=int, default=1000, help="recent scores compared with calibration")
    parser.add_argument("--flagged", type=int, default=10, help="most recent flagged images shown")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.serve import missing

    absent = [d for d in missing() if d in ("sqlalchemy",)]
    if absent:
        print(f"oodscope monitor: error: needs {', '.join(absent)}: pip install 'oodscope[serve]'", file=sys.stderr)
        return EXIT_FAILED
    from oodscope.serve.monitoring import render_text, summarize
    from oodscope.serve.store import Store, StoreError

    if "://" not in args.store and not Path(args.store).is_file():
        print(f"oodscope monitor: error: {args.store} is not a store file (give the --store of oodscope serve)",
              file=sys.stderr)
        return EXIT_USAGE
    for name in ("buckets", "recent", "flagged"):
        if getattr(args, name) < 1:
            print(f"oodscope monitor: error: --{name} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        store = Store.open(args.store, migrate=False)
        try:
            if store.version() == 0:
                raise StoreError(f"{args.store} holds no oodscope store")
            summary = summarize(store, model=args.model, bucket_seconds=args.bucket, buckets=args.buckets,
                                recent_scores=args.recent, flagged=args.flagged)
        finally:
            store.close()
    except StoreError as err:
        print(f"oodscope monitor: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a damaged store is reported in one line
        print(f"oodscope monitor: error: cannot read {args.store}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(render_text(summary))
    return EXIT_OK
