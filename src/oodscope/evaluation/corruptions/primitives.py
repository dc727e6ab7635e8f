"""Array primitives of the corruptions: FFT convolution with reflected borders, blur kernels, the plasma
fractal, and conversions between float ``(H, W, C)`` arrays in [0, 1] and ``PIL`` images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


def convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of every channel of ``x`` (H, W, C) with ``kernel`` (kh, kw): same size,
    reflected borders (OpenCV's BORDER_REFLECT_101), by FFT."""
    kh, kw = kernel.shape
    h, w = x.shape[:2]
    # np.pad reflects repeatedly when the kernel is larger than the image.
    padded = np.pad(x, ((kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)), mode="reflect")
    full = fft_convolve(padded, kernel[..., None])
    # The "valid" part of the full convolution of the padded image is the same-size output.
    return full[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def fft_convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full linear convolution over the first two axes (zero padding); ``b`` broadcasts on the rest."""
    fh, fw = a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1
    spectrum = np.fft.rfft2(a, s=(fh, fw), axes=(0, 1)) * np.fft.rfft2(b, s=(fh, fw), axes=(0, 1))
    return np.fft.irfft2(spectrum, s=(fh, fw), axes=(0, 1))


def gaussian_kernel(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones((1, 1))
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Fraction of each pixel's area inside a disk of ``radius`` centred on the middle pixel."""
    r = max(float(radius), 1e-6)
    half = int(np.ceil(r - 0.5)) if r > 0.5 else 0
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = np.arange(-half, half + 1, dtype=np.float64)
    ys = (grid[:, None] + offsets[None, :]).reshape(-1)
    inside = (ys[:, None] ** 2 + ys[None, :] ** 2) <= r * r
    n = len(grid)
    k = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return k / k.sum()


def motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """One-sided line of Gaussian weights from the centre along ``angle_deg``, bilinearly splatted."""
    length = max(1, int(round(2 * radius)) + 1)
    t = np.arange(length, dtype=np.float64)
    w = np.exp(-(t**2) / (2 * max(sigma, 1e-6) ** 2))
    theta = np.deg2rad(angle_deg)
    xs, ys = t * np.cos(theta), -t * np.sin(theta)
    half = int(np.ceil(max(np.abs(xs).max(), np.abs(ys).max()))) + 1
    k = np.zeros((2 * half + 1, 2 * half + 1))
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy + half, x0 + dx + half), w * weight)
    return k / k.sum()


def plasma_fractal(rng: np.random.Generator, decay: float, size: int = 256) -> np.ndarray:
    """Diamond-square fractal on a periodic ``size`` x ``size`` grid (power of two), in [0, 1]."""
    grid = np.zeros((size, size))
    step = size
    amplitude = 100.0
    while step >= 2:
        half = step // 2
        # square step: centre of each square = mean of its 4 corners + noise
        corners = grid[0:size:step, 0:size:step]
        mean = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1))
        grid[half:size:step, half:size:step] = mean / 4 + rng.uniform(-amplitude, amplitude, corners.shape)
        # diamond step: each edge midpoint = mean of its 4 neighbours (2 corners, 2 centres) + noise
        corners = grid[0:size:step, 0:size:step]
        centres = grid[half:size:step, half:size:step]
        left_mid = (corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
        top_mid = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
        grid[half:size:step, 0:size:step] = left_mid + rng.uniform(-amplitude, amplitude, corners.shape)
        grid[0:size:step, half:size:step] = top_mid + rng.uniform(-amplitude, amplitude, corners.shape)
        step = half
        amplitude /= decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)


def to_pil(x: np.ndarray, mode: str) -> Image.Image:
    arr = np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def pil_roundtrip(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    mode = "L" if x.shape[2] == 1 else "RGB"
    out = np.asarray(fn(to_pil(x, mode)), dtype=np.float64) / 255.0
    return out[..., None] if out.ndim == 2 else out
