"""Identities of teachers, the keys of every teacher cache: a cache is only served to the weights it was
built from. Each kind of teacher keeps the formula its caches were first keyed by, so existing caches hit."""

from __future__ import annotations

import hashlib
from pathlib import Path

from distill.errors import DistillError
from distill.io import sha256_file


def file_id(path: Path) -> str:
    """A single weights file (classifier teachers)."""
    return sha256_file(path)[:16]


def lm_id(path: Path, dtype: str) -> str:
    """A causal LM (HF folder or GGUF file): every weight file's hash and the dtype it runs in."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    digest = hashlib.sha256(dtype.encode())
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]


def encoder_id(folder: Path) -> str:
    """A sentence-encoder folder: the checksum of its weights."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise DistillError(f"{folder} has no weights file (*.safetensors or *.bin)")
    return sha256_file(files[0])[:16]
