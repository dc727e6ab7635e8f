"""``oodscope backbones``: what can be created, and whether its weights are on this machine."""

from __future__ import annotations

import argparse
import json

HELP = "list registered backbones and offline availability"


def register(sub) -> None:
    parser = sub.add_parser("backbones", help=HELP)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.backbones import list_backbones

    infos = list_backbones()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    width = max(len(i.spec) for i in infos)
    print(f"{'backbone':<{width}}  {'kind':<15}  offline  description")
    for info in infos:
        mark = "yes" if info.available_offline else "no"
        print(f"{info.spec:<{width}}  {info.kind:<15}  {mark:<7}  {info.description}")
        if info.note:
            print(f"{'':<{width}}  {'':<15}           -> {info.note}")
    return 0
