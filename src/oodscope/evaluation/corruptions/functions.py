"""The corruption functions, their ImageNet-C severity tables, and :func:`corrupt` (see the package's notes)."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from oodscope.evaluation.corruptions.primitives import (
    convolve,
    disk_kernel,
    fft_convolve,
    gaussian_kernel,
    motion_kernel,
    pil_roundtrip,
    plasma_fractal,
    resize_plane,
    to_pil,
)

REFERENCE_SIZE = 224  # ImageNet-C's tables are for 224 x 224 images

SeedLike = int | Sequence[int]

# Severity tables (index 0 = severity 1) from the ImageNet-C generation script.
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of additive noise on [0, 1] pixels
SHOT_NOISE = (60, 25, 12, 5, 3)  # Poisson rate per unit intensity (lower = noisier)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of salt-and-pepper values
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)  # std of multiplicative noise
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma in pixels at 224 px
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # (disk radius, alias-blur sigma)
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # (radius, sigma) of the line kernel
ZOOM_BLUR = (
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02),
    np.arange(1, 1.31, 0.03),
)  # zoom factors averaged with the image
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # (fog strength, fractal decay)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the per-channel mean
SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # S * a + b (1-2 desaturate)
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # downsampling factor


def _scale(x: np.ndarray) -> float:
    return min(x.shape[0], x.shape[1]) / REFERENCE_SIZE


# ----------------------------------------------------------------------------- corruptions
# Each takes x: float64 (H, W, C) in [0, 1], the severity index k (0..4) and a Generator;
# returns float64 (H, W, C) (clipped later).
def _gaussian_noise(x, k, rng):
    return x + rng.standard_normal(x.shape) * GAUSSIAN_NOISE[k]


def _shot_noise(x, k, rng):
    lam = SHOT_NOISE[k]
    return rng.poisson(np.clip(x, 0, 1) * lam) / lam


def _impulse_noise(x, k, rng):
    where = rng.random(x.shape)
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    hit = where < IMPULSE_NOISE[k]  # nested sets across severities
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _speckle_noise(x, k, rng):
    return x + x * rng.standard_normal(x.shape) * SPECKLE_NOISE[k]


def _gaussian_blur(x, k, rng):
    return convolve(x, gaussian_kernel(GAUSSIAN_BLUR[k] * _scale(x)))


def _defocus_blur(x, k, rng):
    radius, alias = DEFOCUS_BLUR[k]
    s = _scale(x)
    kernel = disk_kernel(radius * s)
    if alias * s > 0.05:
        kernel = np.clip(fft_convolve(kernel, gaussian_kernel(alias * s)), 0.0, None)
        kernel /= kernel.sum()
    return convolve(x, kernel)


def _motion_blur(x, k, rng):
    radius, sigma = MOTION_BLUR[k]
    angle = rng.uniform(-45, 45)
    s = _scale(x)
    return convolve(x, motion_kernel(radius * s, sigma * s, angle))


def _zoom_blur(x, k, rng):
    h, w = x.shape[:2]
    mode = "L" if x.shape[2] == 1 else "RGB"
    base = to_pil(x, mode)
    acc = x.copy()
    factors = ZOOM_BLUR[k]
    for z in factors:
        cw, ch = w / z, h / z
        left, top = (w - cw) / 2, (h - ch) / 2
        zoomed = base.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        arr = np.asarray(zoomed, dtype=np.float64) / 255.0
        acc += arr[..., None] if arr.ndim == 2 else arr
    return acc / (len(factors) + 1)


def _fog(x, k, rng):
    strength, decay = FOG[k]
    h, w = x.shape[:2]
    plasma = plasma_fractal(rng, decay)[:REFERENCE_SIZE, :REFERENCE_SIZE]
    if (h, w) != plasma.shape:
        plasma = resize_plane(plasma, w, h)
    peak = x.max()
    return (x + strength * plasma[..., None]) * peak / (peak + strength)


def _brightness(x, k, rng):
    v = x.max(axis=2, keepdims=True)  # HSV value
    new_v = np.clip(v + BRIGHTNESS[k], 0.0, 1.0)
    # Same hue and saturation, value raised: scale the pixel; black (hue-less) becomes grey new_v.
    ratio = np.divide(new_v, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, x * ratio, new_v)


def _contrast(x, k, rng):
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * CONTRAST[k] + mean


def _saturate(x, k, rng):
    if x.shape[2] == 1:
        return x  # a grey image has no saturation to change
    a, b = SATURATE[k]
    v = x.max(axis=2, keepdims=True)
    lo = x.min(axis=2, keepdims=True)
    s = np.divide(v - lo, v, out=np.zeros_like(v), where=v > 0)
    new_s = np.clip(s * a + b, 0.0, 1.0)
    # In HSV each channel is v - (v - c); the distances to v scale with the saturation.
    ratio = np.divide(new_s, s, out=np.zeros_like(s), where=s > 0)
    return np.where(s > 0, v - (v - x) * ratio, x)


def _jpeg_compression(x, k, rng):
    def roundtrip(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY[k])
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert(img.mode)

    return pil_roundtrip(x, roundtrip)


def _pixelate(x, k, rng):
    h, w = x.shape[:2]
    c = PIXELATE[k]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return pil_roundtrip(
        x, lambda img: img.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
    )


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)
#: ImageNet-C families of the implemented corruptions.
FAMILIES: dict[str, str] = {
    "gaussian_noise": "noise", "shot_noise": "noise", "impulse_noise": "noise", "speckle_noise": "noise",
    "gaussian_blur": "blur", "defocus_blur": "blur", "motion_blur": "blur", "zoom_blur": "blur",
    "fog": "weather", "brightness": "weather",
    "contrast": "digital", "saturate": "digital", "jpeg_compression": "digital", "pixelate": "digital",
}
MAX_SEVERITY = 5


def check_corruption(name: str, severity: int) -> None:
    """Raise ``ValueError`` unless ``name`` is an implemented corruption and ``severity`` is in 0..5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTION_NAMES)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an integer in 0..{MAX_SEVERITY}, got {severity!r}")


def _rng(name: str, seed: SeedLike) -> np.random.Generator:
    entropy = [int(s) for s in ([seed] if isinstance(seed, int | np.integer) else seed)]
    # The corruption's name is mixed in so that different corruptions draw independent fields.
    return np.random.default_rng(entropy + [zlib.crc32(name.encode())])


def corrupt(image: Image.Image, name: str, severity: int, seed: SeedLike = 0) -> Image.Image:
    """``image`` with corruption ``name`` at ``severity`` (0 = unchanged copy, 1..5 = ImageNet-C).

    Deterministic in ``seed`` (an int or a sequence of ints); same size and mode as ``image``
    (``L``/``RGB``; ``RGBA`` keeps its alpha channel; other modes are returned as ``RGB``).
    """
    check_corruption(name, severity)
    if severity == 0:
        return image.copy()
    alpha = None
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        work = image.convert("RGB")
    elif image.mode in ("L", "RGB"):
        work = image
    else:
        work = image.convert("RGB")
    x = np.asarray(work, dtype=np.float64) / 255.0
    if x.ndim == 2:
        x = x[..., None]
    out = to_pil(CORRUPTIONS[name](x, int(severity) - 1, _rng(name, seed)), work.mode)
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(alpha)
    return out
