"""The ``oodscope`` command line.

Each sub-command lives in its own module under :mod:`oodscope.cli.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from oodscope import __version__
from oodscope.cli import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oodscope",
        description="Tell whether images are in-distribution for a vision model, or out-of-distribution. "
        "Scores are higher = more OOD everywhere.",
    )
    parser.add_argument("--version", action="version", version=f"oodscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from oodscope.text.prompts import persist_default_cache

    persist_default_cache()  # text embeddings (WordNet negatives: ~70k texts) are encoded once per encoder
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; work written so far is kept and a re-run resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
