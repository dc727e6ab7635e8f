"""Anomaly-detection catalogue: MVTec AD (Bergmann et al., 2019), VisA (Zou et al., 2022), MPDD (Jezek et
al., 2021), each as a whole and per category and split; the offline pixel-level benchmark ``synthetic-ad``
(real textures with synthetic defects, MVTec layout, built on demand) and the image-level textile
benchmark ``textiles-ad``. Labels are 0 good / 1 defective; per-category entries are
:class:`~oodscope.io.anomaly.AnomalySource` objects that also carry the masks.

Registered when :mod:`oodscope.io.registry` is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodscope.io.anomaly import AnomalySource, mvtec_category, visa_split
from oodscope.io.registry.specs import DatasetSpec, FileChecksum, data_root, register_dataset
from oodscope.io.sources import Concat, ImageSource

ANOMALIB_SOURCE = "documented in anomalib's data modules (github.com/openvinotoolkit/anomalib); not re-verified here"

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
#: Per category: train (all good), test good, test defective -- MVTec AD paper (CVPR 2019), Table 1; they
#: add up to the paper's totals (3,629 train, 467 good + 1,258 defective test images).
MVTEC_COUNTS = {"bottle": (209, 20, 63), "cable": (224, 58, 92), "capsule": (219, 23, 109), "carpet": (280, 28, 89),
                "grid": (264, 21, 57), "hazelnut": (391, 40, 70), "leather": (245, 32, 92),
                "metal_nut": (220, 22, 93), "pill": (267, 26, 141), "screw": (320, 41, 119), "tile": (230, 33, 84),
                "toothbrush": (60, 12, 30), "transistor": (213, 60, 40), "wood": (247, 19, 60),
                "zipper": (240, 32, 119)}
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
SYNTHETIC_AD = "synthetic-ad"


def _mvtec_category_dir(root: Path, category: str, inner: str = "mvtec_anomaly_detection") -> Path:
    for candidate in (root / category, root / inner / category):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"category folder {category!r} not found under {root}")


def _mvtec(category: str, split: str, inner: str = "mvtec_anomaly_detection"):
    """train: good images (label 0); test: 'good' = 0, every defect type = 1, masks from ground_truth/."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        return getattr(mvtec_category(_mvtec_category_dir(root, category, inner)), split)

    return load


def _mvtec_all(root: Path | None) -> ImageSource:
    return Concat([_mvtec(c, s)(root) for c in MVTEC_CATEGORIES for s in ("train", "test")])


def _visa(category: str | None, split: str | None):
    """VisA's 1-class split (``split_csv/1cls.csv``: object, split, label, image, mask); 0 normal, 1 anomaly."""

    def load(root: Path | None) -> ImageSource:
        assert root is not None
        return visa_split(root, category, split)

    return load


def _mpdd_all(root: Path | None) -> ImageSource:
    return Concat([_mvtec(c, s, "MPDD")(root) for c in MPDD_CATEGORIES for s in ("train", "test")])


def synthetic_ad_root() -> Path:
    """Where ``synthetic-ad`` is built on first use: ``$OODSCOPE_DATA/synthetic-ad`` (or the default data root)."""
    return data_root() / SYNTHETIC_AD


def _synthetic(category: str, split: str):
    def load(root: Path | None) -> ImageSource:
        from oodscope.io.synthetic_benchmark import ensure_synthetic_mvtec

        base = root if root is not None else ensure_synthetic_mvtec(synthetic_ad_root())
        return getattr(mvtec_category(base / category), split)

    return load


def _textiles_ad(part: str):
    """Textiles as an anomaly benchmark: even-numbered nominal files train, odd ones + defects test (0 / 1)."""

    def load(root: Path | None) -> ImageSource:
        from oodscope.io.realdata import textiles

        folder = textiles("all")
        labels = folder.labels
        assert labels is not None
        nominal = np.flatnonzero(labels == 0)
        if part == "train":
            idx = nominal[0::2]
        else:
            kinds = {"test": (1, 2), "test-local": (1,), "test-global": (2,)}[part]
            idx = np.concatenate([nominal[1::2], np.flatnonzero(np.isin(labels, kinds))])
        names = folder.class_names or []
        paths = [folder.paths[int(i)] for i in idx]
        ys = [0 if labels[i] == 0 else 1 for i in idx]
        types = ["good" if labels[i] == 0 else names[int(labels[i])] for i in idx]
        return AnomalySource(paths, ys, types, [None] * len(paths), name=f"textiles-ad/{part}", check=False)

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
        name="mvtec-ad", description="MVTec AD, 15 categories, train (defect-free) + test images (masks: load_mask)",
        loader=_mvtec_all, expected_files=5_354, count_source="MVTec AD paper: 3,629 train + 1,725 test",
        tags=("anomaly",), **common))
    for category in MVTEC_CATEGORIES:
        n_train, n_good, n_bad = MVTEC_COUNTS[category]
        for split, n, what in (("train", n_train, f"{n_train} good"),
                               ("test", n_good + n_bad, f"{n_good} good + {n_bad} defective")):
            register_dataset(DatasetSpec(
                name=f"mvtec-ad/{category}/{split}",
                description=f"MVTec AD {category} {split} images (0 = good, 1 = defect; masks in ground_truth/)",
                loader=_mvtec(category, split), expected_files=n,
                count_source=f"MVTec AD paper, Table 1: {what}", tags=("anomaly", "mvtec-ad"), **common))
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
    _register_mpdd()
    _register_offline_anomaly()


def _register_mpdd() -> None:
    common = {
        "source": "Jezek, Jonak, Burget, Dvorak & Skotak, 'Deep learning-based defect detection of metal parts: "
        "evaluating current methods in complex conditions', ICUMT 2021 (github.com/stepanje/MPDD)",
        "licence": "CC BY-NC-SA 4.0", "folder": "mpdd", "checksum_source": "unverified",
        "how_to_place": "Download MPDD by hand (link in github.com/stepanje/MPDD; an OneDrive folder, so no automatic "
        "download) and unpack it in the root ($OODSCOPE_DATA/mpdd) so that <category>/train/good, "
        "<category>/test/<defect> and <category>/ground_truth/<defect>/<name>_mask.png exist (MVTec AD's layout).",
        "count_source": "not verified here (counts are what the placed copy holds)",
    }
    register_dataset(DatasetSpec(
        name="mpdd", description="MPDD, 6 metal-part categories, train (good) + test images", loader=_mpdd_all,
        tags=("anomaly",), **common))
    for category in MPDD_CATEGORIES:
        for split in ("train", "test"):
            register_dataset(DatasetSpec(
                name=f"mpdd/{category}/{split}", description=f"MPDD {category} {split} images (0 = good, 1 = defect)",
                loader=_mvtec(category, split, "MPDD"), tags=("anomaly", "mpdd"), **common))


def _register_offline_anomaly() -> None:
    from oodscope.io.synthetic_benchmark import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFAULTS

    d = SYNTHETIC_DEFAULTS
    n_test = d["n_test_good"] + 4 * d["n_per_kind"]
    for category in SYNTHETIC_CATEGORIES:
        origin = ("conformal-clip-data's nominal textile images" if category == "textile"
                  else f"scikit-image's {category} photograph (skimage.data.{category})")
        for split, n in (("train", d["n_train"]), ("test", n_test)):
            register_dataset(DatasetSpec(
                name=f"{SYNTHETIC_AD}/{category}/{split}",
                description=f"Offline pixel-level benchmark, {category} {split}: {d['size']}px crops of {origin}"
                + ("" if split == "train" else f"; {d['n_test_good']} good + {d['n_per_kind']} each of perlin / "
                   "scratch / hole / stain defects with masks"),
                source="built here (oodscope.io.synthetic_benchmark) from real textures with DRAEM-style synthetic "
                "defects (Zavrtanik et al., ICCV 2021)",
                licence="BSD-3-Clause (scikit-image sample images) / MIT (conformal-clip-data)",
                loader=_synthetic(category, split), expected_files=n,
                count_source=f"synthetic_benchmark.SYNTHETIC_DEFAULTS (seed {d['seed']})",
                checksum_source="not applicable (built deterministically from installed packages)",
                how_to_place="pip install scikit-image conformal-clip-data; built on first use into "
                "$OODSCOPE_DATA/synthetic-ad", offline=True, tags=("offline", "anomaly", SYNTHETIC_AD)))
    parts = {"train": (500, "the 500 even-numbered nominal images (fit set)"),
             "test": (1_500, "the 500 odd-numbered nominal images + 500 local + 500 global defects"),
             "test-local": (1_000, "the 500 odd-numbered nominal images + 500 local defects"),
             "test-global": (1_000, "the 500 odd-numbered nominal images + 500 global defects")}
    for part, (n, what) in parts.items():
        register_dataset(DatasetSpec(
            name=f"textiles-ad/{part}", description=f"Textiles as an image-level anomaly benchmark: {what} "
            "(0 = nominal, 1 = defect; no masks)", source="PyPI package conformal-clip-data", licence="MIT",
            loader=_textiles_ad(part), expected_files=n, count_source="1,000 nominal + 500 + 500 (package)",
            checksum_source="not applicable (in package)", how_to_place="pip install conformal-clip-data",
            offline=True, tags=("offline", "anomaly", "textiles-ad")))


def anomaly_categories(family: str) -> list[tuple[str, str, str]]:
    """(category, fit set name, test set name) of an anomaly benchmark family: ``synthetic-ad``,
    ``textiles-ad``, ``mvtec-ad``, ``visa``, ``mpdd``."""
    if family == SYNTHETIC_AD:
        from oodscope.io.synthetic_benchmark import SYNTHETIC_CATEGORIES as cats
    elif family == "textiles-ad":
        return [(k, "textiles-ad/train", f"textiles-ad/test-{k}") for k in ("local", "global")]
    else:
        cats = {"mvtec-ad": MVTEC_CATEGORIES, "visa": VISA_CATEGORIES, "mpdd": MPDD_CATEGORIES}.get(family)
        if cats is None:
            raise KeyError(f"unknown anomaly family {family!r}; known: synthetic-ad, textiles-ad, mvtec-ad, visa, mpdd")
    return [(c, f"{family}/{c}/train", f"{family}/{c}/test") for c in cats]


_register_anomaly()
