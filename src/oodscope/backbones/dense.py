"""Dense feature maps from backbones: the ``dense_layers`` option, shared by every backbone.

A backbone asked for ``dense_layers`` returns ``Features.dense``: layer name -> (N, C, h, w) maps
(the input of image anomaly detectors, :mod:`oodscope.detectors._anomaly`). The option is

- ``True``: the backbone's default layers (EfficientNet-Lite: ``stage3`` + ``stage5``, strides 8 and
  16, the analogue of PatchCore's WideResNet ``layer2`` + ``layer3``; CLIP/SigLIP: ``value_path``);
- a comma-separated string (``"stage3,stage5"``, as the backbone spec ``effnet-lite0?dense=stage3,stage5``
  writes it) or a sequence of names;
- ``None`` / ``False`` / empty: no dense maps.

Maps are handed on as float16 (halves memory and the feature cache; detectors compute in float32),
and the layers are part of the feature-cache key (:func:`oodscope.features.extract.backbone_config`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: dtype of dense maps in Features produced by backbones and in the feature cache.
DENSE_DTYPE = np.float16


def dense_option(value: bool | str | Sequence[str] | None, default: Sequence[str], valid: Sequence[str] | None = None,
                 *, who: str = "backbone") -> tuple[str, ...]:
    """The ``dense_layers`` option as a tuple of layer names (empty: none), checked against ``valid``."""
    if value is None or value is False:
        return ()
    if value is True:
        names = tuple(default)
    elif isinstance(value, str):
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        if not names:  # "?dense" with no value: the default layers
            names = tuple(default)
    else:
        names = tuple(str(v) for v in value)
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: dense_layers {list(names)} names a layer twice")
    if valid is not None:
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"{who}: unknown dense layer(s) {unknown}; valid: {', '.join(valid)}")
    return names


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (N, P, D) in row-major patch order -> a (N, D, g, g) grid (P = g * g)."""
    n, p, d = tokens.shape
    g = int(round(p ** 0.5))
    if g * g != p:
        raise ValueError(f"{p} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(n, d, g, g)


def to_dense_array(t: torch.Tensor) -> np.ndarray:
    """A (N, C, h, w) tensor as a contiguous float16 array on the CPU (clipped to float16's range:
    an overflow would be an infinite value, which detectors refuse)."""
    limit = float(np.finfo(DENSE_DTYPE).max)
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).clamp(-limit, limit).numpy().astype(DENSE_DTYPE))
