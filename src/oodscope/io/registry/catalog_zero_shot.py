"""Zero-shot CLIP catalogue: the MCM protocol's ImageNet-1K validation set vs the iNaturalist / SUN /
Places subsets of MOS and the Describable Textures Dataset, and that benchmark.

Registered when :mod:`oodscope.io.registry` is imported.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from oodscope.io.files import ImageFolder
from oodscope.io.registry.catalog_anomaly import ANOMALIB_SOURCE
from oodscope.io.registry.loaders import _folder
from oodscope.io.registry.specs import Benchmark, DatasetSpec, FileChecksum, register_benchmark, register_dataset
from oodscope.io.sources import ImageSource, Relabel


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(wnid, short name) of each ImageNet-1K class in model-output order, from the packaged class file
    (the one :mod:`oodscope.backbones.imagenet` reads; read here so that io needs no higher layer)."""
    data = json.loads((files("oodscope") / "data" / "imagenet_classes.json").read_text())
    return tuple((c["wnid"], c["name"]) for c in data["classes"])


def _imagenet_class_names() -> list[str]:
    return [name for _, name in _imagenet_classes()]


def _imagenet_val(root: Path | None) -> ImageSource:
    assert root is not None
    folder = root / "val"
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} not found")
    source = ImageFolder(folder, class_names=[wnid for wnid, _ in _imagenet_classes()])
    return Relabel(source, source.labels, _imagenet_class_names())


_MOS_SRC = ("Huang & Li, 'MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space', CVPR 2021 "
            "(github.com/deeplearning-wisc/large_scale_ood); used for zero-shot CLIP by Ming et al., 'Delving into "
            "Out-of-Distribution Detection with Vision-Language Representations' (MCM), NeurIPS 2022")
_MOS_BASE = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/"
_DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
_DTD_SHA256 = "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"


def _register_zero_shot() -> None:
    register_dataset(DatasetSpec(
        name="imagenet-1k/val", description="ImageNet-1K validation set (50 images x 1,000 classes), the ID set of "
        "the zero-shot CLIP OOD protocol (MCM / NegLabel)",
        source="Russakovsky et al., 'ImageNet Large Scale Visual Recognition Challenge', IJCV 2015",
        licence="ImageNet terms of access (non-commercial research and education)", loader=_imagenet_val,
        expected_files=50_000, count_source="ILSVRC-2012 validation set",
        how_to_place="Download ILSVRC2012_img_val.tar from image-net.org (account needed) and arrange it as "
        "val/<wnid>/<image>.JPEG (one folder per class, e.g. with the valprep.sh script used by most "
        "PyTorch ImageNet examples) under $OODSCOPE_DATA/imagenet-1k or the root you pass.",
        folder="imagenet-1k", tags=("clip-zero-shot", "id")))
    for name, folder in (("inaturalist", "iNaturalist"), ("sun", "SUN"), ("places", "Places")):
        register_dataset(DatasetSpec(
            name=f"mos/{name}", description=f"MOS {folder} OOD subset for ImageNet-1K: 10,000 images of concepts "
            "not in ImageNet-1K", source=_MOS_SRC,
            licence={"inaturalist": "iNaturalist 2017 terms (non-commercial research)",
                     "sun": "SUN database terms (research)",
                     "places": "Places terms (non-commercial research and education)"}[name],
            loader=_folder(folder, labeled=False), expected_files=10_000, count_source="MOS README",
            urls={f"{folder}.tar.gz": f"{_MOS_BASE}{folder}.tar.gz"}, extract=True,
            how_to_place=f"wget {_MOS_BASE}{folder}.tar.gz and unpack it so that {folder}/ (images inside, possibly "
            "in sub-folders) is in the root ($OODSCOPE_DATA/mos by default). No checksum is published: unverified.",
            folder="mos", tags=("clip-zero-shot", "far")))
    register_dataset(DatasetSpec(
        name="dtd", description="Describable Textures Dataset, all 5,640 images (47 classes); the 'Textures' far-OOD "
        "set of the MOS / MCM ImageNet protocol",
        source="Cimpoi, Maji, Kokkinos, Mohamed & Vedaldi, 'Describing Textures in the Wild', CVPR 2014",
        licence="research use (see the DTD page)", loader=_folder("dtd/images"), expected_files=5_640,
        count_source="DTD: 47 classes x 120 images", checksums=(
            FileChecksum("dtd-r1.0.1.tar.gz", "sha256", _DTD_SHA256, ANOMALIB_SOURCE, required=False),),
        checksum_source=ANOMALIB_SOURCE, urls={"dtd-r1.0.1.tar.gz": _DTD_URL}, extract=True,
        how_to_place=f"wget {_DTD_URL} and unpack it in the root ($OODSCOPE_DATA/dtd) so that dtd/images/<class>/ "
        "exists.", folder="dtd", tags=("clip-zero-shot", "far")))
    register_benchmark(Benchmark(
        name="clip-zero-shot/imagenet-1k",
        description="Zero-shot OOD with a vision-language model (MCM protocol): ImageNet-1K val vs the MOS subsets of "
        "iNaturalist, SUN, Places and Textures; ID class names = the 1,000 ImageNet classes",
        id="imagenet-1k/val", near={},
        far={"inaturalist": "mos/inaturalist", "sun": "mos/sun", "places": "mos/places", "textures": "dtd"},
        classes=_imagenet_class_names, source=_MOS_SRC))


_register_zero_shot()
