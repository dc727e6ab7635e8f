"""Worker-side helpers of tests/test_ray_engine.py (Ray worker processes import this module by name).

* :func:`install` — Ray's ``worker_process_setup_hook``: ``tiny-cnn`` and ``tiny-vl`` become creatable by
  spec in every worker process, as ``tiny_cli.install`` does in the test process;
* a fault armed by a file: when ``$OODSCOPE_TEST_FAULTS/forward.arm`` exists, the first worker process
  that runs the tiny CNN's forward for the second time takes the file (an atomic rename, so only one)
  and exits at once (``os._exit``: no clean-up, as a killed process);
* :class:`CrashOnRead` — an image source whose worker exits the same way when it reads one given item
  while its arm file exists (a killed CPU task).
"""

from __future__ import annotations

import os
from pathlib import Path

from oodscope.io import ImageSource

FAULTS_ENV = "OODSCOPE_TEST_FAULTS"


def _take(arm: Path) -> bool:
    """True for exactly one caller while ``arm`` exists (rename is atomic)."""
    try:
        os.rename(arm, arm.with_suffix(".fired"))
        return True
    except OSError:
        return False


def _crash_on_second_forward(backbone):
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return backbone
    original = backbone.encode_images
    calls = {"n": 0}

    def encode_images(batch):
        calls["n"] += 1
        if calls["n"] >= 2 and _take(Path(folder) / "forward.arm"):
            os._exit(17)
        return original(batch)

    backbone.encode_images = encode_images
    return backbone


def install() -> None:
    from tiny_cli import TINY_CLASSIFIER, TINY_VISION_LANGUAGE, TinyVisionLanguage
    from tiny_models import tiny_classifier

    from oodscope import backbones

    if getattr(backbones.create, "_ray_tiny", False):
        return
    real = backbones.create

    def create(spec: str, **options):
        if spec == TINY_CLASSIFIER:
            return _crash_on_second_forward(tiny_classifier(0))
        if spec == TINY_VISION_LANGUAGE:
            return TinyVisionLanguage()
        return real(spec, **options)

    create._ray_tiny = True
    backbones.create = create
    backbones.clear_shared()


class CrashOnRead(ImageSource):
    """``source``, except that the worker reading item ``index`` exits while ``arm`` exists (once)."""

    def __init__(self, source: ImageSource, index: int, arm: str | os.PathLike) -> None:
        self.source, self.index, self.arm = source, int(index), str(arm)
        self.labels, self.class_names = source.labels, source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def item_id(self, i: int) -> str:
        return self.source.item_id(i)

    def read(self, i: int) -> bytes:
        if int(i) == self.index and _take(Path(self.arm)):
            os._exit(18)
        return self.source.read(i)

    def decode(self, i: int, raw: bytes):
        return self.source.decode(i, raw)


def runtime_env_hook(runtime_env: dict | None) -> dict:
    """``RAY_RUNTIME_ENV_HOOK`` for a driver in a subprocess (the CLI with ``--address``): its job's workers
    find this module and install the tiny backbones, as the test process's own job does."""
    env = dict(runtime_env or {})
    variables = dict(env.get("env_vars") or {})
    variables.setdefault("PYTHONPATH", str(Path(__file__).parent))
    for name in (FAULTS_ENV,):
        if os.environ.get(name):
            variables.setdefault(name, os.environ[name])
    env["env_vars"] = variables
    env.setdefault("worker_process_setup_hook", "ray_tiny.install")
    return env
