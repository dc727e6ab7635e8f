"""Seeded synthetic defects on real images: DRAEM-style Perlin-noise anomalies, scratches, holes, stains.

Perlin anomalies follow DRAEM (Zavrtanik, Kristan & Skočaj, "DRAEM -- A discriminatively trained
reconstruction embedding for surface anomaly detection", ICCV 2021; official code
github.com/VitjanZ/DRAEM, ``data_loader.py`` and ``perlin.py``): a 2-D Perlin noise with lattice
scales ``2**a x 2**b`` (a, b uniform in {0..5}), thresholded at 0.5, gives the mask M; the defect
is an anomaly-source texture A blended in with a factor beta ~ U(0, 0.8):

    I' = (1 - M) * I + M * ((1 - beta) * A + beta * I).

Departures from the official code: no imgaug augmentation of the source texture (a random crop of
it instead) and no random rotation of the noise (a random transpose / flips); a draw whose mask is
empty is redrawn (DRAEM returns the image unchanged). The scratches, holes and stains are simple
hand-made shapes (not from DRAEM). Everything is a pure function of the seed.

Every generator returns a :class:`SyntheticDefect`: the new uint8 RGB image and the boolean mask of
exactly the pixels it changed (outside the mask the image is bit-identical; inside, each pixel is
the stated blend of the original and the defect colour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEFECT_KINDS",
    "SyntheticDefect",
    "add_defect",
    "fade",
    "hole",
    "perlin_anomaly",
    "perlin_mask",
    "perlin_noise",
    "scratch",
    "stain",
]

DEFECT_KINDS: tuple[str, ...] = ("perlin", "scratch", "hole", "stain")
#: DRAEM's settings (data_loader.py): scales 2**[0, 6), threshold 0.5, beta ~ U(0, 0.8).
PERLIN_MAX_SCALE_EXP = 6
PERLIN_THRESHOLD = 0.5
BETA_MAX = 0.8


@dataclass(frozen=True)
class SyntheticDefect:
    """A defective image (H, W, 3) uint8, its mask (H, W) bool, the kind and the drawn parameters."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    params: dict = field(default_factory=dict)


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3 (zero first and second derivatives at 0 and 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells along each axis, in [-1, 1].

    Random unit gradients sit on a ``(res[0] + 1) x (res[1] + 1)`` lattice; pixel (i, j) is at lattice
    coordinates ``(i * res[0] / H, j * res[1] / W)``; the four corner dot products are blended with
    :func:`fade`, and the result is scaled by sqrt(2) (as DRAEM's ``rand_perlin_2d_np``) so that the
    range is [-1, 1]. The noise is 0 on every lattice point.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"shape and res must be positive, got {shape} and {res}")
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2.0) * (top * (1 - uy) + bottom * uy)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, *, threshold: float = PERLIN_THRESHOLD,
                max_tries: int = 100) -> tuple[np.ndarray, dict]:
    """DRAEM's mask: Perlin noise at scales ``2**a x 2**b`` (a, b in {0..5}) above ``threshold``.

    Redrawn until non-empty; a random transpose / flips stand in for DRAEM's rotation."""
    for _ in range(max_tries):
        a, b = (int(v) for v in rng.integers(0, PERLIN_MAX_SCALE_EXP, size=2))
        transpose = bool(rng.integers(2)) and shape[0] == shape[1]
        flips = rng.integers(2, size=2).astype(bool)
        noise = perlin_noise(shape, (2**a, 2**b), rng)
        if transpose:
            noise = noise.T
        if flips[0]:
            noise = noise[::-1]
        if flips[1]:
            noise = noise[:, ::-1]
        mask = noise > threshold
        if mask.any():
            return np.ascontiguousarray(mask), {"scale": (2**a, 2**b), "transpose": transpose,
                                                "flips": flips.tolist()}
    raise RuntimeError(f"no non-empty Perlin mask in {max_tries} draws (threshold {threshold})")


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"images must be (H, W) or (H, W, 3), got {a.shape}")
    return a


def _blend(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, keep: float | np.ndarray) -> np.ndarray:
    """``(1 - M) I + M (keep I + (1 - keep) colour)``, rounded; pixels outside the mask are copied."""
    out = image.copy()
    k = np.asarray(keep, dtype=np.float64)
    if k.ndim == 2:
        k = k[mask][:, None]
    src = colour[mask] if colour.ndim == 3 else colour
    mixed = k * image[mask].astype(np.float64) + (1.0 - k) * src
    out[mask] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def _source_crop(source: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    src = _rgb(source)
    h, w = shape
    if src.shape[0] < h or src.shape[1] < w:
        scale = max(h / src.shape[0], w / src.shape[1])
        size = (max(w, math.ceil(src.shape[1] * scale)), max(h, math.ceil(src.shape[0] * scale)))
        src = np.asarray(Image.fromarray(src).resize(size, Image.BILINEAR))
    y = int(rng.integers(0, src.shape[0] - h + 1))
    x = int(rng.integers(0, src.shape[1] - w + 1))
    return src[y : y + h, x : x + w].astype(np.float64)


def perlin_anomaly(image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> SyntheticDefect:
    """DRAEM's anomaly: a Perlin mask filled with ``source`` (another texture) at blending beta ~ U(0, 0.8)."""
    img = _rgb(image)
    mask, params = perlin_mask(img.shape[:2], rng)
    beta = float(rng.uniform(0.0, BETA_MAX))
    fill = _source_crop(source, img.shape[:2], rng)
    return SyntheticDefect(_blend(img, mask, fill, beta), mask, "perlin", {**params, "beta": beta})


def _contrast_colour(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour far from the masked pixels' mean (dark on bright parts, bright on dark ones)."""
    mean = image[mask].reshape(-1, 3).mean(axis=0)
    base = np.where(mean > 127, rng.uniform(0, 40, 3), rng.uniform(215, 255, 3))
    return base.astype(np.float64)


def scratch(image: np.ndarray, rng: np.random.Generator) -> SyntheticDefect:
    """A thin curved line (quadratic Bezier, 1-3 px wide) in a contrasting colour, fully opaque."""
    img = _rgb(image)
    h, w = img.shape[:2]
    pts = rng.uniform(0.1, 0.9, size=(3, 2)) * np.array([w, h])
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
    width = int(rng.integers(1, 4))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve], fill=255, width=width)
    mask = np.asarray(canvas) > 0
    colour = _contrast_colour(img, mask, rng)
    return SyntheticDefect(_blend(img, mask, colour, 0.0), mask, "scratch", {"width": width,
                                                                             "points": pts.tolist()})


def hole(image: np.ndarray, rng: np.random.Generator) -> SyntheticDefect:
    """A dark ellipse (3-10 % of the shorter side in radius), shaded darker towards its centre."""
    img = _rgb(image)
    h, w = img.shape[:2]
    side = min(h, w)
    ry, rx = (float(v) for v in rng.uniform(0.03, 0.10, size=2) * side + 1.5)
    cy, cx = float(rng.uniform(ry, h - ry)), float(rng.uniform(rx, w - rx))
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = r2 <= 1.0
    keep = 0.25 * r2  # 0 at the centre (black), 0.25 at the rim
    return SyntheticDefect(_blend(img, mask, np.zeros(3), keep), mask, "hole",
                           {"centre": (cy, cx), "radii": (ry, rx)})


def stain(image: np.ndarray, rng: np.random.Generator) -> SyntheticDefect:
    """A blob (a disc with a Perlin-wobbled rim) tinted with a random colour at opacity 0.4-0.8."""
    img = _rgb(image)
    h, w = img.shape[:2]
    side = min(h, w)
    radius = float(rng.uniform(0.08, 0.2) * side + 2)
    cy, cx = float(rng.uniform(radius, h - radius)), float(rng.uniform(radius, w - radius))
    wobble = perlin_noise((h, w), (4, 4), rng)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx) / radius
    mask = dist <= 1.0 + 0.35 * wobble
    if not mask.any():
        mask = dist <= 1.0
    colour = rng.uniform(0, 255, 3)
    opacity = float(rng.uniform(0.4, 0.8))
    return SyntheticDefect(_blend(img, mask, colour, 1.0 - opacity), mask, "stain",
                           {"centre": (cy, cx), "radius": radius, "colour": colour.tolist(), "opacity": opacity})


def add_defect(image: np.ndarray, kind: str, seed: int | np.random.Generator,
               source: np.ndarray | None = None) -> SyntheticDefect:
    """One defect of ``kind`` (one of :data:`DEFECT_KINDS`) on ``image``; ``source`` is needed for "perlin"."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if kind == "perlin":
        if source is None:
            raise ValueError("a perlin defect needs a source texture (source=...)")
        return perlin_anomaly(image, source, rng)
    makers = {"scratch": scratch, "hole": hole, "stain": stain}
    if kind not in makers:
        raise ValueError(f"kind must be one of {DEFECT_KINDS}, got {kind!r}")
    return makers[kind](image, rng)
