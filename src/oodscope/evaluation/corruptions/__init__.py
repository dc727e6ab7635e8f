"""Common image corruptions at five severities, after ImageNet-C, with NumPy and Pillow only.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. The severity tables below are the ones of the paper's released
ImageNet-C generation script (for 224 x 224 images); the implementations are oodscope's own.

``corrupt(image, name, severity, seed)`` returns a new ``PIL.Image`` of the same size and mode
(``L``, ``RGB``; ``RGBA`` keeps its alpha; other modes come back as ``RGB``). Severity 0 is the
identity, severities 1..5 follow the tables. The result is a deterministic function of
``(image, name, severity, seed)``; the random draws depend on the seed only, not on the severity,
so the same noise field / blur angle / fog pattern is scaled up from one severity to the next
(common random numbers: severity curves are smooth, and noise strength is monotonic in severity).

Deviations from ImageNet-C (all documented in ``docs/audit.md``):

* Spatial sizes (blur radii and sigmas) are given for 224-pixel images; for other sizes they are
  multiplied by ``min(height, width) / 224`` so that a corruption covers the same fraction of the
  frame. :class:`CorruptedSource` upsamples images smaller than ``work_size`` (default 224) before
  corrupting them, which is what ImageNet-C does (it corrupts the 224-pixel network input).
* ``defocus_blur`` uses an anti-aliased disk (pixel area inside the circle, by 8x8 supersampling)
  smoothed by the table's Gaussian, instead of OpenCV's hard disk and 3x3 Gaussian.
* ``motion_blur``: a one-sided line kernel with Gaussian weights along a random angle in
  [-45, 45] degrees, as ImageMagick's ``-motion-blur radius x sigma`` that ImageNet-C calls.
* ``fog``: oodscope's diamond-square plasma fractal (256 px, the table's decay), cropped to 224 px and
  resized to the image.
* ``brightness`` / ``saturate`` change HSV value / saturation exactly but without a colour-space
  round trip; grey pixels stay grey under ``saturate`` (ImageNet-C turns them slightly red).
* Convolutions use reflected borders (OpenCV's default ``BORDER_REFLECT_101``), computed by FFT.
* Not implemented: glass blur, snow, frost, spatter, elastic transform.
"""

from oodscope.evaluation.corruptions.functions import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    FAMILIES,
    MAX_SEVERITY,
    REFERENCE_SIZE,
    corrupt,
)
from oodscope.evaluation.corruptions.source import CorruptedSource, encode_pixels

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "FAMILIES",
    "MAX_SEVERITY",
    "REFERENCE_SIZE",
    "CorruptedSource",
    "corrupt",
    "encode_pixels",
]
