"""Anomaly-detection catalogue: MVTec AD (Bergmann et al., 2019) and VisA (Zou et al., 2022), each as a
whole and per category and split, labelled 0 normal / 1 anomalous.

Registered when :mod:`oodscope.io.registry` is imported.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from oodscope.io.files import FileList, ImageFolder
from oodscope.io.registry.specs import DatasetSpec, FileChecksum, register_dataset
from oodscope.io.sources import Concat, DatasetError, ImageSource, Relabel

ANOMALIB_SOURCE = "documented in anomalib's data modules (github.com/openvinotoolkit/anomalib); not re-verified here"

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")


def _mvtec_category_dir(root: Path, category: str) -> Path:
    for candidate in (root / category, root / "mvtec_anomaly_detection" / category):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"MVTec AD category folder {category!r} not found under {root}")


def _mvtec(category: str, split: str):
    """train: defect-free images (label 0 'good'); test: 'good' = 0, every defect type = 1 ('defect')."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        folder = ImageFolder(_mvtec_category_dir(root, category) / split)
        good = folder.class_names.index("good") if "good" in folder.class_names else -1
        labels = np.where(folder.labels == good, 0, 1)
        return Relabel(folder, labels, ["good", "defect"])

    return load


def _mvtec_all(root: Path | None) -> ImageSource:
    return Concat([_mvtec(c, s)(root) for c in MVTEC_CATEGORIES for s in ("train", "test")])


def _visa(category: str | None, split: str | None):
    """VisA's 1-class split (``split_csv/1cls.csv``: object, split, label, image, mask); 0 normal, 1 anomaly."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        base = root / "VisA_20220922" if (root / "VisA_20220922").is_dir() else root
        table = base / "split_csv" / "1cls.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found")
        paths, labels = [], []
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                if (category is None or row["object"] == category) and (split is None or row["split"] == split):
                    paths.append(base / row["image"])
                    labels.append(0 if row["label"].strip().lower() == "normal" else 1)
        if not paths:
            raise DatasetError(f"{table}: no rows for object={category!r}, split={split!r}")
        return Relabel(FileList(paths), labels, ["normal", "anomaly"])

    return load



def _register_anomaly() -> None:
    mvtec_src = ("Bergmann, Fauser, Sattlegger & Steger, 'MVTec AD — A Comprehensive Real-World Dataset for "
                 "Unsupervised Anomaly Detection', CVPR 2019")
    mvtec_how = ("Download mvtec_anomaly_detection.tar.xz from www.mvtec.com/company/research/datasets/mvtec-ad "
                 "(a form must be filled in, so no automatic download) and unpack it in the root "
                 "($OODSCOPE_DATA/mvtec-ad) so that <category>/train/good and <category>/test/<defect> exist; keep "
                 "the archive there to have its checksum verified.")
    mvtec_sum = FileChecksum("mvtec_anomaly_detection.tar.xz", "sha256",
                             "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d", ANOMALIB_SOURCE,
                             required=False)
    common = {"source": mvtec_src, "licence": "CC BY-NC-SA 4.0", "how_to_place": mvtec_how, "folder": "mvtec-ad",
              "checksums": (mvtec_sum,), "checksum_source": ANOMALIB_SOURCE}
    register_dataset(DatasetSpec(
        name="mvtec-ad", description="MVTec AD, all 15 categories, train (defect-free) + test images (masks excluded)",
        loader=_mvtec_all, expected_files=5_354, count_source="MVTec AD paper: 3,629 train + 1,725 test",
        tags=("anomaly",), **common))
    for category in MVTEC_CATEGORIES:
        for split in ("train", "test"):
            register_dataset(DatasetSpec(
                name=f"mvtec-ad/{category}/{split}",
                description=f"MVTec AD {category} {split} images (0 = good, 1 = defect)",
                loader=_mvtec(category, split), count_source="not documented per category here",
                tags=("anomaly", "mvtec-ad"), **common))
    visa_url = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    visa_common = {
        "source": "Zou, Jeong, Pemula, Zhang & Dabeer, 'SPot-the-Difference Self-Supervised Pre-training for "
        "Anomaly Detection and Segmentation', ECCV 2022 (github.com/amazon-science/spot-diff)",
        "licence": "CC BY 4.0", "folder": "visa",
        "checksums": (FileChecksum("VisA_20220922.tar", "sha256",
                                   "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362", ANOMALIB_SOURCE,
                                   required=False),),
        "checksum_source": ANOMALIB_SOURCE, "urls": {"VisA_20220922.tar": visa_url}, "extract": True,
        "how_to_place": f"wget {visa_url} and unpack it in the root ($OODSCOPE_DATA/visa) so that split_csv/1cls.csv "
        "and <object>/Data/Images/ exist (the archive may be kept next to it for checksum verification).",
    }
    register_dataset(DatasetSpec(
        name="visa", description="VisA, 12 objects, all images of the 1-class split (0 normal, 1 anomaly)",
        loader=_visa(None, None), expected_files=10_821, count_source="VisA paper: 9,621 normal + 1,200 anomalous",
        tags=("anomaly",), **visa_common))
    for category in VISA_CATEGORIES:
        for split in ("train", "test"):
            register_dataset(DatasetSpec(
                name=f"visa/{category}/{split}", description=f"VisA {category} {split} images of the 1-class split",
                loader=_visa(category, split), count_source="defined by split_csv/1cls.csv",
                tags=("anomaly", "visa"), **visa_common))



_register_anomaly()
