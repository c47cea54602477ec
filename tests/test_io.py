"""Durability (fsync before every rename, the parent after it, deletions last) and the RNG state in checkpoints.

A power cut cannot be staged in a test, so the tests record the order of fsyncs, renames and deletions: fsyncs
are recorded by inode (``os.fstat`` of the descriptor), whichever path or file object they came through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from distill.data.arrays import load_digits_data
from distill.io import STAGE_DONE, atomic_dir, atomic_path
from distill.models.classifiers import mlp
from distill.recipe import TrainSpec
from distill.tasks import parse_recipe
from distill.tasks.classifier import run
from distill.tasks.skeleton import train_or_load
from distill.train import Stage, _load_checkpoint, make_accelerator, train_stage


def inode(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def log(monkeypatch) -> list[tuple]:
    """Every fsync, rename and deletion from now on, in order: ("fsync", inode), ("replace", src, dst),
    ("unlink", path), ("rmtree", path)."""
    events: list[tuple] = []
    real_fsync, real_replace, real_unlink, real_rmtree = os.fsync, os.replace, os.unlink, shutil.rmtree

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("replace", Path(src), Path(dst)))

    def unlink(path, **kwargs):
        real_unlink(path, **kwargs)
        if "dir_fd" not in kwargs:  # rmtree's own unlinks are recorded as one rmtree
            events.append(("unlink", Path(path)))

    def rmtree(path, *args, **kwargs):
        existed = Path(path).exists()
        real_rmtree(path, *args, **kwargs)
        if existed:
            events.append(("rmtree", Path(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


def first(events, kind, **where) -> int:
    """Index of the first event of ``kind`` whose fields match, e.g. first(log, "replace", dst=target)."""
    fields = {"fsync": ("inode",), "replace": ("src", "dst"), "unlink": ("path",), "rmtree": ("path",)}[kind]
    for i, event in enumerate(events):
        if event[0] == kind and all(dict(zip(fields, event[1:], strict=True))[k] == v for k, v in where.items()):
            return i
    raise AssertionError(f"no {kind} {where} in {events}")


def fsynced(events, path, after: int = -1, before: int | None = None) -> bool:
    """Whether ``path`` (as it is now: renames keep the inode) was fsynced between two event indexes."""
    end = len(events) if before is None else before
    return ("fsync", inode(path)) in events[after + 1 : end]


def fill(folder: Path) -> list[Path]:
    (folder / "weights.bin").write_bytes(b"w" * 4096)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")
    return [Path("weights.bin"), Path("sub/config.json"), Path("sub")]


def test_atomic_dir_fsyncs_every_file_before_the_rename_and_the_parent_before_the_old_copy_goes(tmp_path, log):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with atomic_dir(target) as tmp:
        written = fill(tmp)
    aside = first(log, "replace", src=target)
    renamed = first(log, "replace", dst=target)
    removed = first(log, "rmtree", path=log[aside][2])
    assert aside < renamed < removed
    for name in [*written, Path(".")]:
        assert fsynced(log, target / name, before=aside), f"{name} was not fsynced before the rename"
    assert fsynced(log, tmp_path, after=renamed, before=removed), "parent not fsynced between rename and delete"
    assert sorted(p.name for p in target.iterdir()) == ["sub", "weights.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_dir_into_a_new_folder_fsyncs_the_new_names(tmp_path, log):
    target = tmp_path / "run" / "exports" / "model"
    with atomic_dir(target) as tmp:
        fill(tmp)
    renamed = first(log, "replace", dst=target)
    assert fsynced(log, tmp_path / "run" / "exports", after=renamed)
    assert fsynced(log, tmp_path / "run") and fsynced(log, tmp_path)  # the new folders' own names


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_parent_after(tmp_path, log):
    target = tmp_path / "new" / "data.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    renamed = first(log, "replace", dst=target)
    assert fsynced(log, target, before=renamed)
    assert fsynced(log, tmp_path / "new", after=renamed)
    assert fsynced(log, tmp_path)  # the name of the folder it created


def stage_folder(tmp_path) -> Path:
    folder = tmp_path / "student"
    folder.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (folder / name).write_bytes(b"checkpoint")
    return folder


def test_train_or_load_drops_checkpoints_only_after_weights_and_marker_are_durable(tmp_path, log):
    folder = stage_folder(tmp_path)

    def save(model, f):  # as save_classifier, plus a file written without fsync (as save_classifier_head does)
        with atomic_path(f / "model.safetensors") as tmp:
            tmp.write_bytes(b"weights")
        (f / "head.bin").write_bytes(b"head")

    train_or_load(folder, resume=False, load=None, train=lambda: "model", save=save)
    weights = first(log, "replace", dst=folder / "model.safetensors")
    marker = first(log, "replace", dst=folder / STAGE_DONE)
    dropped = min(first(log, "unlink", path=folder / n) for n in ("checkpoint.pt", "checkpoint.prev.pt"))
    assert weights < marker < dropped
    assert fsynced(log, folder, after=marker, before=dropped), "marker's rename not durable before the drop"
    assert fsynced(log, folder / "head.bin", before=marker)
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "head.bin", "model.safetensors"]


def test_train_or_load_with_a_folder_save_drops_checkpoints_only_after_the_new_folder_is_durable(tmp_path, log):
    folder = stage_folder(tmp_path)

    def save(model, f):  # as save_causal_lm / save_encoder: the whole folder, checkpoints included, is replaced
        with atomic_dir(f) as tmp:
            fill(tmp)

    train_or_load(folder, resume=False, load=None, train=lambda: "model", save=save)
    renamed = first(log, "replace", dst=folder)
    dropped = first(log, "rmtree", path=log[first(log, "replace", src=folder)][2])  # the old folder, checkpoints in it
    assert fsynced(log, folder / "weights.bin", before=renamed)
    assert fsynced(log, tmp_path, after=renamed, before=dropped)
    assert (folder / STAGE_DONE).exists() and not (folder / "checkpoint.pt").exists()


def test_a_finished_stage_found_on_resume_drops_checkpoints_a_crash_left(tmp_path):
    folder = stage_folder(tmp_path)
    (folder / STAGE_DONE).write_text("{}")
    assert train_or_load(folder, resume=True, load=lambda f: "loaded", train=None, save=None) == "loaded"
    assert not (folder / "checkpoint.pt").exists() and not (folder / "checkpoint.prev.pt").exists()


def test_a_run_drops_each_stage_checkpoints_after_its_weights_and_marker_are_durable(tmp_path, tiny_recipe, log):
    run(parse_recipe(tiny_recipe), tmp_path / "run")
    for stage in ("teacher", "baseline", "student"):
        folder = tmp_path / "run" / stage
        weights = first(log, "replace", dst=folder / "model.safetensors")
        marker = first(log, "replace", dst=folder / STAGE_DONE)
        dropped = first(log, "unlink", path=folder / "checkpoint.pt")
        assert weights < marker < dropped, stage
        assert fsynced(log, folder, after=marker, before=dropped), stage


# CUDA's RNG state, tested on any machine with fake CUDA functions.

FAKE_STATES = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]


def fake_cuda(monkeypatch, devices: int) -> list:
    """CUDA in use on ``devices`` devices; returns the list that receives what set_rng_state_all is given."""
    make_accelerator()  # the process's accelerator state is made before CUDA is faked, on the real device
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in FAKE_STATES[:devices]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


class Interrupted(Exception):
    pass


def train_small(run_dir: Path, *, resume=False, stop_at=None) -> int:
    """8 steps of an MLP with dropout, a checkpoint every 2; stopped after step ``stop_at``. The last step saved."""

    def stop(step):
        if step == stop_at:
            raise Interrupted

    data = load_digits_data()
    torch.manual_seed(0)
    stage = Stage("s", mlp(64, [16], 10, dropout=0.3), TrainSpec(epochs=1, batch_size=32, checkpoint_every=2))
    torch.manual_seed(1)
    x, y = data.train_x[:256], data.train_y[:256]
    train_stage(stage, x, y, run_dir, make_accelerator(), seed=0, input_shape=(1, 8, 8), resume=resume, on_step=stop)
    return _load_checkpoint(run_dir / "s" / "checkpoint.pt")["position"]["step"]


def test_checkpoint_holds_the_cuda_rng_state_and_resume_restores_it(tmp_path, monkeypatch, capsys):
    restored = fake_cuda(monkeypatch, devices=2)
    with pytest.raises(Interrupted):
        train_small(tmp_path, stop_at=3)
    saved = _load_checkpoint(tmp_path / "s" / "checkpoint.pt")["cuda_rng"]
    assert len(saved) == 2 and all(torch.equal(a, b) for a, b in zip(saved, FAKE_STATES, strict=True))
    train_small(tmp_path, resume=True)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], FAKE_STATES, strict=True))
    assert "warning" not in capsys.readouterr().out


def test_no_cuda_state_is_saved_before_cuda_is_used(tmp_path, monkeypatch):
    fake_cuda(monkeypatch, devices=2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with pytest.raises(Interrupted):
        train_small(tmp_path, stop_at=3)
    assert "cuda_rng" not in _load_checkpoint(tmp_path / "s" / "checkpoint.pt")


def test_resume_on_another_device_count_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    fake_cuda(monkeypatch, devices=2)
    with pytest.raises(Interrupted):
        train_small(tmp_path, stop_at=3)
    restored = fake_cuda(monkeypatch, devices=1)
    capsys.readouterr()
    train_small(tmp_path, resume=True)
    assert restored == []
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "CUDA random state of 2 device(s), this machine has 1" in warnings[0]


def test_a_checkpoint_from_before_cuda_states_were_saved_still_resumes(tmp_path, monkeypatch, capsys):
    with pytest.raises(Interrupted):
        train_small(tmp_path, stop_at=3)
    path = tmp_path / "s" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state.pop("cuda_rng", None)
    assert set(state) == {"model", "optimizer", "scheduler", "torch_rng", "position"}  # the old format
    torch.save(state, path)
    restored = fake_cuda(monkeypatch, devices=1)
    assert train_small(tmp_path, resume=True) == 8  # resumed at step 2 and finished
    assert restored == [] and "warning" not in capsys.readouterr().out
