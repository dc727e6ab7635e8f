"""The 1,000 ImageNet-1k class names in model-output order (data file built by scripts/build_imagenet_classes.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def _classes() -> list[dict]:
    return json.loads((files("oodscope") / "data" / "imagenet_classes.json").read_text())["classes"]


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """Short name (first WordNet lemma) of each class, e.g. ``'tench'``."""
    return [c["name"] for c in _classes()]


def imagenet_wnids() -> list[str]:
    return [c["wnid"] for c in _classes()]


def imagenet_lemmas() -> list[list[str]]:
    return [c["lemmas"] for c in _classes()]


@lru_cache(maxsize=1)
def _glosses() -> list[dict]:
    return json.loads((files("oodscope") / "data" / "imagenet_glosses.json").read_text(encoding="utf-8"))["classes"]


def imagenet_glosses() -> list[str]:
    """WordNet 3.0 definition of each class, e.g. ``'a close-fitting pullover shirt'`` (jersey);
    data file built by scripts/build_imagenet_glosses.py."""
    return [c["gloss"] for c in _glosses()]


def imagenet_hypernyms() -> list[list[str]]:
    """Hypernym path of each class (first lemma of each ancestor synset, nearest first, to ``entity``)."""
    return [list(c["hypernyms"]) for c in _glosses()]
