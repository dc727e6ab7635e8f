"""``oodscope score --maps DIR``: the anomaly map of every image, as float16 ``.npy`` and a PNG overlay.

For a model of an image anomaly method (kind ``anomaly``), each scored image gets, under DIR, at
the path of the image relative to the folder all images share (extension dropped):

- ``<name>.npy``: the map, float16 (H, W) at the image's own resolution (``np.save``; read it back
  with ``np.load(path, allow_pickle=False)``); higher = more anomalous, NaN where the network did not
  look (outside a centre crop);
- ``<name>.png``: the image with the map as a heat map over it (normalised per image);

and ``DIR/maps.csv`` lists item, score, npy, png, height, width (one row per scored image).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.cli.commands._common import UsageError

INDEX_FILE = "maps.csv"


def add_maps_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--maps", type=Path, default=None, metavar="DIR",
                        help="image anomaly methods: write each image's anomaly map to DIR (float16 .npy at the "
                        "image's resolution + a PNG heat-map overlay; DIR/maps.csv lists them)")


def check_maps_args(args: argparse.Namespace, config: dict) -> None:
    """Refuse ``--maps`` for a model without maps, with the Ray engine, or into a non-empty DIR."""
    if getattr(args, "maps", None) is None:
        return
    if config.get("kind") != "anomaly":
        raise UsageError(f"--maps needs an image anomaly method; {args.model} uses {config.get('method')!r} "
                         f"(kind {config.get('kind')}), which gives image scores only")
    if getattr(args, "engine", "local") not in (None, "local"):
        raise UsageError("--maps runs with the local engine only (drop --engine)")
    path = Path(args.maps)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--maps {path} is a file; the maps go into a directory")
    if path.is_dir() and any(path.iterdir()) and not args.overwrite:
        raise UsageError(f"--maps {path} is not empty; choose a new directory, or add --overwrite to write the maps "
                         "into it")


class MapWriter:
    """Writes the maps of each chunk as it comes (memory: one chunk's maps)."""

    def __init__(self, directory: Path, source: Any) -> None:
        from oodscope.pipeline.maps import map_file_names

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.names = dict(zip((source.item_id(i) for i in range(len(source))),
                              map_file_names([source.item_id(i) for i in range(len(source))]), strict=True))
        self.index = open(self.directory / INDEX_FILE, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.csv = csv.writer(self.index, lineterminator="\n")
        self.csv.writerow(["item", "score", "npy", "png", "height", "width"])
        self.written = 0

    def write(self, predictions: Any, maps: list[np.ndarray | None], chunk: Any) -> None:
        from oodscope.pipeline.maps import heatmap_overlay

        for i, amap in enumerate(maps):
            if amap is None:
                continue
            item = predictions.item_ids[i]
            stem = self.directory / self.names.get(item, f"image-{self.written}")
            stem.parent.mkdir(parents=True, exist_ok=True)
            npy, png = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".png")
            np.save(npy, amap.astype(np.float16), allow_pickle=False)
            heatmap_overlay(chunk.decode(i, chunk.read(i)), amap).save(png)
            self.csv.writerow([item, repr(float(predictions.scores[i])), npy.relative_to(self.directory).as_posix(),
                               png.relative_to(self.directory).as_posix(), amap.shape[0], amap.shape[1]])
            self.written += 1
        self.index.flush()

    def close(self) -> None:
        self.index.close()


def predictions_writing_maps(model: Any, source: Any, chunk_size: int, directory: Path) -> Iterator[Any]:
    """The model's predictions chunk by chunk, as ``predict_iter`` gives them, writing each chunk's maps."""
    import sys

    from oodscope.pipeline.maps import predict_maps_iter

    writer = MapWriter(directory, source)
    try:
        for part, maps, chunk in predict_maps_iter(model, source, chunk_size=chunk_size, progress=None,
                                                   require_calibration=False):
            writer.write(part, maps, chunk)
            yield part
    finally:
        writer.close()
    print(f"maps of {writer.written} image(s) written to {directory} (index: {directory / INDEX_FILE})",
          file=sys.stderr)
