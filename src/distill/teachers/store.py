"""The contract every teacher cache folder keeps (logits, LM, cross-tokenizer, encoder outputs): it lives under
``cache_root``; it is built under ``io.folder_lock`` (one build at a time); its ``meta.json`` is written last, so a
folder holding one is whole; a reader compares what the cache was made with, key by key, checks each file's size and
(when asked) its SHA-256, and says in one line how to rebuild what fails."""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError
from distill.io import sha256_file


def cache_root(distill_spec, out: Path) -> Path:
    """Where teacher caches go: the recipe's ``distill.cache_dir`` (shared between runs), else ``RUN/cache``."""
    return Path(distill_spec.cache_dir).expanduser() if distill_spec.cache_dir else out / "cache"


def read_meta(folder: Path, what: str, fix: str) -> dict:
    """A cache folder's ``meta.json``, written last, so that a folder holding one is whole; a missing or torn one is
    one line saying how to rebuild it (``what``: the kind of cache, ``fix``: how to rebuild)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DistillError(f"{what} {folder} has no meta.json (missing or unfinished); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise DistillError(f"{what} {path} is corrupt; {fix}")
    return meta


def check_made_for(meta: dict, wanted: dict, folder: Path, what: str, fix: str) -> None:
    """The cache was made by this teacher, over these data, with these settings: key by key (None: not checked)."""
    for key, want in wanted.items():
        if want is not None and meta.get(key) != want:
            made = meta.get(key)
            raise DistillError(f"{what} {folder} was made with {key} {made!r} but this run has {want!r}; {fix}")


def check_file(file: Path, what: str, fix: str, *, size: int | None = None, sha256: str | None = None) -> None:
    """A file of a cache is there, whole (``size``) and, when ``sha256`` is given, unchanged."""
    if not file.is_file():
        raise DistillError(f"{what} {file} is missing; {fix}")
    if size is not None and file.stat().st_size != size:
        raise DistillError(f"{what} {file} has {file.stat().st_size} bytes, expected {size} (cut short?); {fix}")
    if sha256 is not None and sha256_file(file) != sha256:
        raise DistillError(f"{what} {file} fails its checksum; delete it and {fix}")
