"""Identities of teachers, the keys of every teacher cache: a cache is only served to the model it was built
from. An identity hashes every file that decides the model's outputs — all weight files, config.json, the
pooling modules of a sentence encoder, the tokenizer files — and the settings it runs with (dtype)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.errors import DistillError
from distill.io import sha256_file

# README, licences, images and exported copies (onnx/, openvino/ subfolders) do not change what the model computes.
IDENTITY_SUFFIXES = {".safetensors", ".bin", ".json", ".gguf", ".txt", ".model", ".pt"}


def file_id(path: Path) -> str:
    """A single weights file (classifier teachers)."""
    return sha256_file(path)[:16]


def model_id(path: Path, *settings: str, subfolders: tuple[str, ...] = ()) -> str:
    """A model file, or a folder's top-level files and those of ``subfolders``, with the settings it runs with."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        folders = [path, *(path / name for name in subfolders)]
        files = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file())
        files = [p for p in files if p.suffix in IDENTITY_SUFFIXES and not p.name.startswith(".")]
    digest = hashlib.sha256("\0".join(settings).encode())
    for file in files:
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()[:16]


def lm_id(path: Path, dtype: str) -> str:
    """A causal LM (HF folder or GGUF file) and the dtype it runs in."""
    return model_id(path, dtype)


def encoder_id(folder: Path) -> str:
    """A sentence-encoder folder: weights, config, tokenizer and the modules (pooling, normalisation) it declares."""
    if not (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))):
        raise DistillError(f"{folder} has no weights file (*.safetensors or *.bin)")
    return model_id(folder, subfolders=_module_folders(folder))


def _module_folders(folder: Path) -> tuple[str, ...]:
    """The sentence-transformers module folders (e.g. 1_Pooling, 2_Normalize) ``modules.json`` names."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        return tuple(sorted({m["path"] for m in modules if m.get("path")}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return ()  # no modules.json: a plain HF folder, mean pooling (models.encoders); an unreadable one fails there


def served_id(url: str, model: str, answer_format: str) -> str:
    """A served teacher: the server, the model name (its weights are not ours to hash) and the format it answers in
    (echo drops pieces our tokenizer spells several ways: a cache built half in each would mix two teachers)."""
    return "served-" + hashlib.sha256(f"{url.rstrip('/')}|{model}|{answer_format}".encode()).hexdigest()[:12]
