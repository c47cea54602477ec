"""Nothing lost (issue 33, data loss): ``--force`` deletes only a run or an export of ours, every command that
writes a run folder records its recipe, one build of a cache folder at a time, temp files nobody can predict."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_digits_recipe
from lm_fixtures import TEXT, save_tiny, tiny_llama, tiny_tokenizer

from distill.errors import DistillError
from distill.io import atomic_dir, atomic_path, folder_lock
from distill.tasks import export_run, parse_recipe
from distill.tasks.causal_lm import build_cache
from distill.tasks.causal_lm import run as run_lm
from distill.tasks.classifier import run


def fast_recipe() -> dict:
    raw = tiny_digits_recipe()
    raw["baseline"] = False
    raw["teacher"]["train"]["epochs"] = 1
    raw["student"]["train"]["epochs"] = 1
    return raw


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loss") / "run"
    run(parse_recipe(fast_recipe()), out)
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_refuses_a_folder_that_is_not_a_run_and_keeps_every_file(tmp_path, monkeypatch):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("three years of work")
    (thesis / "recipe.yaml").write_text(yaml.safe_dump(fast_recipe()))  # the user's own recipe, in the folder
    before = tree(thesis)
    with pytest.raises(DistillError, match="not one"):
        run(parse_recipe(fast_recipe()), thesis, force=True)
    monkeypatch.chdir(thesis)
    with pytest.raises(DistillError, match="current or home folder"):
        run(parse_recipe(fast_recipe()), Path("."), force=True)
    with pytest.raises(DistillError, match="current or home folder"):
        run(parse_recipe(fast_recipe()), tmp_path, force=True)  # an ancestor of the current folder
    assert tree(thesis) == before


def test_force_refuses_a_folder_holding_the_data_the_recipe_names(tmp_path):
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    rng = __import__("numpy").random.default_rng(0)
    for name, shape in {"train_x": (40, 4), "test_x": (20, 4)}.items():
        __import__("numpy").save(data / f"{name}.npy", rng.normal(size=shape).astype("float32"))
    for name, n in {"train_y": 40, "test_y": 20}.items():
        __import__("numpy").save(data / f"{name}.npy", rng.integers(0, 2, n))
    raw = fast_recipe() | {"data": {"source": "npy", "path": str(data)}}
    before = tree(tmp_path / "work")
    with pytest.raises(DistillError, match="named by the recipe"):
        run(parse_recipe(raw), tmp_path / "work", force=True)
    assert tree(tmp_path / "work") == before


def test_force_replaces_our_own_run_but_not_files_added_to_it(finished_run, tmp_path):
    out = tmp_path / "run"
    run(parse_recipe(fast_recipe()), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match=r"1 file\(s\) in .* that no run wrote \(notes.txt\)"):
        run(parse_recipe(fast_recipe()), out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "stale.png").write_bytes(b"x")  # a plot of an older run: ours to replace
    run(parse_recipe(fast_recipe()), out, force=True)
    assert not (out / "stale.png").exists() and (out / "student" / "done.json").exists()


def test_a_torn_recipe_or_auto_table_on_resume_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("task: classification\nname: [unclosed")
    with pytest.raises(DistillError, match="damaged or not a recipe distill wrote"):
        run(parse_recipe(fast_recipe()), out, resume=True)
    raw = fast_recipe() | {"distill": {"temperature": "auto", "alpha": 0.1}}
    raw["student"]["train"]["lr"] = 0.05
    run_dir = tmp_path / "auto"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(parse_recipe(raw).model_dump(mode="json"), sort_keys=False))
    (run_dir / "auto.json").write_text('{"table": [{"temperature": 1.0, "al')
    with pytest.raises(DistillError, match="auto.json is damaged"):
        run(parse_recipe(raw), run_dir, resume=True)


def test_export_force_never_deletes_the_run_or_files_it_did_not_write(finished_run, tmp_path):
    before = tree(finished_run)
    for target in (finished_run, finished_run.parent, finished_run / "student", finished_run / "teacher" / "x"):
        with pytest.raises(DistillError, match="run folder|part of the run"):
            export_run(finished_run, "safetensors", target, force=True)
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.bin").write_bytes(b"someone else's model")
    with pytest.raises(DistillError, match="not an export written by distill"):
        export_run(finished_run, "safetensors", models, force=True)
    assert (models / "other.bin").exists()
    file = tmp_path / "model.bin"
    file.write_bytes(b"a file")
    with pytest.raises(DistillError, match="not a folder"):
        export_run(finished_run, "safetensors", file, force=True)
    assert file.read_bytes() == b"a file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "models"]
    assert {k: v for k, v in tree(finished_run).items() if "exports" not in k} == {
        k: v for k, v in before.items() if "exports" not in k
    }


def test_export_force_replaces_an_earlier_export_of_that_format_only(finished_run, tmp_path):
    target = tmp_path / "onnx"
    export_run(finished_run, "onnx", target)
    (target / "leftover").write_text("x")
    export_run(finished_run, "onnx", target, force=True)  # ours, same format: replaced whole
    assert not (target / "leftover").exists() and (target / "model.onnx").exists()
    with pytest.raises(DistillError, match="only an earlier safetensors export.*a onnx export"):
        export_run(finished_run, "safetensors", target, force=True)
    assert (target / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no hidden .old / .tmp folders


def lm_recipe(tmp_path: Path, epochs: int = 1) -> object:
    tok = tiny_tokenizer()
    if not (tmp_path / "teacher").exists():
        save_tiny(tiny_llama(tok, layers=2, seed=0), tok, tmp_path / "teacher")
        (tmp_path / "corpus.txt").write_text(TEXT * 2)
    return parse_recipe({
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp_path / "corpus.txt"), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(tmp_path / "teacher")},
        "student": {"from_teacher": {"keep": 1}, "train": {"epochs": epochs, "batch_size": 8, "lr": 3e-3}},
        "distill": {"signal": "cache", "cache_k": 4},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1},
    })  # fmt: skip


def test_distill_cache_records_its_recipe_and_a_changed_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    build_cache(lm_recipe(tmp_path), out)
    assert (out / "recipe.yaml").is_file()
    with pytest.raises(DistillError, match="recipe differs"):
        run_lm(lm_recipe(tmp_path, epochs=2), out, resume=True)
    with pytest.raises(DistillError, match="distill cache: the recipe differs"):
        build_cache(lm_recipe(tmp_path, epochs=2), out)


HOLD = """
import sys, time
from distill.io import folder_lock
with folder_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_build_of_one_cache_folder_waits_and_says_for_whom(tmp_path, capfd):
    folder = tmp_path / "cache" / "teacher-x"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.perf_counter()
    with folder_lock(folder, "LM teacher cache"):
        waited = time.perf_counter() - started
        with folder_lock(folder):  # the same process again: no deadlock
            pass
    holder.wait(timeout=30)
    assert waited > 0.5, "the second build did not wait for the first"
    err = capfd.readouterr().err
    assert f"waiting for process {holder.pid}" in err and "LM teacher cache" in err and str(folder) in err
    assert not list(folder.parent.iterdir()), "the lock file is removed by its last holder"


def test_every_cache_build_takes_the_lock(tmp_path, monkeypatch):
    import numpy as np

    from distill.teachers import lm_cache, logits_cache

    taken = []
    real = folder_lock

    def spy(folder, what="folder"):
        taken.append(Path(folder))
        return real(folder, what)

    monkeypatch.setattr(lm_cache, "folder_lock", spy)
    monkeypatch.setattr(logits_cache, "folder_lock", spy)
    import torch

    ids = np.zeros((2, 4), dtype=np.int64)
    lm_cache.build_lm_cache(lambda x: torch.zeros(*x.shape, 8), ids, tmp_path / "lm", k=2, teacher_id="t",
                            data_id="d", vocab_size=8, progress=False)  # fmt: skip
    logits_cache.build_logits_cache(tmp_path / "logits", lambda i, x: torch.zeros(len(x), 3), np.zeros((5, 2)),
                                    teacher_id="t", data_id="d")  # fmt: skip
    assert taken == [tmp_path / "lm", tmp_path / "logits"]


def test_temp_names_are_unpredictable_and_a_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "shared" / "meta.json"
    target.parent.mkdir()
    for pid in (os.getpid(), os.getpid() + 1):  # where the old code wrote: .meta.json.tmp-PID
        (target.parent / f".meta.json.tmp-{pid}").symlink_to(victim)
    with atomic_path(target) as tmp:
        assert not tmp.is_symlink() and tmp.name.startswith(".meta.json.tmp-")
        tmp.write_text("new")
    assert victim.read_text() == "precious" and target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o666 & ~current_umask()
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "weights").write_bytes(b"w")
    assert ((tmp_path / "folder").stat().st_mode & 0o777) == 0o777 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
