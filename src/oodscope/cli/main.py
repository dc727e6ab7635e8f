"""The ``oodscope`` command line.

Each sub-command lives in its own module under :mod:`oodscope.cli.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (returning an exit code), and
``HELP``, its one-line summary (so that only the invoked command's parser is built in full).

Exit codes, the same for every command: 0 = done; 1 = a runtime failure (the arguments were valid
but the work failed: weights or a data set not installed, unreadable model, out of memory, ...);
2 = bad arguments, refused before any image is read (unknown method, backbone or parameter, a path
that is not there or not what the option expects, an invalid value, an existing ``-o`` without
``--overwrite``); 3 = done, but some images could not be read (each is listed with its path and
reason). Errors are one line, ``oodscope CMD: error: message``, without a Python traceback
(``OODSCOPE_DEBUG=1`` re-raises them); fit cautions (:class:`~oodscope.detectors.base.FitWarning`)
are one line too, ``oodscope CMD: caution: message``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator, Sequence

from oodscope import __version__
from oodscope.cli import commands
from oodscope.cli.commands._common import EXIT_FAILED, EXIT_USAGE, UsageError, people


def _command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``argv``, only the command it invokes is built in full (the
    others are listed by their ``HELP``), which keeps start-up light."""
    parser = argparse.ArgumentParser(
        prog="oodscope",
        description="Tell whether images are in-distribution for a vision model, or out-of-distribution. "
        "Scores are higher = more OOD everywhere. Exit codes: 0 done, 1 runtime failure, 2 bad arguments, "
        "3 done but some images could not be read.",
    )
    parser.add_argument("--version", action="version", version=f"oodscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = _command_modules()
    invoked = None
    if argv is not None:
        invoked = next((a for a in argv if not a.startswith("-")), "")
    for name in names:
        module = importlib.import_module(f"{commands.__name__}.{name}")
        summary = getattr(module, "HELP", None)
        if invoked is None or name == invoked or summary is None:
            module.register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    name = args.command
    audit = getattr(args, "audit", None)
    return f"{name} {audit}" if name == "audit" and audit else name


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Fit cautions and oodscope's own warnings as one line each (``oodscope CMD: caution: ...``),
    every distinct message once; other packages' warnings as Python shows them."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen: set[tuple[str, str]] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' hook
        from oodscope.detectors.base import FitWarning

        ours = issubclass(category, FitWarning) or os.path.abspath(str(filename)).startswith(package)
        if not ours:
            original(message, category, filename, lineno, file, line)
            return
        label = "caution" if issubclass(category, FitWarning) else "warning"
        key = (label, str(message))
        if key not in seen:
            seen.add(key)
            print(f"oodscope {command}: {label}: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"oodscope(\.|$)")  # every fit's caution, not once per line
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from oodscope.cli.commands._common import max_pixels_limit
    from oodscope.text.prompts import persist_default_cache

    persist_default_cache()  # text embeddings (WordNet negatives: ~70k texts) are encoded once per encoder
    command = _command_name(args)
    debug = bool(os.environ.get("OODSCOPE_DEBUG"))
    try:
        with one_line_warnings(command), max_pixels_limit(getattr(args, "max_pixels", None)):
            return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; work written so far is kept and a re-run resumes from it", file=sys.stderr)
        return 130
    except UsageError as err:
        if debug:
            raise
        print(f"oodscope {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, LookupError, OSError, ImportError, RuntimeError, MemoryError) as err:
        # The arguments were accepted, the work failed (a model for other weights, a package or data
        # set not installed, a disk or memory error, ...).
        if debug:
            raise
        print(f"oodscope {command}: error: {people(err)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
