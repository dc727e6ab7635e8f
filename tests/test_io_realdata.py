"""Real-data readers (Fashion-MNIST IDX, conformal-clip-data textiles, sklearn digits) and the exporter."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from oodscope.io import ArrayDataset, DatasetError, FlatFolder, ImageFolder, Subset
from oodscope.io.realdata import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_ID_CLASSES,
    FASHION_MNIST_NEAR_OOD_CLASSES,
    digits,
    fashion_mnist,
    fashion_mnist_ood,
    read_idx,
    sanitize_class_name,
    textiles,
    write_image_folder,
)

FM_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
needs_fm = pytest.mark.skipif(
    not all((FASHION_MNIST_DEBIAN_DIR / f).is_file() for f in FM_FILES),
    reason=f"Fashion-MNIST test files absent from {FASHION_MNIST_DEBIAN_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)


def idx_bytes(arr: np.ndarray) -> bytes:
    """Reference IDX writer (uint8 only): magic 0x0000_08_<ndim>, big-endian dims, raw data."""
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_fm(folder: Path, n: int = 5, gz: bool = True, split: str = "t10k") -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


# -------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader_on_synthetic_files(tmp_path, gz):
    images, labels = write_fake_fm(tmp_path / "fm", gz=gz)
    ds = fashion_mnist("test", root=tmp_path / "fm")
    assert len(ds) == 5 and ds.class_names == list(FASHION_MNIST_CLASSES)
    assert ds.labels.tolist() == labels.tolist()
    assert (np.asarray(ds.load(3)) == images[3][..., None]).all()


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    write_fake_fm(tmp_path / "env", n=3, split="train")
    monkeypatch.setenv("OODSCOPE_FASHION_MNIST", str(tmp_path / "env"))
    assert len(fashion_mnist("train")) == 3


def test_fashion_mnist_missing_and_bad_magic(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val", root=tmp_path)
    write_fake_fm(tmp_path, n=4)
    # swap in a labels file where the images file should be: magic 0x801 instead of 0x803
    labels_file = (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(labels_file)
    with pytest.raises(DatasetError, match="magic"):
        fashion_mnist("test", root=tmp_path)


def test_read_idx_validates_size(tmp_path):
    data = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(DatasetError, match="bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DatasetError, match="not an IDX"):
        read_idx(tmp_path / "junk")
    (tmp_path / "ok").write_bytes(data)
    assert read_idx(tmp_path / "ok", expect_magic=0x803).shape == (2, 3, 3)


@needs_fm
def test_fashion_mnist_test_split_real(monkeypatch):
    monkeypatch.delenv("OODSCOPE_FASHION_MNIST", raising=False)
    ds = fashion_mnist("test")
    assert len(ds) == 10000
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    img = ds.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    # independent decode of the first image straight from the gzip file (16-byte IDX header)
    raw = gzip.decompress((FASHION_MNIST_DEBIAN_DIR / FM_FILES[0]).read_bytes())
    first = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    assert (np.asarray(img) == first[..., None]).all()


@needs_fm
def test_fashion_mnist_ood_split(monkeypatch):
    monkeypatch.delenv("OODSCOPE_FASHION_MNIST", raising=False)
    full = fashion_mnist("test")
    split = fashion_mnist_ood("test")
    assert len(split.id) == 6000 and len(split.near_ood) == 4000
    assert split.id_class_names == list(FASHION_MNIST_ID_CLASSES) == split.id.class_names
    small = fashion_mnist_ood("test", per_class=5)
    assert len(small.id) == 30 and len(small.near_ood) == 20
    assert np.bincount(small.id.labels, minlength=6).tolist() == [5] * 6
    # every ID item maps back to its original class through the item id, and items are first-n per class
    orig = [int(small.id.item_id(i).rsplit(":", 1)[1]) for i in range(len(small.id))]
    assert orig == sorted(orig)
    for i, k in enumerate(orig):
        assert FASHION_MNIST_CLASSES[full.labels[k]] == small.id_class_names[small.id.labels[i]]
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        want = np.flatnonzero(full.labels == c)[:5].tolist()
        if name in FASHION_MNIST_ID_CLASSES:
            assert [k for k in orig if full.labels[k] == c] == want
    ood_names = {small.near_ood.class_names[label] for label in small.near_ood.labels}
    assert ood_names == set(FASHION_MNIST_NEAR_OOD_CLASSES)
    assert (np.asarray(small.id.load(0)) == np.asarray(full.load(orig[0]))).all()


# --------------------------------------------------------------------------------------- textiles


def test_textiles_counts():
    pytest.importorskip("conformal_clip_data", reason="pip install conformal-clip-data")
    all_ = textiles()
    assert isinstance(all_, ImageFolder)
    assert all_.class_names == ["nominal", "local", "global"]
    assert np.bincount(all_.labels).tolist() == [1000, 500, 500]
    sizes = {k: len(textiles(k)) for k in ("nominal", "local", "global")}
    assert sizes == {"nominal": 1000, "local": 500, "global": 500}
    loc = textiles("local")
    assert isinstance(loc, Subset) and set(loc.labels.tolist()) == {1}
    img = loc.load(0)
    assert img.mode == "RGB" and img.size == (250, 250)
    with pytest.raises(ValueError):
        textiles("other")


def test_textiles_import_error_names_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "conformal_clip_data", None)
    with pytest.raises(ImportError, match="conformal-clip-data"):
        textiles()


# ----------------------------------------------------------------------------------------- digits


def test_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = digits()
    assert len(ds) == 1797
    assert ds.class_names == [str(k) for k in range(10)]
    assert ds.labels.tolist() == ref.target.tolist()
    assert (ds.images == np.rint(ref.images * 255 / 16).astype(np.uint8)).all()
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert np.asarray(ds.load(5)).shape == (8, 8, 3)


# ----------------------------------------------------------------------------------------- export


def test_write_image_folder_png_round_trip(tmp_path):
    src = Subset(digits(), np.arange(0, 60, 2))
    out = write_image_folder(src, tmp_path / "exp")
    back = ImageFolder(out, class_names=[sanitize_class_name(c) for c in src.class_names])
    assert len(back) == len(src)
    by_name = {Path(back.item_id(i)).name: i for i in range(len(back))}
    for i in range(len(src)):
        j = by_name[f"{i:06d}.png"]
        assert back.labels[j] == src.labels[i]
        assert (np.asarray(back.load(j)) == np.asarray(src.load(i))).all()


def test_write_image_folder_names_unlabeled_and_formats(tmp_path):
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    named = ArrayDataset(imgs, labels=[0, 1, -1], class_names=["T-shirt/top", ".hidden", "empty"])
    out = write_image_folder(named, tmp_path / "named")
    assert sorted(p.name for p in out.iterdir()) == ["000002.png", "T-shirt_top", "_hidden", "empty"]
    assert [p.name for p in (out / "T-shirt_top").iterdir()] == ["000000.png"]
    assert list((out / "empty").iterdir()) == []
    flat = write_image_folder(ArrayDataset(imgs), tmp_path / "flat", fmt="jpg", indices=[2, 0])
    assert sorted(p.name for p in flat.iterdir()) == ["000000.jpg", "000002.jpg"]
    assert len(FlatFolder(flat)) == 2
    bare = ArrayDataset(imgs, labels=[0, 10, 10])
    out = write_image_folder(bare, tmp_path / "bare")
    assert ImageFolder(out).class_names == [f"{k:02d}" for k in range(11)]
    assert ImageFolder(out).labels.tolist() == [0, 10, 10]
    with pytest.raises(ValueError, match="fmt"):
        write_image_folder(named, tmp_path / "x", fmt="exr")


def test_sanitize_class_name():
    assert sanitize_class_name("T-shirt/top") == "T-shirt_top"
    assert sanitize_class_name("Ankle boot") == "Ankle boot"
    assert sanitize_class_name("../etc") == "_._etc"
    assert sanitize_class_name("") == "_"


def test_committed_sample_matches_the_full_data_set():
    from oodscope.io.realdata import fashion_mnist_root, fashion_mnist_sample_root

    sample = fashion_mnist_sample_root()
    small = fashion_mnist_ood("test", per_class=60, root=sample)
    assert len(small.id) == 360 and len(small.near_ood) == 240
    if fashion_mnist_root(allow_sample=False) is None:
        pytest.skip("full Fashion-MNIST not installed; nothing to compare the sample with")
    full = fashion_mnist_ood("test", per_class=60)
    assert all(small.id.read(i) == full.id.read(i) for i in range(len(small.id)))
    np.testing.assert_array_equal(small.id.labels, full.id.labels)
