"""Offline catalogue: data sets that load from installed packages, and the Fashion-MNIST-OOD benchmark.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``), the project's Fashion-MNIST-OOD split of it,
scikit-learn's digits and the simulated textiles of ``conformal-clip-data`` (all of them as
``textiles``, each class as ``textiles/nominal``, ``textiles/local``, ``textiles/global``).
Registered when :mod:`oodscope.io.registry` is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from oodscope.io.realdata import (
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_ENV,
    FASHION_MNIST_ID_CLASSES,
    digits,
    fashion_mnist,
    fashion_mnist_ood,
    textiles,
)
from oodscope.io.registry.loaders import _offline
from oodscope.io.registry.specs import Benchmark, DatasetSpec, FileChecksum, register_benchmark, register_dataset
from oodscope.io.sources import ImageSource


def _fashion_file(rel: str) -> Path | None:
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEBIAN_DIR)
    for candidate in (folder / rel, folder / rel.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _fashion_loader(fn: Callable[[Path | None], ImageSource]):
    def load(root: Path | None) -> ImageSource:
        return fn(root)

    load.locate = _fashion_file  # type: ignore[attr-defined]
    return load


_FASHION_SRC = ("Xiao, Rasul & Vollgraf, 'Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning "
                "Algorithms', arXiv:1708.07747, 2017; read from Debian's dataset-fashion-mnist package")
_FASHION_HOW = ("apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), or put the four "
                "*-idx?-ubyte[.gz] files from github.com/zalandoresearch/fashion-mnist in a folder and set "
                "$OODSCOPE_FASHION_MNIST to it.")
# sha256 of the *decompressed* IDX content, computed here from Debian's package (its .gz files are
# recompressed, so upstream's published md5 of the .gz files does not apply to them).
_FASHION_SUMS = {
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}
_FASHION_SUM_SOURCE = ("computed in this project from the decompressed files of Debian's dataset-fashion-mnist "
                       "(not compared with upstream, which publishes md5 of its own .gz files only)")


def _fashion_checksums(split: str) -> tuple[FileChecksum, ...]:
    prefix = "t10k" if split == "test" else "train"
    return tuple(FileChecksum(rel, "sha256", digest, _FASHION_SUM_SOURCE, of="gunzip")
                 for rel, digest in _FASHION_SUMS.items() if rel.startswith(prefix))


def _register_offline() -> None:
    for split, n in (("test", 10_000), ("train", 60_000)):
        register_dataset(DatasetSpec(
            name=f"fashion-mnist/{split}", description=f"Fashion-MNIST {split} split, 10 classes, 28x28 greyscale",
            source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r, s=split: fashion_mnist(s)),
            expected_files=n, count_source="Fashion-MNIST paper", checksums=_fashion_checksums(split),
            checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
            tags=("offline", "fashion-mnist")))
    split_doc = ("ID = {T-shirt/top, Trouser, Dress, Sandal, Sneaker, Bag} (labels 0..5); "
                 "near-OOD = {Pullover, Coat, Shirt, Ankle boot}")
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/id", description=f"Fashion-MNIST-OOD ID test set (test split). {split_doc}",
        source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r: fashion_mnist_ood("test").id),
        expected_files=6_000, count_source="6 classes x 1,000 test images", checksums=_fashion_checksums("test"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "id")))
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/id-fit",
        description=f"Fashion-MNIST-OOD ID fit set: first 1,000 training images of each ID class. {split_doc}",
        source=_FASHION_SRC, licence="MIT",
        loader=_fashion_loader(lambda r: fashion_mnist_ood("train", per_class=1000).id),
        expected_files=6_000, count_source="6 classes x 1,000", checksums=_fashion_checksums("train"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "id-fit")))
    register_dataset(DatasetSpec(
        name="fashion-mnist-ood/near", description=f"Fashion-MNIST-OOD near-OOD test set. {split_doc}",
        source=_FASHION_SRC, licence="MIT", loader=_fashion_loader(lambda r: fashion_mnist_ood("test").near_ood),
        expected_files=4_000, count_source="4 classes x 1,000 test images", checksums=_fashion_checksums("test"),
        checksum_source=_FASHION_SUM_SOURCE, how_to_place=_FASHION_HOW, offline=True,
        tags=("offline", "fashion-mnist-ood", "near")))
    register_dataset(DatasetSpec(
        name="digits", description="scikit-learn's 8x8 handwritten digits (far-OOD for Fashion-MNIST-OOD)",
        source="scikit-learn load_digits (UCI optical recognition of handwritten digits test set)",
        licence="BSD-3-Clause (scikit-learn); data CC BY 4.0 (UCI)", loader=_offline(digits),
        expected_files=1_797, count_source="scikit-learn documentation", checksum_source="not applicable (in package)",
        how_to_place="pip install scikit-learn", offline=True, tags=("offline", "far")))
    register_dataset(DatasetSpec(
        name="textiles", description="Simulated 250x250 textile images: nominal / local defect / global defect "
        "(far-OOD for Fashion-MNIST-OOD)", source="PyPI package conformal-clip-data",
        licence="MIT", loader=_offline(textiles), expected_files=2_000, count_source="1,000 + 500 + 500 (package)",
        checksum_source="not applicable (in package)", how_to_place="pip install conformal-clip-data",
        offline=True, tags=("offline", "far")))

    # One entry per textile class (Subsets of `textiles` that keep its 3-class labels).
    for kind, n, what in (("nominal", 1_000, "nominal (defect-free)"), ("local", 500, "local defect"),
                          ("global", 500, "global defect")):
        register_dataset(DatasetSpec(
            name=f"textiles/{kind}", description=f"Simulated 250x250 textile images, {what} class only "
            f"({n:,} of the 2,000 of `textiles`; labels keep its 3 classes)", source="PyPI package conformal-clip-data",
            licence="MIT", loader=_offline(lambda k=kind: textiles(k)), expected_files=n,
            count_source=f"{n:,} {kind} images (package)", checksum_source="not applicable (in package)",
            how_to_place="pip install conformal-clip-data", offline=True, tags=("offline", "textiles")))


def _register_fashion_benchmark() -> None:
    register_benchmark(Benchmark(
        name="fashion-mnist-ood", description="Fashion-MNIST-OOD (offline): ID = 6 Fashion-MNIST classes; near-OOD = "
        "the 4 other classes; far-OOD = scikit-learn digits and simulated textiles",
        id="fashion-mnist-ood/id", id_fit="fashion-mnist-ood/id-fit", near={"fashion_near": "fashion-mnist-ood/near"},
        far={"digits": "digits", "textiles": "textiles"}, classes=lambda: list(FASHION_MNIST_ID_CLASSES),
        source=_FASHION_SRC))


_register_offline()
_register_fashion_benchmark()
