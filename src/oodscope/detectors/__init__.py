"""OOD detectors: one method per module, each registered by name (see :mod:`oodscope.detectors.base`).

Every module in this package is imported on first use of the package, so a new method only needs
its own file with a ``@register`` class.
"""

from __future__ import annotations

import importlib
import pkgutil

from oodscope.detectors.base import (
    Detector,
    DetectorError,
    create,
    register,
    registered,
)
from oodscope.detectors.persistence import load

_SKIP = {"base", "fitting", "kinds", "persistence"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _SKIP and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Detector", "DetectorError", "create", "load", "register", "registered"]
