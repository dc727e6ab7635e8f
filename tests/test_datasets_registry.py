"""Data set registry: required fields, published splits, offline sets load, checks of placed copies,
and the resumable, checksum-verified downloader against a local HTTP server (no network needed)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodscope.io import registry as reg
from oodscope.io.registry import (
    BENCHMARKS,
    ChecksumMismatch,
    DatasetNotAvailable,
    DatasetSpec,
    DownloadError,
    FileChecksum,
    check_dataset,
    download_dataset,
    download_file,
    extract_archive,
    get_dataset,
    list_datasets,
)
from oodscope.io.registry.catalog_offline import _fashion_file
from oodscope.io.registry.loaders import _folder
from oodscope.io.registry.specs import _REGISTRY

HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "md5": re.compile(r"^[0-9a-f]{32}$")}


# ----------------------------------------------------------------------------- registry contents
def test_every_entry_has_the_required_fields():
    specs = list_datasets()
    assert len({s.name for s in specs}) == len(specs) > 50
    for s in specs:
        assert s.name and s.description and s.source and s.licence, s.name
        assert callable(s.loader)
        assert s.offline or s.how_to_place, f"{s.name}: no instructions to place it"
        assert s.checksum_source, s.name
        for c in s.checksums:
            assert HEX[c.algorithm].match(c.digest), (s.name, c)
            assert c.source, (s.name, c.path)
        for url in s.urls.values():
            assert url.startswith(("http://", "https://")), url
        if s.expected_files is not None:
            assert s.expected_files > 0 and s.count_source, s.name
        assert isinstance(s.info()["tags"], list)


def test_benchmarks_reference_registered_sets_and_follow_openood_v15():
    names = {s.name for s in list_datasets()}
    for b in BENCHMARKS.values():
        assert b.id in names and (b.id_fit is None or b.id_fit in names)
        assert set(b.near.values()) | set(b.far.values()) <= names
    # OpenOOD v1.5 benchmark table (OpenOOD wiki "OpenOOD v1.5 methods & benchmarks overview").
    expected = {
        "cifar10": ({"cifar100", "tin"}, {"mnist", "svhn", "texture", "places365"}),
        "cifar100": ({"cifar10", "tin"}, {"mnist", "svhn", "texture", "places365"}),
        "imagenet200": ({"ssb_hard", "ninco"}, {"inaturalist", "textures", "openimage_o"}),
        "imagenet": ({"ssb_hard", "ninco"}, {"inaturalist", "textures", "openimage_o"}),
    }
    for bench, (near, far) in expected.items():
        b = BENCHMARKS[f"openood-v1.5/{bench}"]
        assert set(b.near) == near and set(b.far) == far
    clip = BENCHMARKS["clip-zero-shot/imagenet-1k"]
    assert set(clip.far) == {"inaturalist", "sun", "places", "textures"} and len(clip.classes()) == 1000


def test_offline_sets_load_with_their_documented_counts():
    try:
        fm = get_dataset("fashion-mnist-ood/id")
    except DatasetNotAvailable:
        pytest.skip("Fashion-MNIST files are not installed")
    assert len(fm) == 6000 and fm.class_names[0] == "T-shirt/top" and set(fm.labels.tolist()) == set(range(6))
    assert len(get_dataset("fashion-mnist-ood/near")) == 4000
    assert len(get_dataset("digits")) == 1797
    pytest.importorskip("conformal_clip_data")
    assert len(get_dataset("textiles")) == 2000


def test_checksums_of_the_installed_fashion_mnist_files_verify():
    spec = reg.get_spec("fashion-mnist/test")
    if any(_fashion_file(c.path) is None for c in spec.checksums):
        pytest.skip("Fashion-MNIST files are not installed")
    report = check_dataset("fashion-mnist/test")
    assert report.ok, str(report)
    assert [c["status"] for c in report.checksums] == ["ok", "ok"] and report.n_found == 10_000


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotAvailable, match="dtd-r1.0.1.tar.gz"):
        get_dataset("dtd", tmp_path / "nowhere")
    with pytest.raises(KeyError, match="unknown data set"):
        get_dataset("cifar-11")
    report = check_dataset("openood-v1.5/cifar10/near/tin", tmp_path / "nowhere")
    assert not report.ok and "does not exist" in report.problems[0]


# ----------------------------------------------------------------------------- placed copies
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _openood_root(root: Path) -> Path:
    for i in range(3):
        _png(root / "images_classic" / "tin" / "test" / f"{i}.png", 40 * i)
    lst = root / "benchmark_imglist" / "cifar10" / "test_tin.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("".join(f"tin/test/{i}.png -1\n" for i in range(3)))
    return lst


def test_openood_image_list_loads_and_checks(tmp_path):
    _openood_root(tmp_path)
    source = get_dataset("openood-v1.5/cifar10/near/tin", tmp_path)
    assert len(source) == 3 and source.labels.tolist() == [-1, -1, -1]
    assert np.asarray(source.load(2))[0, 0, 0] == 80
    assert check_dataset("openood-v1.5/cifar10/near/tin", tmp_path).ok
    (tmp_path / "images_classic" / "tin" / "test" / "1.png").unlink()
    report = check_dataset("openood-v1.5/cifar10/near/tin", tmp_path)
    assert not report.ok and "1 listed image file(s) are missing" in report.problems[0]


def test_checksum_and_count_verification_of_a_placed_copy(tmp_path):
    lst = _openood_root(tmp_path)
    digest = hashlib.sha256(lst.read_bytes()).hexdigest()  # independent of oodscope's hashing
    rel = "benchmark_imglist/cifar10/test_tin.txt"

    def spec(expected: int, sha: str) -> DatasetSpec:
        base = reg.get_spec("openood-v1.5/cifar10/near/tin")
        return DatasetSpec(name="test/placed", description="test", source="test", licence="test",
                           loader=base.loader, expected_files=expected, count_source="test",
                           checksums=(FileChecksum(rel, "sha256", sha, "computed in the test"),),
                           how_to_place="by hand", folder="x")

    try:
        reg.register_dataset(spec(3, digest))
        good = check_dataset("test/placed", tmp_path)
        assert good.ok and good.checksums[0]["status"] == "ok" and good.n_found == 3
        reg.register_dataset(spec(4, digest), replace=True)
        counted = check_dataset("test/placed", tmp_path)
        assert not counted.ok and "found 3 images, expected 4" in counted.problems[0]
        reg.register_dataset(spec(3, digest), replace=True)
        lst.write_text(lst.read_text() + "# edited\n")
        edited = check_dataset("test/placed", tmp_path)
        assert not edited.ok and edited.checksums[0]["status"] == "mismatch"
        lst.unlink()
        gone = check_dataset("test/placed", tmp_path)
        assert not gone.ok and any("missing file" in p for p in gone.problems)
    finally:
        _REGISTRY.pop("test/placed", None)


def test_mvtec_and_visa_layouts(tmp_path):
    for i in range(2):
        _png(tmp_path / "mvtec" / "bottle" / "train" / "good" / f"{i}.png", i)
        _png(tmp_path / "mvtec" / "bottle" / "test" / "good" / f"{i}.png", i)
        _png(tmp_path / "mvtec" / "bottle" / "test" / "broken_large" / f"{i}.png", 100 + i)
    test = get_dataset("mvtec-ad/bottle/test", tmp_path / "mvtec")
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1] and test.class_names == ["good", "defect"]
    assert get_dataset("mvtec-ad/bottle/train", tmp_path / "mvtec").labels.tolist() == [0, 0]
    visa = tmp_path / "visa"
    rows = [("candle", "train", "normal"), ("candle", "test", "normal"), ("candle", "test", "anomaly"),
            ("pcb1", "test", "anomaly")]
    (visa / "split_csv").mkdir(parents=True)
    with open(visa / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        for k, (obj, split, label) in enumerate(rows):
            rel = f"{obj}/Data/Images/{label.title()}/{k}.JPG"
            _png(visa / rel, k)
            w.writerow([obj, split, label, rel, ""])
    candle = get_dataset("visa/candle/test", visa)
    assert candle.labels.tolist() == [0, 1] and len(get_dataset("visa", visa)) == 4


# ----------------------------------------------------------------------------- downloader
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and srv.honour_range:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body = body[: srv.cut_after]
            srv.cut_after = None  # only the first transfer breaks off
            self.close_connection = True
        srv.sent += len(body)  # counted before writing: the client may finish reading before this thread resumes
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.honour_range, srv.cut_after, srv.sent = {}, [], True, None, 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


PAYLOAD = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _url(srv, path="/data.bin") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_download_verifies_the_checksum(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = download_file(_url(server), tmp_path / "data.bin", checksum=FileChecksum("data.bin", "sha256", SHA),
                         progress=False)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "data.bin.part").exists()
    download_file(_url(server), dest, checksum=FileChecksum("data.bin", "sha256", SHA), progress=False)
    assert len(server.requests) == 1  # a verified file is not fetched again


def test_download_resumes_a_partial_file_with_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:12_345])
    dest = download_file(_url(server), tmp_path / "data.bin", checksum=FileChecksum("data.bin", "sha256", SHA),
                         progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == "bytes=12345-" and server.sent == len(PAYLOAD) - 12_345


def test_download_interrupted_then_resumed(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after = 20_000
    checksum = FileChecksum("data.bin", "sha256", SHA)
    with pytest.raises(DownloadError, match="resume"):
        download_file(_url(server), tmp_path / "data.bin", checksum=checksum, progress=False)
    assert (tmp_path / "data.bin.part").stat().st_size == 20_000 and not (tmp_path / "data.bin").exists()
    download_file(_url(server), tmp_path / "data.bin", checksum=checksum, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD and server.requests[-1]["range"] == "bytes=20000-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "data.bin.part").write_bytes(b"\0" * 999)  # stale bytes that must not be kept
    dest = download_file(_url(server), tmp_path / "data.bin", checksum=FileChecksum("data.bin", "sha256", SHA),
                         progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_partial_file_answered_416_is_verified(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    dest = download_file(_url(server), tmp_path / "data.bin", checksum=FileChecksum("data.bin", "sha256", SHA),
                         progress=False)
    assert dest.read_bytes() == PAYLOAD and server.sent == 0


def test_checksum_mismatch_is_refused(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD[:-1] + b"!"
    with pytest.raises(ChecksumMismatch, match="expected"):
        download_file(_url(server), tmp_path / "data.bin", checksum=FileChecksum("data.bin", "sha256", SHA),
                      progress=False)
    assert not (tmp_path / "data.bin").exists() and (tmp_path / "data.bin.corrupt").exists()


def test_offline_gives_a_clear_message(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="offline") as info:
        download_file(f"http://127.0.0.1:{port}/x.tar", tmp_path / "x.tar", progress=False, timeout=5)
    assert "by hand" in str(info.value) and str(tmp_path / "x.tar") in str(info.value)


def test_download_dataset_unpacks_and_checks(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for k in range(3):
            img = io.BytesIO()
            Image.fromarray(np.full((5, 5, 3), k, np.uint8)).save(img, format="PNG")
            info = tarfile.TarInfo(f"stuff/cls{k % 2}/{k}.png")
            info.size = len(img.getvalue())
            tf.addfile(info, io.BytesIO(img.getvalue()))
    server.files["/stuff.tar.gz"] = buf.getvalue()
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    spec = DatasetSpec(name="test/download", description="t", source="t", licence="t",
                       loader=_folder("stuff"), expected_files=3, count_source="test",
                       checksums=(FileChecksum("stuff.tar.gz", "sha256", digest, "test", required=False),),
                       checksum_source="test", urls={"stuff.tar.gz": _url(server, "/stuff.tar.gz")}, extract=True,
                       how_to_place="test", folder="t")
    try:
        reg.register_dataset(spec)
        report = download_dataset("test/download", tmp_path, progress=False)
        assert report.ok and report.n_found == 3
        assert check_dataset("test/download", tmp_path).checksums[0]["status"] == "ok"
        download_dataset("test/download", tmp_path, progress=False)
        assert len(server.requests) == 1  # already unpacked: nothing fetched again
    finally:
        _REGISTRY.pop("test/download", None)


def test_extract_refuses_members_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="refusing"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- oodscope datasets
def test_cli_lists_describes_and_checks(capsys):
    from oodscope.cli.main import main

    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    for name in ("fashion-mnist-ood", "openood-v1.5/imagenet", "digits", "dtd", "mvtec-ad"):
        assert name in listing
    assert main(["datasets", "list", "--tag", "anomaly"]) == 0
    anomaly = capsys.readouterr().out.split("data sets")[1]
    assert "mvtec-ad" in anomaly and "\n  digits " not in anomaly
    assert main(["datasets", "info", "dtd"]) == 0
    info = capsys.readouterr().out
    assert "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205" in info and "by hand" in info
    assert main(["datasets", "check", "digits"]) == 0
    assert "digits: OK (1797 images, expected 1797)" in capsys.readouterr().out
    assert main(["datasets", "info", "no-such-set"]) == 2
    assert "unknown data set 'no-such-set'" in capsys.readouterr().err


def test_cli_check_reports_problems_and_download_fetches(server, tmp_path, capsys):
    from oodscope.cli.main import main

    assert main(["datasets", "check", "mvtec-ad", "--root", str(tmp_path / "absent")]) == 1
    assert "does not exist" in capsys.readouterr().out
    img = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(img, format="PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for k in range(2):
            info = tarfile.TarInfo(f"stuff/cls/{k}.png")
            info.size = len(img.getvalue())
            tf.addfile(info, io.BytesIO(img.getvalue()))
    server.files["/stuff.tar"] = buf.getvalue()
    spec = DatasetSpec(name="test/cli", description="t", source="t", licence="t", loader=_folder("stuff"),
                       expected_files=2, count_source="test",
                       checksums=(FileChecksum("stuff.tar", "sha256", hashlib.sha256(buf.getvalue()).hexdigest(),
                                               "test", required=False),),
                       urls={"stuff.tar": _url(server, "/stuff.tar")}, extract=True, folder="t")
    try:
        reg.register_dataset(spec)
        assert main(["datasets", "download", "test/cli", "--root", str(tmp_path), "--quiet"]) == 0
        assert "test/cli: OK (2 images, expected 2)" in capsys.readouterr().out
        assert main(["datasets", "check", "test/cli", "--root", str(tmp_path)]) == 0
        assert "stuff.tar: sha256 ok" in capsys.readouterr().out
        assert main(["datasets", "download", "mvtec-ad", "--root", str(tmp_path / "m"), "--quiet"]) == 2
        assert "no plain-HTTP download" in capsys.readouterr().err  # a form on mvtec.com: by hand only
    finally:
        _REGISTRY.pop("test/cli", None)
