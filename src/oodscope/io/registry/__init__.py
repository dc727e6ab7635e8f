"""The dataset registry (moving here from :mod:`oodscope.evaluation.datasets`)."""

from __future__ import annotations

from oodscope.evaluation.datasets import get_dataset, get_spec

__all__ = ["get_dataset", "known_name"]


def known_name(name: str) -> bool:
    try:
        get_spec(name)
    except KeyError:
        return False
    return True
