"""Saving and loading detectors: parameters and fit information as JSON, fitted arrays as safetensors.

``detector.json`` holds the format and version, the registry name, the parameters (as given,
after any preset: see :mod:`oodscope.detectors.presets`), the preset's name, the fit information and
the id of the backbone whose features it was fitted on; ``detector.safetensors``
holds ``state_``. Nothing is unpickled: loading re-creates the detector by name from its parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from oodscope.detectors.base import Detector, DetectorError, create, registered

FORMAT = "oodscope-detector"
FORMAT_VERSION = 1
CONFIG_FILE = "detector.json"
STATE_FILE = "detector.safetensors"


def save_detector(detector: Detector, directory: str | os.PathLike, backbone_id: str | None = None) -> Path:
    """Write a detector's parameters (JSON) and fitted arrays (safetensors) to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": detector.name,
        "params": detector.get_params(),
        "preset": getattr(detector, "preset_", None),
        "fit_info": detector.fit_info_,
        "is_fitted": detector.is_fitted_,
        "backbone_id": backbone_id,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_.items()}
    save_file(tensors, str(directory / STATE_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def load(directory: str | os.PathLike, expected_backbone_id: str | None = None) -> Detector:
    """Load a detector written by :meth:`Detector.save`; refuses other formats and other backbones."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise DetectorError(f"{directory}: no {CONFIG_FILE}; not a saved oodscope detector")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise DetectorError(f"{config_path}: format {config.get('format')!r} is not {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise DetectorError(
            f"{config_path}: format version {config.get('format_version')} is not supported "
            f"(this oodscope reads version {FORMAT_VERSION})"
        )
    saved_backbone = config.get("backbone_id")
    if expected_backbone_id is not None and saved_backbone != expected_backbone_id:
        raise DetectorError(
            f"{directory}: detector was fitted on backbone {saved_backbone!r}, not {expected_backbone_id!r}"
        )
    # The resolved parameters are saved, so the preset is only recorded, not applied again; a file
    # written before presets existed has no "preset" key.
    cls = registered().get(config["name"])
    params = cls.upgrade_params(config["params"]) if cls is not None else config["params"]
    detector = create(config["name"], **params)
    detector.preset_ = config.get("preset")
    detector.state_ = load_file(str(directory / STATE_FILE))
    detector.fit_info_ = config.get("fit_info", {})
    detector.is_fitted_ = bool(config.get("is_fitted", False))
    return detector
