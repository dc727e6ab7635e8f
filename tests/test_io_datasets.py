"""Dataset sources: folder walking, list files, arrays, Subset/Concat/Relabel, open_dataset."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodscope.io import (
    ArrayDataset,
    Concat,
    DatasetError,
    FileList,
    FlatFolder,
    ImageFolder,
    ImageSource,
    Relabel,
    Subset,
    open_dataset,
)
from oodscope.io.images import ImageLoadError


def put(path: Path, value: int) -> Path:
    """Write a 4x4 PNG whose pixels all equal ``value`` (so a loaded item identifies its file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path, format="PNG")
    return path


def value(src: ImageSource, i: int) -> int:
    a = np.asarray(src.load(i))
    assert a.shape == (4, 4, 3)
    return int(a[0, 0, 0])


def rel(src, root: Path) -> list[str]:
    return [Path(src.item_id(i)).relative_to(root).as_posix() for i in range(len(src))]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    put(root / "b" / "x.png", 1)
    put(root / "a" / "2.png", 2)
    put(root / "a" / "10.png", 3)
    put(root / "a" / "sub" / "deep.jpg", 4)
    put(root / "a" / ".hidden.png", 5)
    put(root / "a" / ".hid" / "in_hidden_dir.png", 6)
    put(root / ".cache" / "y.png", 7)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "UPPER.PNG").write_bytes((root / "b" / "x.png").read_bytes())
    return root


# ----------------------------------------------------------------------------------------- folders


def test_image_folder_sorted_labels_and_hidden_skipped(tree):
    ds = ImageFolder(tree)
    assert ds.class_names == ["a", "b"]
    assert rel(ds, tree) == ["a/10.png", "a/2.png", "a/UPPER.PNG", "a/sub/deep.jpg", "b/x.png"]
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 0, 0, 1]
    assert ds.item_id(0) == str(tree / "a" / "10.png")
    assert ds.read(4) == (tree / "b" / "x.png").read_bytes()
    assert value(ds, 0) == 3 and value(ds, -1) == 1


def test_image_folder_given_class_order(tree):
    ds = ImageFolder(tree, class_names=["b", "a"])
    assert ds.class_names == ["b", "a"]
    assert rel(ds, tree)[0] == "b/x.png"
    assert ds.labels.tolist() == [0, 1, 1, 1, 1]
    with pytest.raises(DatasetError, match="missing"):
        ImageFolder(tree, class_names=["a", "zzz"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_flat_folder(tree):
    ds = FlatFolder(tree)
    assert ds.labels is None and ds.class_names is None
    assert rel(ds, tree) == ["a/10.png", "a/2.png", "a/UPPER.PNG", "a/sub/deep.jpg", "b/x.png"]
    put(tree / "top.png", 9)
    assert rel(FlatFolder(tree, recursive=False), tree) == ["top.png"]
    (tree.parent / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        FlatFolder(tree.parent / "nothing")


symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")


@symlinks
def test_symlink_outside_root_needs_follow(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    put(root / "c" / "own.png", 1)
    put(outside / "o.png", 2)
    put(outside / "dir" / "od.png", 3)
    os.symlink(outside / "o.png", root / "c" / "link.png")
    os.symlink(outside / "dir", root / "c" / "linkdir")
    os.symlink(root / "c" / "own.png", root / "c" / "inside_link.png")  # inside the root: allowed
    assert rel(FlatFolder(root), root) == ["c/inside_link.png", "c/own.png"]
    followed = FlatFolder(root, follow_symlinks=True)
    assert rel(followed, root) == ["c/inside_link.png", "c/link.png", "c/linkdir/od.png", "c/own.png"]
    assert [value(followed, i) for i in range(4)] == [1, 2, 3, 1]
    # a class folder that is itself a link outside the root
    os.symlink(outside, root / "d")
    assert ImageFolder(root).class_names == ["c"]
    assert ImageFolder(root, follow_symlinks=True).class_names == ["c", "d"]
    with pytest.raises(DatasetError, match="follow_symlinks"):
        ImageFolder(root, class_names=["c", "d"])


@symlinks
def test_symlink_loops_terminate(tmp_path):
    root = tmp_path / "root"
    put(root / "a" / "1.png", 1)
    os.symlink(root / "a", root / "a" / "loop")  # a -> a
    os.symlink(root, root / "a" / "up")  # a -> root
    os.symlink(root / "a" / "self", root / "a" / "self")  # link to itself
    os.symlink(tmp_path, root / "a" / "escape")  # outside, and contains root itself
    os.symlink(root / "top_self", root / "top_self")  # a looping link where class folders are listed
    result: dict = {}

    def run():
        result["flat"] = rel(FlatFolder(root), root)
        result["follow"] = rel(FlatFolder(root, follow_symlinks=True), root)
        result["folder"] = rel(ImageFolder(root), root)
        result["open"] = type(open_dataset(root)).__name__

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "folder walk did not terminate on symlink loops"
    assert result["flat"] == ["a/1.png"]
    assert result["folder"] == ["a/1.png"]
    assert result["follow"] == ["a/1.png"]
    assert result["open"] == "ImageFolder"


# ------------------------------------------------------------------------------------------ lists


def test_file_list_txt_int_labels_relative_to_list_file(tree):
    lst = tree / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text("# header comment\n../a/2.png 0\n\n../b/x.png,1\n../a/10.png\t-1\n")
    ds = FileList(lst)
    assert ds.labels.tolist() == [0, 1, -1]
    assert ds.class_names is None
    assert [value(ds, i) for i in range(3)] == [2, 1, 3]


def test_file_list_txt_names_and_spaces(tree):
    put(tree / "with space" / "my img, v2.png", 8)
    lst = tree / "l.txt"
    lst.write_text("a/2.png cat\nb/x.png, dog\nwith space/my img, v2.png\na/10.png  cat\n")
    ds = FileList(lst)
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 1, -1, 0]
    assert value(ds, 2) == 8
    named = FileList(lst, class_names=["dog", "cat"])
    assert named.labels.tolist() == [1, 0, -1, 1]


def test_file_list_root_overrides_list_folder(tree, tmp_path):
    lst = tmp_path / "elsewhere.txt"
    lst.write_text("a/2.png\nb/x.png\n")
    ds = FileList(lst, root=tree)
    assert ds.labels is None
    assert [value(ds, i) for i in range(2)] == [2, 1]


def test_file_list_csv(tree):
    (tree / "names.csv").write_text("path,label,extra\na/2.png,cat,x\nb/x.png,dog,y\na/10.png,,z\n")
    ds = FileList(tree / "names.csv")
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 1, -1]
    (tree / "ints.csv").write_text("Label,Path\n3,a/2.png\n0,b/x.png\n")
    ds = FileList(tree / "ints.csv")
    assert ds.labels.tolist() == [3, 0]
    assert [value(ds, i) for i in range(2)] == [2, 1]
    (tree / "nolabel.csv").write_text("path\nb/x.png\n")
    assert FileList(tree / "nolabel.csv").labels is None
    (tree / "bad.csv").write_text("file,label\nb/x.png,1\n")
    with pytest.raises(DatasetError, match="path"):
        FileList(tree / "bad.csv")


def test_file_list_errors(tree, tmp_path):
    (tmp_path / "mixed.txt").write_text("a/2.png 1\nb/x.png dog\n")
    with pytest.raises(DatasetError, match="mix"):
        FileList(tmp_path / "mixed.txt", root=tree)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match="empty"):
        FileList(tmp_path / "empty.txt")
    with pytest.raises(DatasetError, match="does not exist"):
        FileList(tmp_path / "missing.txt")
    ds = FileList(["nope.png"], root=tmp_path)
    with pytest.raises(ImageLoadError) as ei:
        ds.load(0)
    assert ei.value.path == str(tmp_path / "nope.png")


def test_file_list_python_paths(tree, monkeypatch):
    ds = FileList([tree / "b" / "x.png", "a/2.png"], root=tree)
    assert [value(ds, i) for i in range(2)] == [1, 2]
    monkeypatch.chdir(tree / "a")
    ds = FileList(["2.png"])
    assert ds.item_id(0) == str(tree / "a" / "2.png")


# ----------------------------------------------------------------------------------------- arrays


def test_array_dataset_round_trip():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 6, 4, 3), dtype=np.uint8)
    g = ArrayDataset(grey, labels=[0, 1, -1], class_names=["x", "y"], name="g")
    assert len(g) == 3 and g.item_id(1) == "g:1" and g.labels.tolist() == [0, 1, -1]
    for i in range(3):
        img = g.load(i)
        assert img.mode == "RGB" and img.size == (7, 5)
        assert (np.asarray(img) == grey[i][..., None]).all()
    c = ArrayDataset(rgb)
    assert c.labels is None and c.item_id(0) == "array:0"
    assert all((np.asarray(c.load(i)) == rgb[i]).all() for i in range(2))


def test_array_dataset_bytes_are_content_keys():
    a = np.zeros((3, 4, 4), np.uint8)
    a[1, 0, 0] = 1
    ds = ArrayDataset(a)
    assert ds.read(0) == ds.read(2) != ds.read(1)
    # same pixels with a different shape must not collide
    def first(shape):
        return ArrayDataset(np.zeros(shape, np.uint8)).read(0)

    assert first((1, 2, 8)) != first((1, 4, 4)) != first((1, 4, 4, 3))
    assert first((1, 2, 8)) != first((1, 4, 4, 3))
    raw = ds.read(0)
    with pytest.raises(ImageLoadError, match="array:0"):
        ds.decode(0, raw[:-1])
    with pytest.raises(ImageLoadError):
        ds.decode(0, b"\x89PNG" + raw[4:])


def test_array_dataset_validation():
    with pytest.raises(DatasetError, match="uint8"):
        ArrayDataset(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DatasetError, match="shape"):
        ArrayDataset(np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="out of range"):
        ArrayDataset(np.zeros((2, 4, 4), np.uint8), labels=[0, 2], class_names=["a", "b"])
    with pytest.raises(DatasetError, match="shape"):
        ArrayDataset(np.zeros((2, 4, 4), np.uint8), labels=[0])
    with pytest.raises(DatasetError, match="empty"):
        ArrayDataset(np.zeros((0, 4, 4), np.uint8))
    ds = ArrayDataset(np.zeros((2, 4, 4, 1), np.uint8))
    assert ds.load(1).size == (4, 4)
    with pytest.raises(IndexError):
        ds.read(2)
    with pytest.raises(TypeError):
        ds.read(1.0)


# ---------------------------------------------------------------------------------------- helpers


def _arr(values, labels=None, names=None, name="arr"):
    imgs = np.asarray(values, np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    return ArrayDataset(imgs, labels, names, name)


def test_subset():
    base = _arr([10, 20, 30, 40], labels=[0, 1, 0, 1], names=["p", "q"])
    s = Subset(base, np.array([3, 0, -1]))
    assert len(s) == 3
    assert [value(s, i) for i in range(3)] == [40, 10, 40]
    assert s.labels.tolist() == [1, 0, 1]
    assert s.class_names == ["p", "q"]
    assert s.item_id(0) == "arr:3"
    assert s.read(1) == base.read(0)
    with pytest.raises(IndexError):
        Subset(base, [4])
    with pytest.raises(DatasetError):
        Subset(base, [True, False, True, False])
    assert Subset(_arr([1, 2]), [1]).labels is None


def test_concat_merges_classes_by_name_and_unlabeled_is_minus_one():
    a = _arr([1, 2], labels=[0, 1], names=["cat", "dog"], name="a")
    b = _arr([3, 4, 5], labels=[0, 1, -1], names=["dog", "fox"], name="b")
    u = _arr([6], name="u")
    c = Concat([a, u, b])
    assert len(c) == 6
    assert c.class_names == ["cat", "dog", "fox"]
    assert c.labels.tolist() == [0, 1, -1, 1, 2, -1]
    assert [value(c, i) for i in range(6)] == [1, 2, 6, 3, 4, 5]
    assert [c.item_id(i) for i in (0, 2, 3, -1)] == ["a:0", "u:0", "b:0", "b:2"]
    assert Concat([u, u]).labels is None
    bare = _arr([7], labels=[4])
    assert Concat([bare, u]).labels.tolist() == [4, -1] and Concat([bare, u]).class_names is None
    with pytest.raises(DatasetError, match="mix"):
        Concat([a, bare])
    with pytest.raises(IndexError):
        c.load(6)


def test_relabel():
    base = _arr([1, 2, 3], labels=[0, 1, 2], names=["x", "y", "z"])
    r = Relabel(base, [1, 0, -1], ["y", "x"])
    assert r.labels.tolist() == [1, 0, -1] and r.class_names == ["y", "x"]
    assert r.item_id(2) == "arr:2" and value(r, 2) == 3
    assert Relabel(base, None).labels is None


# ------------------------------------------------------------------------------------ open_dataset


def test_open_dataset_heuristics(tree, tmp_path):
    assert isinstance(open_dataset(tree), ImageFolder)  # no direct images, class sub-folders
    assert isinstance(open_dataset(str(tree / "a")), FlatFolder)  # direct images
    put(tree / "top.png", 9)
    mixed = open_dataset(tree)  # direct images + sub-folders -> flat, nothing lost
    assert isinstance(mixed, FlatFolder) and len(mixed) == 6
    single = open_dataset(tree / "top.png")
    assert isinstance(single, FileList) and len(single) == 1 and value(single, 0) == 9
    (tree / "l.txt").write_text("top.png\n")
    assert isinstance(open_dataset(tree / "l.txt"), FileList)
    (tree / "l.csv").write_text("path\ntop.png\n")
    assert isinstance(open_dataset(tree / "l.csv"), FileList)
    with pytest.raises(DatasetError, match="not a list file"):
        open_dataset(_touch(tmp_path / "x.dat"))
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "void").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path / "void")
    src = ArrayDataset(np.zeros((1, 2, 2), np.uint8))
    assert open_dataset(src) is src


def _touch(p: Path) -> Path:
    p.write_bytes(b"x")
    return p


def test_iteration_yields_rgb(tree):
    imgs = list(ImageFolder(tree))
    assert len(imgs) == 5 and all(im.mode == "RGB" for im in imgs)
