"""The deployable pipeline: backbone + detector + class head + conformal calibration.

* :class:`OODModel` — fit, calibrate, ``predict`` (per-image p-values, decisions at alpha, ID class,
  prediction sets, per-image errors), ``predict_iter`` (streaming), ``save`` / ``load``.
* :class:`ZeroShotDetector` / :class:`FewShotDetector` — convenience constructors over OODModel.
* :mod:`oodscope.pipeline.heads` — class-prediction heads.

See ``docs/pipeline.md`` and ``docs/threshold_guide.md``.
"""

from oodscope.pipeline.api import FewShotDetector, ZeroShotDetector
from oodscope.pipeline.heads import ClassHead, LinearProbeHead, LogitsHead, ZeroShotHead, load_head
from oodscope.pipeline.inputs import OODModelError, as_image_source
from oodscope.pipeline.model import OODModel
from oodscope.pipeline.predictions import PredictionRow, Predictions

__all__ = [
    "ClassHead",
    "FewShotDetector",
    "LinearProbeHead",
    "LogitsHead",
    "OODModel",
    "OODModelError",
    "PredictionRow",
    "Predictions",
    "ZeroShotDetector",
    "ZeroShotHead",
    "as_image_source",
    "load_head",
]
