"""`distill plan`: the memory figures against hand-computed values, the chunked buffer against the full one, the
estimate against a measured run, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lm_fixtures import save_tiny, tiny_llama, tiny_tokenizer
from torch import nn

from distill.cli import main
from distill.plan import LOSS_BUFFERS, make_plan, saved_bytes
from distill.tasks import parse_recipe
from distill.train import native_bf16

CLI = [sys.executable, "-c", "from distill.cli import main; main()"]
WORDS = zip(["fox", "dog", "king"] * 60, ["sea", "sky"] * 90, ["calm", "dark", "true"] * 60, strict=True)
TEXT = " ".join(f"the {a} of the {b} is {c}." for a, b, c in WORDS)


def distill(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def mlp_parameters(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def stages(plan) -> dict:
    return {stage.name: stage for stage in plan.stages}


def test_classifier_state_bytes_are_the_hand_computed_ones(tiny_recipe):
    recipe = tiny_recipe | {"student": tiny_recipe["student"] | {"train": {"optimizer": "adamw", "batch_size": 32}}}
    plan = stages(make_plan(parse_recipe(recipe), steps=1))
    teacher, student = mlp_parameters([64, 64, 10]), mlp_parameters([64, 16, 10])  # digits: 8×8 inputs, 10 classes
    assert (plan["teacher"].parameters, plan["student"].parameters, plan["baseline"].parameters) == (4810, 1210, 1210)
    assert (teacher, student) == (4810, 1210)
    for name, params, states in (("teacher", teacher, 1), ("baseline", student, 2), ("student", student, 2)):
        stage = plan[name]  # SGD with momentum: one float32 state per parameter; AdamW: two
        assert (stage.weights, stage.gradients, stage.optimizer) == (4 * params, 4 * params, 4 * states * params)
    # beside the student: the teacher; held: the baseline, and the optimizer states of the stages before (the run's
    # accelerator keeps every optimizer it prepared)
    assert plan["student"].teacher == 4 * teacher
    assert plan["student"].resident == 4 * student + 4 * teacher + 8 * student
    momentum_free = tiny_recipe | {"teacher": tiny_recipe["teacher"] | {"train": {"momentum": 0.0}}}
    assert stages(make_plan(parse_recipe(momentum_free), steps=1))["teacher"].optimizer == 0  # SGD keeps no buffer
    assert all(stage.step_seconds > 0 and stage.epoch_seconds > 0 for stage in plan.values() if stage.training)
    assert plan["int8 export"].data_reload > 0  # the export loads the data again to check the student on it


def test_activations_are_what_autograd_saves_for_backward():
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(32, 64)
    # the first Linear saves its input, ReLU its output (which the second Linear saves too); weights are not counted
    assert saved_bytes(lambda: model(x), model) == 4 * (32 * 64 + 32 * 16)


def test_the_peak_grows_with_the_batch(tiny_recipe):
    def student(batch: int):
        train = tiny_recipe["student"]["train"] | {"batch_size": batch}
        recipe = tiny_recipe | {"student": tiny_recipe["student"] | {"train": train}}
        return stages(make_plan(parse_recipe(recipe), steps=1))["student"]

    small, large = student(16), student(64)
    assert large.activations == 4 * small.activations  # an MLP's saved activations are linear in the batch
    assert large.peak > small.peak and large.steps_per_epoch < small.steps_per_epoch


@pytest.fixture(scope="module")
def lm_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    tok = tiny_tokenizer()
    save_tiny(tiny_llama(tok, layers=4, seed=0), tok, tmp / "teacher")
    (tmp / "corpus.txt").write_text(TEXT)
    return {
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp / "corpus.txt"), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(tmp / "teacher")},
        "student": {"from_teacher": {"keep": 2}, "train": {"epochs": 2, "batch_size": 8, "optimizer": "adamw"}},
        "distill": {"signal": "cache", "cache_k": 8, "chunk_size": 32},
        "eval": {"batch_size": 4, "generations": 0},
    }, len(tok)


def test_lm_state_bytes_vocab_buffers_and_cache_are_the_hand_computed_ones(lm_recipe):
    raw, vocab = lm_recipe
    plan = make_plan(parse_recipe(raw), steps=1)
    by_name = stages(plan)
    assert list(by_name) == ["baseline", "teacher cache", "student", "int8 export", "evaluation"]
    # tiny Llama (lm_fixtures): hidden 32, MLP 64, 4 heads and 2 KV heads of 8, untied head, vocab padded to 304
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    rows = -(-vocab // 8) * 8
    student = 2 * layer + 2 * rows * 32 + 32
    teacher = 4 * layer + 2 * rows * 32 + 32
    for name in ("baseline", "student"):
        stage = by_name[name]
        state = (stage.parameters, stage.weights, stage.gradients, stage.optimizer)
        assert state == (student, 4 * student, 4 * student, 8 * student)
        positions = 8 * 15  # a micro-batch of 8 blocks of 16 tokens: 15 predict a next token
        assert stage.loss_buffers_full == LOSS_BUFFERS * positions * vocab * 4
        assert stage.loss_buffers_full / stage.loss_buffers == positions / 32  # chunks of 32 positions
        assert stage.teacher == 4 * teacher and stage.activations > 0
    # held: the starting copy and the baseline, and the baseline's AdamW state (the accelerator keeps it)
    assert by_name["student"].resident == 2 * 4 * student + 8 * student
    # a sampled cache: 8 uint16 ids per token per set, one set per epoch the student trains
    assert plan.cache_bytes_per_token == 2 * 8 * 2
    assert plan.cache_disk_bytes == plan.cache_bytes_per_token * by_name["student"].examples * 16
    assert plan.peak == plan.import_bytes + plan.data_bytes + max(stage.peak for stage in plan.stages)
    # timed in the precision the run trains in: the LM default `auto` is bf16 where the CPU multiplies it natively
    assert plan.precision.startswith("bf16 (auto" if native_bf16() else "float32 (auto")
    assert parse_recipe(raw).mixed_precision == "auto"


def test_a_live_teacher_adds_its_hidden_states_and_a_bigger_batch_a_bigger_peak(lm_recipe):
    raw, _ = lm_recipe
    cached = stages(make_plan(parse_recipe(raw), steps=1))["student"]
    live = raw | {"distill": raw["distill"] | {"signal": "live"}}
    assert stages(make_plan(parse_recipe(live), steps=1))["student"].teacher > cached.teacher
    train = raw["student"]["train"] | {"batch_size": 16}
    bigger = stages(make_plan(parse_recipe(raw | {"student": raw["student"] | {"train": train}}), steps=1))
    assert bigger["student"].activations > cached.activations and bigger["student"].peak > cached.peak


def test_plan_estimates_the_peak_rss_of_the_run(tmp_path, tiny_recipe):
    """The plan of the tiny recipe against the same recipe run, each in its own process, as bench/plan_check.py
    does for our recipes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe | {"eval": {"latency_runs": 2}}))
    planned = distill("plan", recipe, "--json", "--steps", "1")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    code = (
        "import resource, subprocess, sys; "
        f"subprocess.run({[*CLI, 'run', str(recipe), '--out', str(tmp_path / 'run')]!r}, check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    measured = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.75 <= plan["peak"] / measured <= 1.25, (plan["peak"], measured)


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``distill ARGS`` in this process (the subprocess start-up is the slow part): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_a_table_and_a_total_and_json(tmp_path, tiny_recipe, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    code, out, err = cli(monkeypatch, capsys, "plan", recipe, "--steps", "1", "--set", "student.train.batch_size=32")
    assert code == 0, err
    for fragment in ("teacher", "baseline", "student", "optimizer state", "s / epoch", "peak", "process RSS"):
        assert fragment in out
    code, out, err = cli(monkeypatch, capsys, "plan", recipe, "--json", "--steps", "1")
    planned = json.loads(out)
    assert [stage["name"] for stage in planned["stages"]] == ["teacher", "baseline", "student", "int8 export"]
    assert planned["peak"] > planned["import_bytes"] > 0 and planned["seconds"] > 0
    assert planned["precision"] == "float32 (recipe)"  # a classifier recipe's default: no


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist"),
        ({"student": {"modle": {}}}, "student.modle: unknown key"),
        ({"task": "generate", "prompts": {"path": "p.jsonl"}, "teacher": {"path": "t"}}, "not task: generate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, content, fragment, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    if content is not None:
        recipe.write_text(yaml.safe_dump(content))
    code, _, err = cli(monkeypatch, capsys, "plan", recipe)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err


def test_plan_writes_its_scratch_files_beside_the_run_and_removes_them(tmp_path, tiny_recipe, monkeypatch, capsys):
    import tempfile

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-tmpdir"))  # $TMPDIR (often RAM) is not used
    real_save, written = torch.save, []
    monkeypatch.setattr(torch, "save", lambda obj, path, **kw: (written.append(Path(path)), real_save(obj, path))[1])
    disk = tmp_path / "disk"
    disk.mkdir()
    code, out, err = cli(monkeypatch, capsys, "plan", recipe, "--steps", "1", "--json", "--out", disk / "runs" / "a")
    assert code == 0, err
    assert written and all(disk in path.parents for path in written)  # the run's disk: fsyncs timed where they land
    assert list(disk.iterdir()) == []  # and nothing left there, not even runs/


def test_every_task_can_be_planned_text_classification_and_embedding(tmp_path, teacher_dir, student_dir):
    """The plan walks the stages a task declares (``task.stages``) with the run's own preparation, so the text
    tasks are planned like the others: the baseline and the student of a text classifier, an embedding student."""
    from text_fixtures import write_topic_csv

    data = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    text = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(data), "labeled_fraction": 0.5, "max_length": 16},
        "teacher": {"path": str(teacher_dir), "probe": True},
        "student": {"path": str(student_dir), "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw"}},
        "eval": {"threads": 1, "batch_size": 8},
    }
    plan = make_plan(parse_recipe(text), steps=1, out=tmp_path / "runs" / "a")
    by_name = stages(plan)
    assert list(by_name) == ["baseline", "student", "int8 export"] and plan.task == "text_classification"
    for stage in (by_name["baseline"], by_name["student"]):  # the same student, the same step budget; AdamW: two
        assert stage.optimizer == 2 * stage.weights and stage.activations > 0 and stage.step_seconds > 0  # states
        assert stage.steps == 2 * 4 and stage.teacher > 0  # 60 texts (57 after validation) in batches of 16
    text["teacher"] = {"path": str(teacher_dir), "train": {"epochs": 2, "batch_size": 8}}  # fine-tuned first
    plan = make_plan(parse_recipe(text), steps=1, out=tmp_path / "runs" / "a")
    by_name = stages(plan)
    assert list(by_name) == ["teacher", "baseline", "student", "int8 export"]
    teacher = by_name["teacher"]  # 27 labeled texts (30 less 3 held out) in batches of 8, 2 epochs; 4 layers, not 2
    assert teacher.steps == 2 * 4 and teacher.weights > by_name["student"].weights and teacher.step_seconds > 0
    embedding = {
        "task": "embedding",
        "data": [{"source": "csv", "path": str(data), "max_length": 16}],
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir), "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw"}},
        "eval": {"threads": 1, "batch_size": 8},
    }
    plan = make_plan(parse_recipe(embedding), steps=1, out=tmp_path / "runs" / "b")
    assert [stage.name for stage in plan.stages] == ["student"] and plan.stages[0].step_seconds > 0
    assert list((tmp_path / "runs").glob("*")) == []  # the scratch run folder is gone


def test_a_quantization_aware_stage_is_planned_after_the_student_with_one_cache(lm_recipe):
    """Issue 35.2: student.quantize adds the stage 'quantized' (the student through the GGUF grid); the plan times it
    from the student's shapes and builds the teacher cache once."""
    raw, _ = lm_recipe
    raw = raw | {"student": raw["student"] | {"quantize": {"type": "q4_0"}}}
    by_name = stages(make_plan(parse_recipe(raw), steps=1))
    assert list(by_name) == ["baseline", "teacher cache", "student", "quantized", "int8 export", "evaluation"]
    assert by_name["quantized"].parameters == by_name["student"].parameters and by_name["quantized"].step_seconds > 0
    # it reads the teacher live (target: teacher): its hidden states beside the weights the cached student stage has
    assert by_name["quantized"].teacher > by_name["student"].teacher
    raw = raw | {"student": raw["student"] | {"quantize": {"type": "q4_0", "target": "student"}}}
    own = stages(make_plan(parse_recipe(raw), steps=1))["quantized"]
    assert own.teacher > by_name["quantized"].teacher  # a frozen float copy of the student, and its hidden states
