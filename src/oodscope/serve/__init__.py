"""``oodscope serve``: a scoring service with production monitoring and shift alarms.

``create_app(models, store=..., api_keys=..., config=...)`` builds the FastAPI app (see
``docs/serve.md``); ``oodscope serve MODEL_DIR`` runs it under uvicorn. The web parts need the
``serve`` extra (``pip install 'oodscope[serve]'``: FastAPI, uvicorn, SQLAlchemy, python-multipart,
psycopg); :mod:`oodscope.serve.martingale` (the alarm statistic) and :mod:`oodscope.serve.auth` need
nothing beyond oodscope's own dependencies.
"""

from __future__ import annotations

import importlib.util

#: Import name -> distribution, of what the service needs.
REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "sqlalchemy": "sqlalchemy", "multipart": "python-multipart"}


class MissingServeDependencies(ImportError):
    """The ``serve`` extra is not installed."""


def missing() -> list[str]:
    """Distributions of the ``serve`` extra that are not installed."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def require() -> None:
    """Raise :class:`MissingServeDependencies` with the install command when the extra is missing."""
    absent = missing()
    if absent:
        raise MissingServeDependencies(
            f"oodscope serve needs {', '.join(absent)}: pip install 'oodscope[serve]'"
        )


def create_app(*args, **kwargs):
    """The FastAPI app of the service (see :func:`oodscope.serve.app.create_app`)."""
    require()
    from oodscope.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["MissingServeDependencies", "create_app", "missing", "require"]
