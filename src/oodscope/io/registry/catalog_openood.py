"""OpenOOD v1.5 catalogue: the ID splits and near-/far-OOD sets of its CIFAR-10, CIFAR-100, ImageNet-200
and ImageNet-1K benchmarks (Zhang et al., 2023), and those four benchmarks.

The data are read from OpenOOD's own data folder (``benchmark_imglist/`` + ``images_classic/`` +
``images_largescale/``), which OpenOOD distributes through Google Drive (placed by hand).
Registered when :mod:`oodscope.io.registry` is imported.
"""

from __future__ import annotations

from oodscope.io.registry.loaders import _imglist
from oodscope.io.registry.specs import Benchmark, DatasetSpec, register_benchmark, register_dataset

_OPENOOD_SRC = ("Zhang, Yang, Wang, Wang, Lin, Zhang, Sun, Du, Zhou, Zhang, Li, Liu, Chen & Li, 'OpenOOD v1.5: "
                "Enhanced Benchmark for Out-of-Distribution Detection', arXiv:2306.09301 / NeurIPS 2023 workshop "
                "(DistShift); splits as in github.com/Jingkang50/OpenOOD openood/evaluation_api/datasets.py")
_OPENOOD_HOW = ("Get OpenOOD's data folder with its own downloader (github.com/Jingkang50/OpenOOD: "
                "`bash scripts/download/download.sh`, or `python scripts/download/download.py` with gdown; the "
                "archives are on Google Drive, which needs a browser session or gdown) so that it holds "
                "benchmark_imglist/, images_classic/ and images_largescale/. Pass that folder as root, or put it "
                "at $OODSCOPE_DATA/openood. Check it with check_dataset(name).")
# Licences differ per source set; each OOD set keeps the terms of the data set it was sampled from.
_OPENOOD_LICENCE = {
    "cifar10": "CIFAR terms (no explicit licence; cite Krizhevsky 2009)",
    "cifar100": "CIFAR terms (no explicit licence; cite Krizhevsky 2009)",
    "tin": "Tiny ImageNet: ImageNet terms of access (non-commercial research)",
    "mnist": "MNIST: CC BY-SA 3.0 (LeCun, Cortes & Burges)",
    "svhn": "SVHN: non-commercial use only",
    "texture": "DTD: research use (Cimpoi et al. 2014)",
    "textures": "DTD: research use (Cimpoi et al. 2014)",
    "places365": "Places365: non-commercial research and education (MIT CSAIL terms)",
    "imagenet200": "ImageNet terms of access (non-commercial research)",
    "imagenet": "ImageNet terms of access (non-commercial research)",
    "ssb_hard": "ImageNet-21K terms of access (non-commercial research)",
    "ninco": "NINCO: images from several sources, see github.com/j-cb/NINCO",
    "inaturalist": "iNaturalist 2017 terms (non-commercial research)",
    "openimage_o": "Open Images: annotations CC BY 4.0, images CC BY 2.0 (per image)",
}
# Counts with a documented source; the others are defined by OpenOOD's image lists.
_OPENOOD_COUNTS = {
    ("imagenet", "ssb_hard"): (49_000, "pytorch-ood SSBHard docstring (OpenOOD's SSB-hard)"),
    ("imagenet", "ninco"): (5_879, "NINCO README (github.com/j-cb/NINCO)"),
    ("imagenet", "inaturalist"): (10_000, "MOS (Huang & Li, CVPR 2021) README"),
    ("imagenet", "openimage_o"): (15_869, "pytorch-ood OpenImagesO docstring (OpenOOD test list)"),
}
OPENOOD_SPLITS = {
    "cifar10": {"near": ("cifar100", "tin"), "far": ("mnist", "svhn", "texture", "places365")},
    "cifar100": {"near": ("cifar10", "tin"), "far": ("mnist", "svhn", "texture", "places365")},
    "imagenet200": {"near": ("ssb_hard", "ninco"), "far": ("inaturalist", "textures", "openimage_o")},
    "imagenet": {"near": ("ssb_hard", "ninco"), "far": ("inaturalist", "textures", "openimage_o")},
}


def _register_openood() -> None:
    for bench, split in OPENOOD_SPLITS.items():
        classic = bench.startswith("cifar")
        id_dir = "images_classic/" if classic else "images_largescale/"
        pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet200": "ImageNet-200",
                  "imagenet": "ImageNet-1K"}[bench]
        for part in ("train", "val", "test"):
            register_dataset(DatasetSpec(
                name=f"openood-v1.5/{bench}/{part}",
                description=f"OpenOOD v1.5 {pretty} ID {part} split (benchmark_imglist/{bench}/{part}_{bench}.txt)",
                source=_OPENOOD_SRC, licence=_OPENOOD_LICENCE[bench],
                loader=_imglist(f"benchmark_imglist/{bench}/{part}_{bench}.txt", id_dir),
                count_source="defined by OpenOOD's image list", how_to_place=_OPENOOD_HOW, folder="openood",
                tags=("openood-v1.5", bench, "id")))
        for kind, names in split.items():
            for ood in names:
                # Textures lives in images_classic/ for every benchmark (OpenOOD's DATA_INFO).
                data_dir = "images_classic/" if classic or ood == "textures" else "images_largescale/"
                n, count_src = _OPENOOD_COUNTS.get((bench, ood), (None, "defined by OpenOOD's image list"))
                register_dataset(DatasetSpec(
                    name=f"openood-v1.5/{bench}/{kind}/{ood}",
                    description=f"OpenOOD v1.5 {pretty} {kind}-OOD set {ood} "
                    f"(benchmark_imglist/{bench}/test_{ood}.txt)",
                    source=_OPENOOD_SRC, licence=_OPENOOD_LICENCE[ood],
                    loader=_imglist(f"benchmark_imglist/{bench}/test_{ood}.txt", data_dir),
                    expected_files=n, count_source=count_src, how_to_place=_OPENOOD_HOW, folder="openood",
                    tags=("openood-v1.5", bench, kind)))
        register_benchmark(Benchmark(
            name=f"openood-v1.5/{bench}", description=f"OpenOOD v1.5 {pretty}: near-OOD {', '.join(split['near'])}; "
            f"far-OOD {', '.join(split['far'])}",
            id=f"openood-v1.5/{bench}/test", id_fit=f"openood-v1.5/{bench}/train",
            near={o: f"openood-v1.5/{bench}/near/{o}" for o in split["near"]},
            far={o: f"openood-v1.5/{bench}/far/{o}" for o in split["far"]}, source=_OPENOOD_SRC))


_register_openood()
