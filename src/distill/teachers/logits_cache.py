"""Teacher-output cache for classifiers: logits computed once, written atomically, memory-mapped.

Layout of a cache folder: ``logits.npy`` ([N, C] float32) and ``meta.json``, which records what made
the cache (teacher identity, data fingerprint, shape, checksum). The folder is built under a temp name
and renamed into place, so a cache that exists is complete. Raw logits are stored, so one cache serves
every temperature and every student; the reader refuses a cache whose teacher or data differ.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import FOLDER_MODE, folder_lock, fsync_path, make_folder, sha256_file
from distill.teachers.store import check_file, check_made_for, read_meta

FORMAT = "distill.logits/1"
FIX = "delete the folder to rebuild it, or set distill.cache_dir to another folder"


class LogitsCache:
    def __init__(self, path: Path, meta: dict, logits: np.ndarray):
        self.path, self.meta, self.logits = path, meta, logits

    @classmethod
    def open(cls, path: Path, *, teacher: str, data: str, verify: bool = True) -> LogitsCache:
        """Open and validate a cache made by ``teacher`` over training data ``data``."""
        path = Path(path)
        meta = read_meta(path, "teacher cache", FIX)
        if meta.get("format") != FORMAT:
            raise DistillError(f"teacher cache {path} has format {meta.get('format')!r}, expected {FORMAT!r}; {FIX}")
        check_made_for(meta, {"teacher": teacher, "data": data}, path, "teacher cache", FIX)
        file = path / "logits.npy"
        check_file(file, "teacher cache", FIX, sha256=meta.get("sha256") if verify else None)
        try:
            logits = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DistillError(f"teacher cache {file} is unreadable ({exc}); {FIX}") from None
        if list(logits.shape) != [meta["num_examples"], meta["num_classes"]]:
            raise DistillError(f"teacher cache {file} has shape {logits.shape}, meta.json says otherwise")
        return cls(path, meta, logits)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __call__(self, indices: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits for the training examples at ``indices``."""
        ids = to_numpy(indices)
        by_row = np.argsort(ids)
        picked = np.empty((len(ids), self.logits.shape[1]), dtype=self.logits.dtype)
        picked[by_row] = self.logits[ids[by_row]]  # read rows in disk order, store them in batch order
        return torch.from_numpy(picked).to(x.device if x is not None else "cpu")


def build_logits_cache(
    path: Path, teacher, x: np.ndarray, *, teacher_id: str, data_id: str, batch_size: int = 2048
) -> LogitsCache:
    """Run ``teacher`` over every row of ``x`` once and store its logits at ``path`` (atomically)."""
    path = Path(path)
    with folder_lock(path, "teacher cache"):  # a second build of the same cache waits, then opens the first's
        if (path / "meta.json").exists():
            return LogitsCache.open(path, teacher=teacher_id, data=data_id)
        return _build(path, teacher, x, teacher_id=teacher_id, data_id=data_id, batch_size=batch_size)


def _build(path: Path, teacher, x: np.ndarray, *, teacher_id: str, data_id: str, batch_size: int) -> LogitsCache:
    make_folder(path.parent)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        file = staging / "logits.npy"
        out = None
        with Progress(
            TextColumn("[bold]teacher outputs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        ) as progress:
            task = progress.add_task("teacher", total=len(x))
            for start in range(0, len(x), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
                logits = to_numpy(teacher(torch.arange(start, start + len(chunk)), chunk))
                if out is None:
                    shape = (len(x), logits.shape[1])
                    out = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=shape)
                out[start : start + len(chunk)] = logits
                progress.update(task, advance=len(chunk))
        out.flush()
        del out
        fsync_path(file)
        meta = {
            "format": FORMAT,
            "teacher": teacher_id,
            "data": data_id,
            "num_examples": int(len(x)),
            "num_classes": int(logits.shape[1]),
            "dtype": "float32",
            "temperature": "any: raw logits are stored, the temperature is applied when read",
            "sha256": sha256_file(file),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        fsync_path(staging / "meta.json")
        os.chmod(staging, FOLDER_MODE)
        if path.exists():
            shutil.rmtree(path)  # an incomplete leftover without meta.json
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return LogitsCache.open(path, teacher=teacher_id, data=data_id, verify=False)
