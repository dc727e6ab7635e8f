"""The settings of an :class:`~oodscope.pipeline.model.OODModel`, defined once.

``oodscope fit`` / ``oodscope score`` build their options from :data:`MODEL_OPTIONS` (flag, type,
default, choices, range, help); a test checks every default and choice against
``OODModel.__init__``, so the command line and the Python API cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oodscope.detectors.presets import PRESET_NAMES
from oodscope.pipeline.fitting import HEADS, SET_METHODS
from oodscope.pipeline.model import DEFAULT_CALIBRATION_FRACTION

__all__ = ["MODEL_OPTIONS", "ModelOption", "model_option"]


@dataclass(frozen=True)
class ModelOption:
    """One setting: the keyword ``name`` of ``OODModel.__init__``, its command-line flag and how a
    value is checked. ``choices`` may hold None (shown as ``none``). ``low`` / ``high``: the allowed
    range; ``open_range``: the bounds themselves are not allowed."""

    name: str
    flag: str
    type: type
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    low: float | None = None
    high: float | None = None
    open_range: bool = False
    optional: bool = False  #: None is a valid value (e.g. set_alpha: "the same as alpha")

    def check(self, value: Any) -> Any:
        """``value`` converted to :attr:`type` and checked; raises ValueError with a message for people."""
        if value is None and (self.optional or None in (self.choices or ())):
            return None
        if self.choices is None:
            try:
                value = self.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.flag} must be {_article(self.type)}, got {value!r}") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{self.flag} {problem}")
        return value

    def problem(self, value: Any) -> str | None:
        """What is wrong with an already converted ``value`` (``"must be in (0, 1), got 1.5"``), or None."""
        if value is None and (self.optional or None in (self.choices or ())):
            return None
        if self.choices is not None:
            if value not in self.choices:
                shown = ", ".join(_show(c) for c in self.choices)
                return f"must be one of {shown}, got {_show(value)}"
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if not self.in_range(value):
            return f"must be {self.range_text()}, got {value!r}"
        return None

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_range and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.open_range and value == self.high)))

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in ({self.low:g}, {self.high:g})" if self.open_range else f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"> {self.low:g}" if self.open_range else f">= {self.low:g}"
        if self.high is not None:
            return f"< {self.high:g}" if self.open_range else f"<= {self.high:g}"
        return "a valid value"


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def _article(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text"}.get(kind, kind.__name__)


MODEL_OPTIONS: tuple[ModelOption, ...] = (
    # Checked by OODModel (an unknown name is refused there, with the valid ones listed), not by choices.
    ModelOption("preset", "--preset", str, None,
                f"named hyper-parameter preset of the method: {', '.join(PRESET_NAMES)} (default: the method's own "
                "defaults; --param values override the preset; `oodscope detectors --presets` lists them)",
                optional=True),
    ModelOption("alpha", "--alpha", float, 0.05,
                "per-image level: an ID image is flagged OOD with probability <= alpha",
                low=0.0, high=1.0, open_range=True),
    ModelOption("calibration_fraction", "--calibration-fraction", float, DEFAULT_CALIBRATION_FRACTION,
                "fraction of --id-dir held out for calibration (stratified by class, seeded)",
                low=0.0, high=1.0, open_range=True),
    ModelOption("prediction_sets", "--prediction-sets", str, "aps",
                "conformal prediction sets over the ID classes", choices=(*SET_METHODS, None)),
    ModelOption("set_alpha", "--set-alpha", float, None,
                "miscoverage of the prediction sets (default: the same as --alpha)",
                low=0.0, high=1.0, open_range=True, optional=True),
    ModelOption("head", "--head", str, "auto",
                "class head (auto: zero-shot head for zero-shot methods, else a linear probe when the ID "
                "images have classes)", choices=(*HEADS, None)),
    ModelOption("seed", "--seed", int, 0, "seed of the fit/calibration split", low=0),
    ModelOption("batch_size", "--batch-size", int, 64, "images per forward pass", low=1),
    ModelOption("num_workers", "--workers", int, None,
                "DataLoader worker processes for decoding (default: min(2, cores-1))", low=0, optional=True),
)


def model_option(name: str) -> ModelOption:
    """The entry of :data:`MODEL_OPTIONS` for the OODModel keyword ``name``."""
    for option in MODEL_OPTIONS:
        if option.name == name:
            return option
    raise KeyError(name)
