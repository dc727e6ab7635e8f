"""Open Clip Art catalogue: real drawings of named objects, offline from Debian's ``openclipart-png``.

The second offline zero-shot protocol besides Fashion-MNIST-OOD (issue 16): Fashion-MNIST is
greyscale photos of garments; these are colour drawings (clip art) of animals, food, vehicles and
plants, filed by their authors into named category folders. Choosing zero-shot defaults on both
guards against tuning to one kind of image. Protocol ``openclipart`` (benchmark):

- ID: ``animals/{mammals, birds, bugs, fish}`` (234 distinct drawings: 118, 50, 49, 17), class names
  ``mammal``, ``bird``, ``bug``, ``fish`` (the folder names in the singular; not renamed to suit any
  method);
- far-OOD: ``food`` (336, every sub-folder), ``vehicles`` (``transportation/vehicles`` and
  ``transportation/boating``, 94), ``plants`` (75). No near-OOD set: the other animal folders
  (dinosaurs, fantasy, amphibian) hold 19 drawings, too few to measure.

The package files some drawings in two folders (symlinks to one file): each real file is used once,
and a drawing that is also in an ID folder is left out of the OOD sets.

Transparent backgrounds are composited on white by :func:`oodscope.io.images.to_rgb`. Registered when
:mod:`oodscope.io.registry` is imported; the files are read from ``/usr/share/openclipart/png`` (or
``$OODSCOPE_OPENCLIPART``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from oodscope.io.files import FileList
from oodscope.io.registry.specs import Benchmark, DatasetNotAvailable, DatasetSpec, register_benchmark, register_dataset
from oodscope.io.sources import ImageSource, Relabel

OPENCLIPART_ENV = "OODSCOPE_OPENCLIPART"
OPENCLIPART_DEBIAN_DIR = Path("/usr/share/openclipart/png")
#: ID folders (under ``animals/``) and the class names the protocol prompts with, in label order.
CLIPART_ID_FOLDERS = ("mammals", "birds", "bugs", "fish")
CLIPART_ID_CLASSES = ("mammal", "bird", "bug", "fish")

_SRC = ("Open Clip Art Library release 0.18 (openclipart.org), as packaged by Debian (openclipart-png, "
        "1:0.18+dfsg); the category folders are the library's own")
_HOW = ("apt-get install openclipart-png (files in /usr/share/openclipart/png), or set $OODSCOPE_OPENCLIPART to a "
        "folder with the same layout")
_LICENCE = "public domain (Creative Commons Public Domain Dedication; /usr/share/doc/openclipart-png/copyright)"


def openclipart_root() -> Path:
    return Path(os.environ.get(OPENCLIPART_ENV) or OPENCLIPART_DEBIAN_DIR)


def _root_or_raise() -> Path:
    root = openclipart_root()
    if not (root / "animals").is_dir():
        raise DatasetNotAvailable(f"Open Clip Art PNGs not found in {root}: {_HOW}")
    return root


def _unique_pngs(root: Path, rel: str) -> list[Path]:
    """The distinct drawings under ``root/rel``: the package files some drawings under two categories as
    symlinks to one file, so each real file is kept once (sorted by its real path)."""
    found = {os.path.realpath(p) for p in (root / rel).rglob("*.png")}
    return [Path(p) for p in sorted(found)]


def _id_paths(root: Path) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(CLIPART_ID_FOLDERS):
        for path in _unique_pngs(root, f"animals/{folder}"):
            if path not in paths:
                paths.append(path)
                labels.append(label)
    return paths, labels


def _id_animals() -> ImageSource:
    paths, labels = _id_paths(_root_or_raise())
    return Relabel(FileList(paths), labels, list(CLIPART_ID_FOLDERS))


def _far(*rels: str) -> Callable[[], ImageSource]:
    """A far-OOD set: the distinct drawings of ``rels``, minus any the ID set also holds (a fish filed
    under food, say), so that no image is both ID and OOD."""

    def load() -> ImageSource:
        root = _root_or_raise()
        in_id = set(_id_paths(root)[0])
        paths = sorted({p for rel in rels for p in _unique_pngs(root, rel)} - in_id)
        return FileList(paths)

    return load


def _offline(fn: Callable[[], ImageSource]) -> Callable[[Path | None], ImageSource]:
    def load(root: Path | None) -> ImageSource:
        return fn()

    load.locate = None  # type: ignore[attr-defined]
    return load


def _register() -> None:
    common = dict(source=_SRC, licence=_LICENCE, checksum_source="not applicable (Debian package, dpkg-verified)",
                  how_to_place=_HOW, offline=True)
    register_dataset(DatasetSpec(
        name="openclipart/animals", description="Open Clip Art drawings of mammals, birds, bugs and fish "
        "(ID of the openclipart benchmark; labels in that order)", loader=_offline(_id_animals),
        expected_files=234,
        count_source="distinct PNGs in openclipart-png 1:0.18+dfsg-19: 118 + 50 + 49 + 17",
        tags=("offline", "openclipart", "id"), **common))
    for name, rels, n, what in (
        ("food", ("food",), 336, "food and drink (fruit, desserts, beverages, ...)"),
        ("vehicles", ("transportation/vehicles", "transportation/boating"), 94, "vehicles and boats"),
        ("plants", ("plants",), 75, "plants (flowers, trees, ...)"),
    ):
        register_dataset(DatasetSpec(
            name=f"openclipart/{name}", description=f"Open Clip Art drawings of {what} (far-OOD of the "
            "openclipart benchmark)", loader=_offline(_far(*rels)), expected_files=n,
            count_source="distinct PNGs not in the ID set, openclipart-png 1:0.18+dfsg-19",
            tags=("offline", "openclipart", "far"), **common))
    register_benchmark(Benchmark(
        name="openclipart", description="Open Clip Art (offline, drawings): ID = mammal / bird / bug / fish "
        "drawings; far-OOD = food, vehicles, plants drawings (zero-shot: no fit set)",
        id="openclipart/animals", near={},
        far={"food": "openclipart/food", "vehicles": "openclipart/vehicles", "plants": "openclipart/plants"},
        classes=lambda: list(CLIPART_ID_CLASSES), source=_SRC))


_register()
