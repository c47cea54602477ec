import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.data.arrays import load_digits_data
from distill.errors import DistillError
from distill.models.classifiers import mlp
from distill.recipe import DistillSpec, TrainSpec
from distill.tasks import parse_recipe
from distill.tasks.classifier import run
from distill.train import Stage, jitter, length_grouped_order, make_accelerator, micro_batches, train_stage


def weights(run_dir, stage):
    return load_file(str(run_dir / stage / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, tiny_recipe):
    recipe = parse_recipe(tiny_recipe)
    run(recipe, tmp_path / "straight")

    class Interrupted(Exception):
        pass

    pending = [("teacher", 10), ("student", 30)]  # killed in the teacher stage, then in the student stage

    def interrupt(stage, step):
        if pending and (stage, step) == pending[0]:
            pending.pop(0)
            raise Interrupted

    for _ in range(2):
        with pytest.raises(Interrupted):
            run(recipe, tmp_path / "resumed", resume=True, on_step=interrupt)
    assert not pending
    assert (tmp_path / "resumed" / "student" / "checkpoint.pt").exists()
    run(recipe, tmp_path / "resumed", resume=True)
    for stage in ("teacher", "baseline", "student"):
        assert_same_weights(weights(tmp_path / "straight", stage), weights(tmp_path / "resumed", stage))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())["models"]
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["models"]
    assert straight["student"]["test_errors"] == resumed["student"]["test_errors"]

    # The log has each step once, as in the uninterrupted run.
    def steps(path):
        return [(e["stage"], e["step"]) for e in map(json.loads, (path / "log.jsonl").read_text().splitlines())]

    assert steps(tmp_path / "resumed") == steps(tmp_path / "straight")


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_recipe):
    tiny_recipe["baseline"] = False
    run(parse_recipe(tiny_recipe), tmp_path / "a")
    run(parse_recipe(tiny_recipe), tmp_path / "b")
    run(parse_recipe(tiny_recipe | {"seed": 4}), tmp_path / "c")
    assert_same_weights(weights(tmp_path / "a", "student"), weights(tmp_path / "b", "student"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(tmp_path / "a", "student"), weights(tmp_path / "c", "student"))


def _train(tmp_path, name, train_spec, teacher=None, distill=None, x=None, y=None):
    data = load_digits_data()
    torch.manual_seed(0)
    model = mlp(64, [32], 10)
    stage = Stage(name, model, train_spec, teacher, distill)
    x = data.train_x[:200] if x is None else x
    y = data.train_y[:200] if y is None else y
    return train_stage(stage, x, y, tmp_path, make_accelerator(), seed=0, input_shape=(1, 8, 8))


@pytest.mark.parametrize("distilled", [False, True])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, distilled):
    torch.manual_seed(1)
    teacher_model = mlp(64, [32], 10).eval()

    def teacher(ids, x):
        with torch.no_grad():
            return teacher_model(x)

    kwargs = {"teacher": teacher, "distill": DistillSpec(temperature=2.0, alpha=0.3)} if distilled else {}
    base = {"epochs": 2, "batch_size": 48, "lr": 0.1, "checkpoint_every": 1000}
    # 200 examples in batches of 48: the last batch has 8, split unevenly across micro-batches.
    one = _train(tmp_path / "one", "s", TrainSpec(**base), **kwargs)
    four = _train(tmp_path / "four", "s", TrainSpec(**base, grad_accum=4), **kwargs)
    assert_same_weights(one.state_dict(), four.state_dict(), atol=1e-6)


def test_unlabeled_examples_learn_from_teacher_only(tmp_path):
    data = load_digits_data()
    x, y = data.train_x[:128], data.train_y[:128].copy()
    y[:] = -100
    with pytest.raises(DistillError, match="no training examples"):
        _train(tmp_path / "hard", "baseline", TrainSpec(epochs=1, batch_size=32), x=x, y=y)
    torch.manual_seed(5)
    teacher_model = mlp(64, [32], 10).eval()

    def teacher(ids, xb):  # sharpened: a random net's outputs are nearly flat
        with torch.no_grad():
            return 30 * teacher_model(xb)

    spec = TrainSpec(epochs=60, batch_size=32, lr=0.01, optimizer="adamw")
    student = _train(tmp_path / "soft", "student", spec, teacher, DistillSpec(temperature=1.0, alpha=0.5), x=x, y=y)
    with torch.no_grad():
        agree = (student(torch.from_numpy(x)).argmax(-1) == teacher(None, torch.from_numpy(x)).argmax(-1)).float()
    assert agree.mean() > 0.8  # from no labels at all; a random student agrees on ~10%


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    data = load_digits_data()
    x = data.train_x[:256].copy()
    spec = TrainSpec(epochs=3, batch_size=32, lr=0.05, checkpoint_every=4)
    seen = {"n": 0}

    class PoisonAfter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(64, [16], 10)

        def forward(self, xb):
            seen["n"] += 1
            out = self.net(xb)
            return out * float("nan") if seen["n"] > 10 else out

    stage = Stage("student", PoisonAfter(), spec)
    with pytest.raises(DistillError, match=r"loss became nan at step 11; the last good checkpoint .* is intact"):
        train_stage(stage, x, data.train_y[:256], tmp_path, make_accelerator(), seed=0, input_shape=(1, 8, 8))
    state = torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    data = load_digits_data()
    stage = Stage("s", mlp(64, [8], 10), TrainSpec(epochs=1))
    with pytest.raises(DistillError, match="checkpoint .* is corrupt or truncated"):
        train_stage(
            stage, data.train_x, data.train_y, tmp_path, make_accelerator(), seed=0, input_shape=(1, 8, 8), resume=True
        )


def test_jitter_shifts_each_image_within_range():
    torch.manual_seed(0)
    images = torch.rand(20, 1, 8, 8)
    out = jitter(images.reshape(20, -1), (1, 8, 8), 2).reshape(20, 1, 8, 8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    shifts = set()
    for i in range(20):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert matches, "output is not a shifted copy"
        shifts.add(matches[0])
    assert len(shifts) > 3


def test_teacher_class_count_mismatch_is_reported(tmp_path, tiny_recipe):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    wrong = mlp(64, [64], 7)
    save_file(wrong.state_dict(), str(tmp_path / "t.safetensors"))
    tiny_recipe["teacher"]["checkpoint"] = str(tmp_path / "t.safetensors")
    with pytest.raises(DistillError, match="it outputs 7 classes, the data has 10"):
        run(parse_recipe(tiny_recipe), tmp_path / "run")


def test_truncated_checkpoint_falls_back_to_the_previous_good_one(tmp_path, tiny_recipe, capsys):
    recipe = parse_recipe(tiny_recipe)
    run(recipe, tmp_path / "straight")

    class Interrupted(Exception):
        pass

    def interrupt(stage, step):
        if (stage, step) == ("student", 30):
            raise Interrupted

    with pytest.raises(Interrupted):
        run(recipe, tmp_path / "resumed", on_step=interrupt)
    latest = tmp_path / "resumed" / "student" / "checkpoint.pt"
    previous = tmp_path / "resumed" / "student" / "checkpoint.prev.pt"
    assert previous.exists()
    before = torch.load(previous, weights_only=True)["position"]["step"]
    assert before < torch.load(latest, weights_only=True)["position"]["step"]
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that lost the end of the newest file
    run(recipe, tmp_path / "resumed", resume=True)
    assert "resuming from the previous checkpoint" in capsys.readouterr().out
    for stage in ("teacher", "baseline", "student"):
        assert_same_weights(weights(tmp_path / "straight", stage), weights(tmp_path / "resumed", stage))
    assert not latest.exists() and not previous.exists()  # a finished stage keeps only its weights


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from distill import cli

    monkeypatch.setattr("sys.argv", ["distill", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_disk_full_mid_run_is_one_line_and_a_resume_finishes_it(tmp_path, tiny_recipe, monkeypatch, capsys):
    import errno

    import yaml

    from distill import train

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe))
    run(parse_recipe(tiny_recipe), tmp_path / "straight")
    real_save, saves = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", save_until_the_disk_fills)
    code, err = _cli(monkeypatch, capsys, "run", recipe_path, "--out", tmp_path / "run")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no space left on the device" in lines[0] and "--resume" in lines[0]
    checkpoint = tmp_path / "run" / "teacher" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["position"]["step"] > 0  # the last good one, readable
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))  # no half-written file left behind
    monkeypatch.setattr(train.torch, "save", real_save)  # space freed
    run(parse_recipe(tiny_recipe), tmp_path / "run", resume=True)
    for stage in ("teacher", "baseline", "student"):
        assert_same_weights(weights(tmp_path / "straight", stage), weights(tmp_path / "run", stage))


def test_permission_denied_is_one_line(tmp_path, tiny_recipe, monkeypatch, capsys):
    import yaml

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe))
    real_mkdir = type(tmp_path).mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    code, err = _cli(monkeypatch, capsys, "run", recipe_path, "--out", tmp_path / "locked")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "permission denied" in lines[0] and "locked" in lines[0]


def test_length_grouped_order_is_a_shuffle_with_batches_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1003)
    order = length_grouped_order(lengths, 16, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(1003))  # every example once
    assert torch.equal(order, length_grouped_order(lengths, 16, torch.Generator().manual_seed(1)))
    assert not torch.equal(order, length_grouped_order(lengths, 16, torch.Generator().manual_seed(2)))
    batches = order.split(16)
    assert len(batches[-1]) == 1003 % 16  # the short batch stays last
    grouped = np.mean([lengths[b].max() - lengths[b].min() for b in batches[:-1]])
    shuffled = torch.randperm(1003, generator=torch.Generator().manual_seed(1)).split(16)
    random = np.mean([lengths[b].max() - lengths[b].min() for b in shuffled[:-1]])
    assert grouped < random / 10  # padding to the longest wastes little
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()
    # batch order is shuffled, not sorted by length across the epoch
    longest = [lengths[b].max() for b in batches[:-1]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_every_process_runs_as_many_micro_batches_whatever_its_share():
    """Issue 17.1: the collectives of DDP/FSDP need every rank in every micro-batch; empty shares become a
    stand-in row weighed 0. One process keeps skipping them."""
    rows = torch.tensor([7])  # a short last batch of one row
    for rank in (0, 1):
        parts = micro_batches(rows, rank, world=2, grad_accum=3)
        assert len(parts) == 3
        assert [real for _, real in parts] == ([True, False, False] if rank == 0 else [False, False, False])
        assert all(chunk.tolist() == [7] for chunk, _ in parts)
    single = micro_batches(torch.arange(2), 0, 1, 3)
    assert [(c.tolist(), real) for c, real in single] == [([0], True), ([1], True)]


def test_every_file_a_run_writes_follows_the_umask(tmp_path, tiny_recipe):
    """safetensors writes through a temp file of its own, 0600 (so do transformers' save_pretrained weights): the
    run folder's files all take the mode the umask gives, as its other files do."""
    import os

    from lm_fixtures import tiny_llama, tiny_tokenizer

    from distill.models.causal_lm import save_causal_lm

    run(parse_recipe(tiny_recipe), tmp_path / "run")
    tokenizer = tiny_tokenizer()
    save_causal_lm(tiny_llama(tokenizer, layers=1), tokenizer, tmp_path / "run" / "lm")
    mask = os.umask(0)
    os.umask(mask)
    modes = {path.relative_to(tmp_path).as_posix(): path.stat().st_mode & 0o777 for path in tmp_path.rglob("*")}
    assert modes["run/teacher/model.safetensors"] == modes["run/metrics.json"] == 0o666 & ~mask
    assert {mode for path, mode in modes.items() if (tmp_path / path).is_file()} == {0o666 & ~mask}, modes
