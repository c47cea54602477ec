"""Errors a user meets are one true line: printed as written, with advice that holds for the command that met them,
and a full disk is a full disk even when torch calls it a RuntimeError."""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from distill import cli, train
from distill.data.arrays import load_digits_data
from distill.errors import DistillError
from distill.models.classifiers import mlp
from distill.recipe import TrainSpec
from distill.train import Stage, make_accelerator, train_stage

# What torch.save raised on a full 2 MiB tmpfs (torch 2.13); older versions say "... file write failed".
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def distill(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """``distill ARGS`` in this process: the exit code and the non-empty lines on stderr."""
    monkeypatch.setattr("sys.argv", ["distill", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_path_with_brackets_is_printed_as_it_is(tmp_path, monkeypatch, capsys):
    for name in ("[/x]", "[exp1]", "[bold]run[/bold]\\"):
        recipe = tmp_path / name / "recipe.yaml"
        code, lines = distill(monkeypatch, capsys, "run", recipe)
        assert code == 2 and len(lines) == 1 and f"recipe {recipe} does not exist" in lines[0], lines


def test_os_errors_offer_resume_only_for_a_run_folder_that_exists(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    real_mkdir = Path.mkdir

    def full(self, *args, **kwargs):
        if self.name == "run":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    code, lines = distill(monkeypatch, capsys, "run", recipe, "--out", tmp_path / "run")
    assert code == 2 and len(lines) == 1 and "no space left on the device" in lines[0], lines
    assert "--resume" not in lines[0] and "intact" not in lines[0]  # there is no run to resume

    ours = tmp_path / "started"
    ours.mkdir()
    assert "rerun with --resume" in cli.os_problem(OSError(errno.ENOSPC, "No space left", "x"), ours)
    for no in (errno.ENOSPC, errno.EIO, errno.EACCES):
        line = cli.os_problem(OSError(no, "bad", "x"), tmp_path / "not-made")
        assert "--resume" not in line and "intact" not in line


def test_a_full_disk_that_torch_reports_as_a_runtime_error_is_one_line(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    real_save, saves = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 3:
            monkeypatch.setattr(shutil, "disk_usage", lambda _: namedtuple("Usage", "total used free")(9, 9, 0))
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    code, lines = distill(monkeypatch, capsys, "run", recipe, "--out", tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert "no space left on the device" in lines[0] and "rerun with --resume" in lines[0]
    checkpoint = tmp_path / "run" / "teacher" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["position"]["step"] > 0  # the last good one, readable
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))


def test_another_runtime_error_of_torch_save_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        train.torch_save({}, tmp_path / "x.pt")


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed test may leave a file open


def test_a_real_full_disk_mid_run_keeps_the_last_checkpoint_and_leaves_no_temp_file(small_disk):
    data = load_digits_data()
    model = mlp(64, [2300], 10)  # a checkpoint of about 690 KB (SGD without momentum keeps no state)
    size = sum(p.numel() for p in model.parameters()) * 4
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - int(1.5 * size)))  # room for one checkpoint, not two
    spec = TrainSpec(epochs=2, batch_size=64, lr=0.01, momentum=0.0, checkpoint_every=5)
    with pytest.raises(OSError) as raised:
        train_stage(Stage("s", model, spec), data.train_x, data.train_y, small_disk, make_accelerator(), seed=0,
                    input_shape=(1, 8, 8))  # fmt: skip
    assert raised.value.errno == errno.ENOSPC and "no space left on the device" in cli.os_problem(raised.value)
    assert shutil.disk_usage(small_disk).free > 0.4 * size  # the removed temp file's space is free: nothing holds it
    state = torch.load(small_disk / "s" / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 5  # the first checkpoint, whole
    assert sorted(p.name for p in (small_disk / "s").iterdir()) == ["checkpoint.pt"]  # no temp file, no .prev


class PoisonAfter(torch.nn.Module):
    """An MLP whose output turns NaN after ``after`` forwards."""

    def __init__(self, after: int):
        super().__init__()
        self.net, self.after, self.seen = mlp(64, [16], 10), after, 0

    def forward(self, x):
        self.seen += 1
        out = self.net(x)
        return out * float("nan") if self.seen > self.after else out


@pytest.mark.parametrize(("stage", "key"), [("baseline", "student.train.lr"), ("teacher", "teacher.train.lr")])
def test_nan_advice_names_a_real_key_and_no_resume_of_a_changed_recipe(tmp_path, stage, key):
    data = load_digits_data()
    spec = TrainSpec(epochs=3, batch_size=32, lr=0.05, checkpoint_every=100)
    with pytest.raises(DistillError) as raised:
        train_stage(Stage(stage, PoisonAfter(3), spec), data.train_x[:256], data.train_y[:256], tmp_path,
                    make_accelerator(), seed=0, input_shape=(1, 8, 8))  # fmt: skip
    message = str(raised.value)
    assert f"lower {key}" in message and "baseline.train" not in message
    assert "--force" in message and "rerun with --resume" not in message
    assert "intact" not in message  # no checkpoint was written before step 4
