"""Helpers shared by CLI commands: one syntax per kind of argument, checks before any work starts,
and messages for people.

Exit codes (every command): :data:`EXIT_OK` 0 = done; :data:`EXIT_FAILED` 1 = a runtime failure
(the arguments were valid, the work failed); :data:`EXIT_USAGE` 2 = bad arguments, refused before
any image was read (:class:`UsageError`); :data:`EXIT_SOME_FAILED` 3 = done, but some images could
not be read (each is listed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3

#: How ``--classes`` is written, everywhere.
CLASSES_SYNTAX = '"a,b,c", or @FILE with one name per line'

#: How many unreadable images a command lists before "... and N more".
SHOWN_FAILURES = 10


class UsageError(Exception):
    """Bad arguments: the command refuses to start (exit 2, ``oodscope CMD: error: message``)."""


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """Argument checks: a ValueError (DatasetError, DetectorError, OODModelError, ...) or LookupError
    raised inside is a :class:`UsageError` (exit 2). Missing packages or weights, disk errors and the
    like pass through: they are runtime failures (exit 1)."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, LookupError) as err:
        raise UsageError(people(err)) from None


_INTERNAL_NAMES = re.compile(r"\b(?:ImageFolder|FlatFolder|FileList|ArrayDataset|Subset|Concat)\b:? ?(?=['\"])")


def people(err: BaseException | str) -> str:
    """An exception's message without the internal class names some of them carry."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err)
    text = _INTERNAL_NAMES.sub("folder ", text)
    return text or type(err).__name__


# ------------------------------------------------------------------------------------------ options
def class_names(text: str) -> list[str]:
    """``--classes`` everywhere: ``a,b,c`` or ``@FILE`` (one name per line; blank lines skipped)."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read the class names file {str(path)!r}: "
                                             f"{err.strerror or err}") from None
        names = [line.strip() for line in lines]
    else:
        if "," not in text and Path(text).expanduser().is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is a file: write @{text} to read the class names from it "
                                             "(one per line)")
        names = [c.strip() for c in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise argparse.ArgumentTypeError(f"no class names in {text!r}; write {CLASSES_SYNTAX}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"class name(s) given twice: {', '.join(twice)}")
    return names


def add_classes_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument("--classes", type=class_names, default=None, metavar="NAMES",
                        help=f"{purpose}: {CLASSES_SYNTAX}")


def counted(low: int, what: str = "a whole number"):
    """An argparse type: an integer >= ``low``."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    convert.__name__ = "integer"
    return convert


def level(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (alpha, FDR, fractions)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def model_option_type(option):
    """An argparse type from a :class:`~oodscope.pipeline.options.ModelOption` (``none`` = None)."""
    def convert(text: str) -> Any:
        if text.strip().lower() == "none" and (option.optional or None in (option.choices or ())):
            return None
        try:
            value = text if option.choices is not None else option.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_kind_text(option.type)}, got {text!r}") from None
        problem = option.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = option.type.__name__
    return convert


def _kind_text(kind: type) -> str:
    return {int: "a whole number", float: "a number"}.get(kind, "text")


def add_model_options(parser, names: Sequence[str] | None = None, *, not_given: Sequence[str] = (),
                      group=None, in_group: Sequence[str] = ()) -> None:
    """Add the :data:`~oodscope.pipeline.options.MODEL_OPTIONS` named ``names`` (default all).

    ``not_given``: options whose parser default is None (to tell "not given" apart; the help still
    shows the model's default); ``in_group``: options added to ``group`` instead of ``parser``.
    """
    from oodscope.pipeline.options import MODEL_OPTIONS

    for option in MODEL_OPTIONS:
        if names is not None and option.name not in names:
            continue
        target = group if option.name in in_group and group is not None else parser
        shown = "none" if option.default is None else option.default
        text = option.help if option.default is None and "default" in option.help else \
            f"{option.help} (default {shown})"
        metavar = "{" + ",".join("none" if c is None else str(c) for c in option.choices) + "}" \
            if option.choices is not None else option.flag.lstrip("-").upper().replace("-", "_")
        target.add_argument(option.flag, dest=option.name, type=model_option_type(option), metavar=metavar,
                            default=None if option.name in not_given else option.default, help=text)


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, and ``--batch-size`` / ``--workers`` as OODModel defines them."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_model_options(parser, ("batch_size", "num_workers"))


def add_max_pixels_option(parser: argparse.ArgumentParser) -> None:
    from oodscope.io.images import DEFAULT_MAX_PIXELS

    parser.add_argument("--max-pixels", type=counted(1), default=None, metavar="N",
                        help=f"refuse images with more than N pixels (width x height, read from the file header "
                        f"before decoding; default {DEFAULT_MAX_PIXELS:,}); such an image is reported as "
                        "unreadable")


def add_overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"write -o even when it exists: {what}")


@contextlib.contextmanager
def max_pixels_limit(limit: int | None) -> Iterator[None]:
    """Images with more than ``limit`` pixels are refused for the duration of a command.

    It is the default of every image source (``ImageSource.max_pixels``) and, when it is larger,
    Pillow's own guard is raised to match; both are restored afterwards. DataLoader workers are
    forked and inherit both.
    """
    if limit is None:
        yield
        return
    from PIL import Image

    from oodscope.io import ImageSource

    before, pillow_before = ImageSource.max_pixels, Image.MAX_IMAGE_PIXELS
    ImageSource.max_pixels = limit
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2
    try:
        yield
    finally:
        ImageSource.max_pixels, Image.MAX_IMAGE_PIXELS = before, pillow_before


# ------------------------------------------------------------------------------------------ checks
def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["k=5", "templates=ensemble"]`` -> ``{"k": 5, "templates": "ensemble"}`` (JSON when it parses)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def check_detector_params(name: str, params: dict[str, Any]) -> None:
    """Refuse an unknown detector, unknown parameters (listing the valid ones) and values of the wrong
    kind for a numeric or boolean parameter (the type of its default)."""
    import inspect

    from oodscope.detectors import registered
    from oodscope.detectors.base import check_params, parameters

    detectors = registered()
    if name not in detectors:
        raise UsageError(f"unknown method {name!r}; registered: {', '.join(detectors)} (`oodscope detectors`)")
    cls = detectors[name]
    with checking():
        check_params(cls, params, partial=True)
    defaults = parameters(cls)
    for key, value in params.items():
        default = defaults[key]
        if default is inspect.Parameter.empty or default is None:
            continue
        expected = None
        if isinstance(default, bool):
            expected = None if isinstance(value, bool) else "true or false"
        elif isinstance(default, int):
            expected = None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
        elif isinstance(default, float):
            expected = None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
        if expected:
            raise UsageError(f"{name}: parameter {key} takes {expected} (default {default!r}), got {value!r}")


def needs_in_words(problems: Sequence[str], images_option: str) -> str:
    """:func:`oodscope.detectors.fitting.fit_problems` as the command line says them."""
    words = []
    for problem in problems:
        if problem.startswith("a text encoder"):
            problem = "a text encoder (a vision-language backbone, e.g. conse:effnet-lite0 or hf:...)"
        elif problem == "in-distribution features":
            problem = f"ID images to fit on ({images_option})"
        elif problem.startswith("the class labels"):
            problem = f"the class of every ID image (one sub-folder per class in {images_option})"
        elif problem.startswith("a classifier backbone"):
            problem = "a classifier backbone that it can run (e.g. effnet-lite0)"
        words.append(problem)
    return " and ".join(words)


def check_output(path: Path, *, overwrite: bool, kind: str, markers: Sequence[str] = (), what: str = "") -> None:
    """Refuse to write ``-o PATH`` over something that is there, unless ``--overwrite``.

    ``kind="file"``: an existing file is refused. ``kind="dir"``: a file is refused, and so is a
    non-empty directory unless it holds one of ``markers`` (a directory this command wrote before,
    which it resumes or rewrites).
    """
    path = Path(path)
    if kind == "file":
        if path.is_dir():
            raise UsageError(f"-o {path} is a directory; give a file name")
        if path.exists() and not overwrite:
            raise UsageError(f"-o {path} exists; add --overwrite to replace it, or choose another file")
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"-o {path} is a file; {what or 'the output'} is a directory")
    if overwrite or not path.is_dir():
        return
    if any(next(path.glob(m), None) is not None for m in markers):
        return
    if any(path.iterdir()):
        raise UsageError(f"-o {path} is not empty; choose a new directory, or add --overwrite to write "
                         f"{what or 'the output'} into it")


def open_images(spec: Any, option: str, *, classes_expected: bool = False, missing_ok: bool = False):
    """The image source of a data spec given with ``option`` (:func:`oodscope.io.resolve_images`),
    with messages that name the option; ``classes_expected``: the option wants class sub-folders."""
    from oodscope.io import IMAGE_EXTENSIONS, DatasetError, resolve_images

    try:
        return resolve_images(spec, missing_ok=missing_ok)
    except DatasetError as err:
        text = str(err)
        path = Path(os.fspath(spec)).expanduser() if isinstance(spec, str | os.PathLike) else None
        if path is not None and path.is_dir() and ("no images" in text or "no class sub-folders" in text):
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            if classes_expected:
                raise UsageError(f"{option} {spec}: {str(path)!r} has no class sub-folders with images; {option} "
                                 f"expects one sub-folder per class (images: {extensions})") from None
            raise UsageError(f"{option} {spec}: no images in {str(path)!r} (images: {extensions})") from None
        raise UsageError(f"{option}: {people(err)}") from None


def require_path(path: Path, option: str) -> None:
    if not Path(path).expanduser().exists():
        raise UsageError(f"{option} {path}: no such file or directory")


# ------------------------------------------------------------------------------------------ output
def default_cache_dir() -> Path:
    """Feature cache shared by commands: $OODSCOPE_CACHE, else ~/.cache/oodscope/features."""
    env = os.environ.get("OODSCOPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "oodscope" / "features"


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def print_failures(failures: Sequence[tuple[str, str]], total: int | None, stream, *, where: str = "") -> None:
    """``N image(s) could not be read[ (see WHERE)]:`` and the first few, each with its path and reason."""
    count = len(failures) if total is None else total
    print(f"{count} image(s) could not be read" + (f" (see {where})" if where else "") + ":", file=stream)
    for item, reason in list(failures)[:SHOWN_FAILURES]:
        print(f"  {item}: {reason}", file=stream)
    if count > SHOWN_FAILURES:
        print(f"  ... and {count - SHOWN_FAILURES} more", file=stream)
