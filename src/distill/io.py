"""Crash-safe file writing: write to a temp name beside the target, fsync, rename, fsync the parent folder.

A rename can reach the disk before the data of the file renamed: without the fsync before it, a power cut can
leave the new name on empty or partial content. Without the fsync of the parent after it, the rename itself can
be lost, and with it whatever was deleted on the strength of it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Written into a stage's folder (RUN/<stage>/done.json) once its final weights are saved: its one marker.
STAGE_DONE = "done.json"


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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set, then put back
    os.umask(mask)
    return mask


_UMASK = _umask()


# Temp files and folders are made by tempfile (O_EXCL, unpredictable names: in a shared cache folder nobody can plant a
# symlink where we are about to write), which makes them 0600 / 0700; they take the mode every other file of a run
# has (what the umask gives) before they are renamed into place.
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path (an empty file, ours alone) to write; on success it is fsynced and renamed onto ``target``.

    On any error the temp file is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    make_folder(target.parent)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
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
    On any error the temp folder is removed and ``target`` keeps its previous content. ``target`` must be a folder
    (or not exist): callers decide whether an existing one may be replaced.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(20, "not a folder, refusing to replace it", str(target))
    make_folder(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    old = None
    try:
        yield tmp
        for root, _, files in os.walk(tmp):  # safetensors and save_pretrained write their files 0600
            os.chmod(root, FOLDER_MODE)
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), FILE_MODE)
        fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old)  # onto the empty folder just made: a rename, never a copy
        os.replace(tmp, target)
        fsync_path(target.parent)  # both renames on the disk before the old copy goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


_held_locks: dict[str, list] = {}  # lock file → [open file, depth]: a process re-entering its own lock goes on
_held_guard = threading.Lock()


@contextmanager
def folder_lock(folder: Path, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a teacher cache, a converted model) for as long as it is built, across
    processes: a second build of the same folder waits for the first instead of deleting its temp files or writing
    the same shards again (with a paid served teacher, buying every answer twice). The lock is ``flock`` on
    ``.NAME.lock`` beside the folder (inside, it would vanish when the folder is replaced); the kernel drops it when
    the holder dies, so a killed build never leaves the folder locked. The holder writes its pid and command into the
    file, so the waiting process can say whom it waits for, and removes the file when done."""
    folder = Path(folder)
    make_folder(folder.parent)
    path = folder.parent / f".{folder.name}.lock"
    key = str(path.resolve())
    with _held_guard:
        held = key in _held_locks
        if held:
            _held_locks[key][1] += 1
    if not held:  # acquired outside the guard: waiting for another process must not stop our other locks' release
        handle = _acquire(path, what, folder)
        with _held_guard:
            _held_locks[key] = [handle, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held_locks[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held_locks[key]
                path.unlink(missing_ok=True)  # before the release: a waiter then finds its file gone and retries
                entry[0].close()  # closing the descriptor releases the flock


def _acquire(path: Path, what: str, folder: Path):
    said = False
    while True:
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE), "r+")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                holder = handle.read().strip() or "another process"
                print(f"waiting for {holder}, which is building the {what} {folder}", file=sys.stderr, flush=True)
                said = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the file we locked: lock the one at the path now
            current = os.stat(path, follow_symlinks=False)
            mine = os.fstat(handle.fileno())
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} ({shlex.join(sys.argv)})\n")
    handle.flush()
    return handle


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
