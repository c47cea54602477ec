"""Crash-safe file writing: write to a temp name beside the target, fsync, rename, fsync the parent folder.

A rename can reach the disk before the data of the file renamed: without the fsync before it, a power cut can
leave the new name on empty or partial content. Without the fsync of the parent after it, the rename itself can
be lost, and with it whatever was deleted on the strength of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and subfolder under ``folder``, then ``folder`` itself (deepest first), so that their
    content and their names are on the disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def make_folder(folder: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of each folder it creates: else a power cut can drop a new folder's
    name, and with it every file fsynced inside."""
    folder = Path(folder)
    if folder.is_dir():
        return
    make_folder(folder.parent)
    folder.mkdir(exist_ok=True)
    fsync_path(folder.parent)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and renamed onto ``target``.

    On any error the temp file is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    make_folder(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temp folder to fill; on success it replaces ``target`` (an old one is moved aside first).

    Every file in the temp folder is fsynced before the rename and the parent folder after it: the new folder is
    on the disk whole before its name is, and the old one is deleted only once the renames are on the disk.
    On any error the temp folder is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    make_folder(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)  # both renames on the disk before the old copy goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
