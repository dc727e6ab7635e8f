"""``oodscope demo``: the end-to-end study on the packaged offline backbones (see oodscope.demo).

``-o DIR`` (default ``oodscope-demo``) is the study's own folder: a re-run rewrites its results and
reuses the feature cache inside it. Exit codes: 0 = done; 1 = the work failed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "run a small end-to-end OOD study offline and write an HTML report"


def register(sub) -> None:
    parser = sub.add_parser("demo", help=HELP)
    parser.add_argument("-o", "--output", type=Path, default=Path("oodscope-demo"), help="output directory")
    parser.add_argument("--per-class", type=int, default=40,
                        help="Fashion-MNIST images per class for fitting, calibrating and testing (default 40)")
    parser.add_argument("--far", type=int, default=200, help="images per far-OOD set (default 200)")
    parser.add_argument("--no-anomaly", dest="anomaly", action="store_false",
                        help="skip the anomaly part (PatchCore on the offline synthetic-ad/brick category)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.demo import run_demo

    result = run_demo(args.output, per_class=args.per_class, far=args.far, anomaly=args.anomaly)
    print()
    print(result.table)
    print("Deployment (KNN on EfficientNet-Lite0, conformal p-values, alpha = "
          f"{result.deployment['alpha']}):")
    for group, counts in result.deployment["groups"].items():
        print(f"  {group:<10} {counts['flagged_ood']:>3} of {counts['images']:>3} flagged OOD")
    for bad in result.deployment["unreadable"]:
        print(f"  unreadable: {bad['file']} ({bad['error']})")
    print(json.dumps({"seconds": round(result.seconds, 1)}))
    print(f"Report: {result.report}")
    return 0
