"""Engines: where feature extraction and scoring run.

* ``local`` (the default everywhere): this process, with DataLoader workers for reading and decoding
  (:func:`oodscope.features.extract.extract`, :meth:`oodscope.pipeline.OODModel.predict`);
* ``ray``: a Ray cluster, through Ray Data (:mod:`oodscope.engines.ray`): the same per-image steps, the
  same feature-cache format and the same scores, spread over the cluster's CPUs and GPUs. Optional:
  ``pip install 'oodscope[ray]'``; without Ray installed, asking for it raises
  :class:`EngineUnavailable` (``oodscope ... --engine ray`` exits 2) and nothing else changes.

This layer sits above ``pipeline`` (it runs :class:`~oodscope.pipeline.OODModel` decisions on
workers) and below ``evaluation`` and ``cli``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any

ENGINES = ("local", "ray")
#: What ``--address`` accepts: ``auto`` (the cluster ``ray start`` runs on this machine), ``local`` (a
#: new one-machine cluster for this job), ``HOST:PORT`` (the head's GCS address) or ``ray://HOST:PORT``.
ADDRESS_PATTERN = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}|(ray://)?\[[0-9A-Fa-f:.]+\]:\d{1,5})$")
INSTALL_HINT = "pip install 'oodscope[ray]' (ray[data] >= 2.9)"


class EngineUnavailable(ImportError):
    """The engine asked for is not installed here (Ray for ``engine="ray"``)."""


def ray_available() -> bool:
    """Whether Ray can be imported here (without importing it)."""
    if "ray" in sys.modules:
        return sys.modules["ray"] is not None
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def check_engine(engine: str, address: str | None = None) -> None:
    """Refuse an unknown engine, an address without the Ray engine, a malformed address, or Ray missing
    (:class:`EngineUnavailable`); nothing is started."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if engine == "local":
        if address is not None:
            raise ValueError("an address is for the Ray engine (engine='ray' / --engine ray)")
        return
    if address is not None and not ADDRESS_PATTERN.match(address):
        raise ValueError(f"address {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    if not ray_available():
        raise EngineUnavailable(f"the Ray engine needs Ray Data, which is not installed here: {INSTALL_HINT}")


def extract(backbone: Any, data: Any, *, engine: str = "local", address: str | None = None, **options: Any):
    """Features of every image of ``data`` (any data spec of :func:`oodscope.io.resolve_images`) on an
    engine: ``"local"`` -> :func:`oodscope.features.extract.extract`, ``"ray"`` ->
    :func:`oodscope.engines.ray.extract` (``address``: the cluster). Both return an
    :class:`~oodscope.features.extract.ExtractionResult` and fill the same feature-cache format."""
    check_engine(engine, address)
    if engine == "ray":
        from oodscope.engines import ray as ray_engine

        return ray_engine.extract(backbone, data, address=address, **options)
    from oodscope.backbones import create_shared
    from oodscope.features.extract import extract as local_extract
    from oodscope.io import resolve_images

    backbone_options = options.pop("backbone_options", None) or {}
    if isinstance(backbone, str):
        backbone = create_shared(backbone, **backbone_options)
    return local_extract(backbone, resolve_images(data), **options)


def score(model_dir: Any, images: Any, out_dir: Any, *, engine: str = "local", address: str | None = None,
          **options: Any):
    """Score ``images`` with the saved model ``model_dir`` into Parquet partitions ``out_dir/part-*.parquet``
    (the columns of ``oodscope score --format csv``; a re-run resumes) on an engine: ``"local"`` ->
    :func:`oodscope.engines.local.score`, ``"ray"`` -> :func:`oodscope.engines.ray.score` (``address``:
    the cluster). Returns a :class:`~oodscope.engines.jobs.ScoreRun`; the files are the same."""
    check_engine(engine, address)
    if engine == "ray":
        from oodscope.engines import ray as ray_engine

        return ray_engine.score(model_dir, images, out_dir, address=address, **options)
    from oodscope.engines import local

    return local.score(model_dir, images, out_dir, **options)


def loopback_only() -> None:
    """Make a Ray cluster started by this process listen on 127.0.0.1 only (set before Ray is imported;
    Ray's own switch for one-machine clusters)."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


__all__ = ["ENGINES", "EngineUnavailable", "check_engine", "extract", "ray_available", "score"]
