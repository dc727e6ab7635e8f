"""What ``oodscope bench`` runs: :class:`BenchConfig` (from keyword arguments, a dict, TOML or YAML),
and OOD set flags. Data specs are turned into images by :func:`oodscope.io.resolve_images`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.io import describe_source


# ============================================================================ configuration
@dataclass
class OODSet:
    name: str
    data: Any  # registry name / built-in / path, or an ImageSource
    kind: str | None = None  # "near", "far" or None


@dataclass
class BenchConfig:
    """What to run. Data are data specs (:func:`oodscope.io.resolve_images`: registry names such as
    ``fashion-mnist/test`` or ``textiles/local``, paths, or ImageSource objects); backbones are spec
    strings or backbone objects."""

    # ``metadata`` is the command line's definition of each key (``oodscope bench`` builds its flags from
    # it): ``flag``, ``help``, and optionally ``metavar``, ``choices``, ``min`` (smallest value),
    # ``repeat`` (the flag may be given several times; it adds to the list), ``negate`` (a flag that
    # sets a boolean key to False) and ``syntax`` ("names": a,b,c or @FILE; "json"; "ood": an OOD set).
    backbones: list[Any] = field(default_factory=list, metadata={
        "flag": "--backbone", "metavar": "B", "repeat": True,
        "help": "backbone spec (repeatable; added to a --config file's list), e.g. effnet-lite0, conse:effnet-lite0"})
    #: Names, "all", or per backbone: ``{"effnet-lite0": ["msp", "vim"], "conse:effnet-lite0": ["mcm"]}``.
    detectors: list[str] | str | dict[str, list[str] | str] = field(default="all", metadata={
        "flag": "--detectors", "metavar": "NAMES",
        "help": "comma-separated detector names, or 'all' (`oodscope detectors` lists them)"})
    detector_params: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "flag": "--params", "metavar": "JSON", "syntax": "json",
        "help": 'detector parameters by detector name, as JSON: \'{"knn": {"k": 10}}\''})
    #: A named hyper-parameter preset (:mod:`oodscope.detectors.presets`); ``detector_params`` override it.
    preset: str | None = field(default=None, metadata={
        "flag": "--preset", "metavar": "NAME",
        "help": "named hyper-parameter preset for every detector: paper-imagenet, paper-cifar or openood-v1.5 "
        "(--params override it; a detector the preset does not list keeps its defaults)"})
    id: Any = field(default=None, metadata={"flag": "--id", "metavar": "DATA", "help": "ID test set"})
    id_fit: Any = field(default=None, metadata={
        "flag": "--id-fit", "metavar": "DATA", "help": "ID set the detectors are fitted on"})
    ood: list[OODSet] = field(default_factory=list, metadata={
        "flag": "--ood", "metavar": "[near:|far:]NAME=DATA", "repeat": True, "syntax": "ood",
        "help": "an OOD set (repeatable), tagged near or far for the averages"})
    benchmark: str | None = field(default=None, metadata={
        "flag": "--benchmark", "metavar": "NAME",
        "help": "a registered protocol, e.g. fashion-mnist-ood, openood-v1.5/cifar10, clip-zero-shot/imagenet-1k "
        "(fills --id, --id-fit, --ood, --classes)"})
    #: Anomaly mode (``oodscope.evaluation.bench_anomaly``): categories to fit on good images and test.
    anomaly: list[Any] = field(default_factory=list, metadata={
        "flag": "--anomaly", "metavar": "CATEGORIES", "repeat": True,
        "help": "anomaly mode (repeatable): a family (synthetic-ad, textiles-ad, mvtec-ad, visa, mpdd), "
        "family/category, or an MVTec-layout folder; runs the anomaly detectors instead of --id/--ood"})
    anomaly_gallery: int = field(default=4, metadata={
        "flag": "--anomaly-gallery", "metavar": "N", "min": 0,
        "help": "anomaly mode: the N highest- and N lowest-scoring test images per category and detector "
        "saved with their maps and masks for the report"})
    anomaly_eval_size: int | None = field(default=256, metadata={
        "flag": "--anomaly-eval-size", "metavar": "PX", "min": 1,
        "help": "anomaly mode: maps and masks compared at the image's size, the longer side at most PX"})
    classes: list[str] | None = field(default=None, metadata={
        "flag": "--classes", "metavar": "NAMES", "syntax": "names",
        "help": "ID class names for zero-shot detectors (default: the ID set's class names)"})
    limit: int | None = field(default=None, metadata={
        "flag": "--limit", "metavar": "N", "min": 1, "help": "at most N images per set, spread evenly through it"})
    fit_limit: int | None = field(default=None, metadata={
        "flag": "--fit-limit", "metavar": "N", "min": 1, "help": "at most N images in the fit set (default: --limit)"})
    output: str | os.PathLike = field(default="bench-results", metadata={
        "flag": ("-o", "--output"), "metavar": "DIR", "help": "output directory"})
    cache_dir: str | os.PathLike | None = field(default=None, metadata={
        "flag": "--cache", "metavar": "DIR",
        "help": "feature cache (default $OODSCOPE_CACHE or ~/.cache/oodscope/features)"})
    stream: bool = field(default=False, metadata={
        "flag": "--stream", "help": "score from the cache in batches (flat memory)"})
    stream_batch: int = field(default=4096, metadata={
        "flag": "--stream-batch", "metavar": "N", "min": 1, "help": "rows per batch with --stream"})
    batch_size: int = field(default=64, metadata={
        "flag": "--batch-size", "metavar": "N", "min": 1, "help": "images per forward pass"})
    num_workers: int | None = field(default=None, metadata={
        "flag": "--workers", "metavar": "N", "min": 0, "help": "DataLoader worker processes"})
    device: str | None = field(default=None, metadata={
        "flag": "--device", "help": "torch device (default: cuda if available, else cpu)"})
    backbone_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_based: bool = field(default=False, metadata={
        "flag": "--model-based", "help": "also run ODIN / GradNorm / RankFeat (slow)"})
    model_batch_size: int = field(default=32, metadata={
        "flag": "--model-batch-size", "metavar": "N", "min": 1,
        "help": "images per batch for the model-in-the-loop detectors"})
    id_accuracy: str = field(default="auto", metadata={
        "flag": "--id-accuracy", "choices": ("auto", "probe", "off"),
        "help": "ID accuracy: auto (a detector's or the backbone's own predictions, else a linear probe), "
        "probe (always the linear probe), off"})
    #: Read by the layer above (oodscope bench, the demo): write report.html from the results.
    report: bool = field(default=True, metadata={
        "flag": "--no-report", "negate": True, "help": "do not write report.html"})
    progress: bool = field(default=True, metadata={"flag": "--quiet", "negate": True, "help": "no progress output"})

    def __post_init__(self) -> None:
        if self.preset is not None:
            from oodscope.detectors.presets import check_preset

            check_preset(self.preset)  # an unknown name: a ValueError listing the presets

    def params_for(self, detector: str) -> dict[str, Any]:
        """``detector``'s parameters in this run: the preset's values, then ``detector_params`` on top."""
        from oodscope.detectors.presets import resolve_params

        return resolve_params(detector, self.preset, (self.detector_params or {}).get(detector, {}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        data = dict(data)
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        if isinstance(data.get("backbones"), str):
            data["backbones"] = [data["backbones"]]
        data["ood"] = [_ood_entry(o) for o in data.get("ood", []) or []]
        if isinstance(data.get("anomaly"), str):
            data["anomaly"] = [data["anomaly"]]
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (objects are shown by their repr / id)."""
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "ood":
                value = [{"name": o.name, "data": describe(o.data), "kind": o.kind} for o in value]
            elif name == "backbones":
                value = [b if isinstance(b, str) else getattr(b, "id", repr(b)) for b in value]
            elif name in ("id", "id_fit"):
                value = describe(value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            out[name] = value
        return out


def _ood_entry(entry: Any) -> OODSet:
    if isinstance(entry, OODSet):
        return entry
    if isinstance(entry, str):
        return parse_ood_flag(entry)
    if isinstance(entry, Mapping):
        return OODSet(name=str(entry["name"]), data=entry["data"], kind=entry.get("kind"))
    raise ValueError(f"cannot read OOD set {entry!r}: use 'NAME=DATA', 'near:NAME=DATA' or a table")


def parse_ood_flag(text: str) -> OODSet:
    """``NAME=DATA``, ``near:NAME=DATA`` or ``far:NAME=DATA`` (DATA alone: its name is DATA)."""
    kind = None
    head, sep, rest = text.partition(":")
    if sep and head in ("near", "far"):
        kind, text = head, rest
    name, sep, data = text.partition("=")
    if not sep:
        name, data = re.sub(r"[^A-Za-z0-9_.-]+", "_", text), text
    if not name or not data:
        raise ValueError(f"bad OOD set {text!r}: expected NAME=DATA")
    return OODSet(name=name, data=data, kind=kind)


def describe(value: Any) -> Any:
    """A data spec as people read it (a name or path as given; objects by what they hold)."""
    if value is None or isinstance(value, str | int | float):
        return value
    return describe_source(value)


def load_config(path: str | os.PathLike) -> BenchConfig:
    """A :class:`BenchConfig` from a TOML file (``tomllib``, or ``tomli`` on Python 3.10) or a YAML
    file (needs PyYAML). Relative paths in ``output`` / ``cache_dir`` stay relative to the cwd."""
    path = Path(path)
    text = path.read_bytes()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("reading a YAML configuration needs PyYAML (pip install pyyaml); "
                              "or write it as TOML") from None
        data = yaml.safe_load(text) or {}
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ImportError("reading TOML on Python 3.10 needs tomli (pip install tomli)") from None
        data = tomllib.loads(text.decode("utf-8"))
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the configuration must be a table of keys")
    return BenchConfig.from_dict(data)


# ============================================================================ data
def spread(n: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n)`` (all of them when ``limit`` is None or >= n).

    Evenly spaced rather than the first ``limit``: folder-backed sets are ordered by class, and the
    first rows would all be one class.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError("limit must be >= 1")
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


