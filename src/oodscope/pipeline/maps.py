"""Anomaly maps of an :class:`~oodscope.pipeline.model.OODModel` at image resolution, and heat-map overlays.

An image anomaly detector (kind ``anomaly``) gives one map per image at its feature grid
(``AnomalyDetector.score_maps``). Here the map is brought back onto the image it came from:

1. :func:`~oodscope.detectors._anomaly.upsample_maps` to the network's input square (S x S): bilinear
   upsampling, then the Gaussian smoothing of PatchCore / PaDiM (sigma = 4 px at the input
   resolution, as in their official code: the smoothing is defined at the network's resolution);
2. :func:`to_image_geometry`: the inverse of the preprocessing geometry, bilinearly, to the original
   (H, W). With ``resize="stretch"`` (the default of every backbone asked for dense maps) the map
   covers the whole image; with ``letterbox`` the padding is cut off; with the centre crop
   (``shorter_center_crop``) the map covers the crop only and is NaN outside it — "not looked at",
   never "normal".

Overlays (:func:`heatmap_overlay`) blend a colour-mapped map onto the image, normalised per image
(the overlay shows *where*; the float16 ``.npy`` next to it keeps the values). Colour maps come from
matplotlib when it is installed (an optional extra), else from a built-in ``jet``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from oodscope.backbones.base import Features, InputSpec

if TYPE_CHECKING:
    from PIL import Image

    from oodscope.pipeline.model import OODModel
    from oodscope.pipeline.predictions import Predictions

#: Gaussian smoothing of the maps at the network's input resolution (PatchCore / PaDiM official code).
DEFAULT_SIGMA = 4.0


def require_maps(model: OODModel) -> None:
    """Raise an :class:`OODModelError` unless the model's detector gives anomaly maps."""
    from oodscope.detectors._anomaly import AnomalyDetector
    from oodscope.pipeline.inputs import OODModelError

    model._require_fitted()
    if not isinstance(model.detector_, AnomalyDetector):
        raise OODModelError(f"{model.method} ({model.kind.label}) gives image scores only, no anomaly maps: maps "
                            "need an image anomaly method (`oodscope detectors` lists them with kind anomaly)")
    if not type(model.detector_).pixel_maps:
        raise OODModelError(f"{model.method} is an image-level anomaly method (it scores the pooled image and does "
                            "not localise): it gives image scores only, no anomaly maps; padim or patchcore give maps")


def _frame(spec: InputSpec, n_out: int, other: int, axis_is_width: bool) -> tuple[float, float, bool]:
    """For one image axis of ``n_out`` pixels (the other axis has ``other``): where it lies in the
    network's S-pixel frame, as ``(offset, extent, clip)``: image coordinate c maps to frame coordinate
    ``offset + c * extent / n_out``; ``clip``: positions outside the frame are not covered (NaN)."""
    size = spec.size
    width, height = (n_out, other) if axis_is_width else (other, n_out)
    if spec.resize == "stretch":
        return 0.0, float(size), False
    if spec.resize == "letterbox":
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        new, pad = (new_w, (size - new_w) // 2) if axis_is_width else (new_h, (size - new_h) // 2)
        return float(pad), float(new), False
    if spec.resize == "shorter_center_crop":
        # the crop box (as backbones.preprocess.prepare_pixels cuts it): side x side, centred
        side = min(width, height) * spec.crop_fraction
        start = (n_out - side) / 2
        # frame coordinate of image coordinate c: (c - start) * size / side
        return -start * size / side, n_out * size / side, True
    raise ValueError(f"unknown resize policy {spec.resize!r}")


def _interpolation_matrix(n_out: int, size: int, offset: float, extent: float, clip: bool) -> np.ndarray:
    """(n_out, size) bilinear weights from a ``size``-pixel frame to ``n_out`` image pixels (pixel
    centres at k + 0.5, edges repeated, as bilinear resizing with ``align_corners=False``); rows of
    image pixels outside the frame are NaN when ``clip``. Only the frame pixels that hold the image
    are read (a letterbox's padding never bleeds in)."""
    centres = offset + (np.arange(n_out) + 0.5) * extent / n_out  # frame coordinates of image pixel centres
    first = min(max(0, int(round(offset))), size - 1) if not clip else 0
    last = max(first, min(size - 1, int(round(offset + extent)) - 1)) if not clip else size - 1
    t = np.clip(centres - 0.5, first, last)
    k0 = np.floor(t).astype(np.int64)
    k1 = np.minimum(k0 + 1, size - 1)
    w1 = t - k0
    out = np.zeros((n_out, size))
    rows = np.arange(n_out)
    np.add.at(out, (rows, k0), 1.0 - w1)
    np.add.at(out, (rows, k1), w1)
    if clip:
        out[(centres < 0) | (centres > size)] = np.nan
    return out


def to_image_geometry(frame_map: np.ndarray, spec: InputSpec, image_size: tuple[int, int]) -> np.ndarray:
    """A map over the network's input square (S, S) -> (H, W) over the original image
    (``image_size`` = (W, H), as PIL gives it), undoing ``spec``'s resize policy (see the module docstring)."""
    frame_map = np.asarray(frame_map, dtype=np.float64)
    if frame_map.shape != (spec.size, spec.size):
        raise ValueError(f"expected a ({spec.size}, {spec.size}) map, got {frame_map.shape}")
    width, height = int(image_size[0]), int(image_size[1])
    ax = _interpolation_matrix(width, spec.size, *_frame(spec, width, height, True))
    ay = _interpolation_matrix(height, spec.size, *_frame(spec, height, width, False))
    return (ay @ frame_map @ ax.T).astype(np.float32)


def frame_maps(model: OODModel, features: Features, sigma: float = DEFAULT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, S, S) over the network's input square, smoothed (``sigma`` px)."""
    from oodscope.detectors._anomaly import upsample_maps

    scores, grid = model.detector_.score_maps(features)
    size = model.backbone.input_spec.size
    return scores, upsample_maps(grid, (size, size), sigma)


def predict_maps_iter(model: OODModel, images: Any, *, chunk_size: int, progress: bool | None,
                      require_calibration: bool, sigma: float = DEFAULT_SIGMA
                      ) -> Iterator[tuple[Predictions, list[np.ndarray | None], Any]]:
    """Stream ``(predictions, maps, chunk source)`` per chunk: each map (H, W) float32 at its image's own
    resolution (None for an unreadable image); one feature extraction and one detector pass per chunk."""
    from oodscope.pipeline.decisions import predict_chunk
    from oodscope.pipeline.inputs import as_image_source, image_chunks

    require_maps(model)
    if require_calibration:
        model._require_calibrated()
    spec = model.backbone.input_spec
    show = model.progress if progress is None else progress
    for chunk in image_chunks(as_image_source(images, missing_ok=True), chunk_size, show):
        data = model._data(chunk, "score", progress=False)
        maps: list[np.ndarray | None] = [None] * data.n
        scores = None
        if data.features is not None:
            scores, at_input = frame_maps(model, data.features, sigma)
            for row, i in enumerate(data.indices):
                maps[i] = to_image_geometry(at_input[row], spec, chunk.decode(i, chunk.read(i)).size)
        yield predict_chunk(model, data, precomputed=scores), maps, chunk


def score_maps(model: OODModel, images: Any, *, sigma: float = DEFAULT_SIGMA, chunk_size: int = 64,
               progress: bool | None = None) -> tuple[np.ndarray, list[np.ndarray | None] | np.ndarray]:
    """See :meth:`OODModel.score_maps`."""
    require_maps(model)
    if isinstance(images, Features):
        return frame_maps(model, images, sigma)
    scores, maps = [], []
    for part, part_maps, _ in predict_maps_iter(model, images, chunk_size=chunk_size, progress=progress,
                                                require_calibration=False, sigma=sigma):
        scores.append(part.scores)
        maps.extend(part_maps)
    return (np.concatenate(scores) if scores else np.zeros(0)), maps


# ------------------------------------------------------------------------------------------ overlays
# A built-in "jet" (matplotlib's anchor colours), for machines without matplotlib.
_JET = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.5, 1.0], [0.0, 1.0, 1.0], [0.5, 1.0, 0.5],
                 [1.0, 1.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (..., 3): matplotlib's colour map ``name`` when matplotlib is
    installed, else the built-in jet (any ``name``)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    try:
        import matplotlib

        rgb = matplotlib.colormaps[name](v)[..., :3]
    except (ImportError, KeyError):
        x = np.linspace(0.0, 1.0, len(_JET))
        rgb = np.stack([np.interp(v, x, _JET[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def heatmap_overlay(image: Image.Image, amap: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet",
                    value_range: tuple[float, float] | None = None) -> Image.Image:
    """The image with the colour-mapped map blended over it (``alpha`` = the map's weight).

    The map is normalised to [0, 1] by ``value_range`` (default: its own min and max over the
    pixels it covers); NaN pixels (outside a centre crop) show the image alone."""
    from PIL import Image as PILImage

    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    amap = np.asarray(amap, dtype=np.float64)
    if amap.shape != base.shape[:2]:
        raise ValueError(f"map {amap.shape} does not match the image {base.shape[:2]}")
    covered = np.isfinite(amap)
    if value_range is None:
        lo, hi = (float(amap[covered].min()), float(amap[covered].max())) if covered.any() else (0.0, 1.0)
    else:
        lo, hi = value_range
    norm = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    weight = np.where(covered, alpha, 0.0)[..., None]
    out = (1.0 - weight) * base + weight * colormap(norm, cmap).astype(np.float64)
    return PILImage.fromarray(np.round(out).astype(np.uint8))


def map_file_names(item_ids: Sequence[str]) -> list[str]:
    """One relative file stem per item (no extension), unique: image paths relative to the folder they
    share (``good/001.png`` -> ``good/001``), other ids with unsafe characters replaced."""
    paths = [PurePath(i) for i in item_ids]
    try:
        root = PurePath(os.path.commonpath([str(p.parent) for p in paths])) if paths else None
    except ValueError:  # absolute and relative ids mixed
        root = None
    names, seen = [], set()
    for path in paths:
        rel = path.relative_to(root) if root is not None else path
        parts = [_safe(p) for p in rel.with_suffix("").parts if p not in ("/", "..", ".")] or ["image"]
        stem = "/".join(parts)
        name, k = stem, 2
        while name in seen:
            name, k = f"{stem}-{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def _safe(part: str) -> str:
    text = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in part).strip(".")
    return text or "_"
