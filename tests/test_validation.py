"""The validation split (issue 18): carved from the labeled training examples, every stage validated on it, the best
weights kept, early stopping, exact resume, and the teacher checked before the students learn from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.data.arrays import ArrayData, load_data, with_validation
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.recipe import DataSpec
from distill.tasks import parse_recipe, run_recipe


def test_validation_is_carved_from_labeled_training_examples_per_class():
    data = load_data(DataSpec(source="digits", labeled_fraction=0.5, validation_fraction=0.2), seed=1)
    full = load_data(DataSpec(source="digits", labeled_fraction=0.5, validation_fraction=0.0), seed=1)
    np.testing.assert_array_equal(data.test_x, full.test_x)  # the test split is never touched
    assert len(data.train_x) + len(data.val_x) == len(full.train_x)
    assert (data.val_y != IGNORE_INDEX).all()  # only labeled examples validate
    labeled = np.bincount(full.train_y[full.train_y != IGNORE_INDEX], minlength=10)
    np.testing.assert_array_equal(np.bincount(data.val_y, minlength=10), np.maximum(1, np.round(0.2 * labeled)))
    rows = {row.tobytes() for row in full.train_x}
    assert all(row.tobytes() in rows for row in data.val_x)
    assert not {row.tobytes() for row in data.val_x} & {row.tobytes() for row in data.train_x}
    again = load_data(DataSpec(source="digits", labeled_fraction=0.5, validation_fraction=0.2), seed=1)
    np.testing.assert_array_equal(again.val_x, data.val_x)  # seeded


def test_a_class_too_small_to_split_and_patience_without_validation_are_one_line():
    x = np.zeros((5, 2), dtype=np.float32)
    data = ArrayData(x, np.array([0, 0, 0, 1, IGNORE_INDEX]), x[:1], np.array([0]), 2, (2,))
    with pytest.raises(DistillError, match="class 1 has 1 labeled training example.*validation_fraction: 0"):
        with_validation(data, 0.1, seed=0)
    missing = ArrayData(x, np.array([0, 0, 0, 0, IGNORE_INDEX]), x[:1], np.array([1]), 2, (2,))
    with pytest.raises(DistillError, match="class 1 has no labeled training example: the validation split would miss"):
        with_validation(missing, 0.1, seed=0)
    with pytest.raises(DistillError, match="student.train.patience needs a validation split"):
        parse_recipe({"data": {"validation_fraction": 0}, "student": {"train": {"patience": 2}}})
    with pytest.raises(DistillError, match="teacher itself is selected by loss or accuracy"):
        parse_recipe({"teacher": {"train": {"select_by": "kl"}}})


def log_entries(run_dir, stage):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["stage"] == stage and "validation" in e]


def test_every_stage_is_validated_and_keeps_its_best_weights(tmp_path, tiny_recipe):
    tiny_recipe["student"]["train"] |= {"epochs": 6, "eval_every": 7, "select_by": "kl", "lr": 0.5}
    metrics = run_recipe(parse_recipe(tiny_recipe), tmp_path / "run")
    for stage in ("teacher", "baseline", "student"):
        entries = log_entries(tmp_path / "run", stage)
        assert entries and entries[-1]["step"] == metrics["validation"][stage]["last"]["step"]
    student = log_entries(tmp_path / "run", "student")
    assert [e["step"] for e in student][:3] == [7, 14, 21]
    assert {"loss", "accuracy", "agreement", "kl"} <= set(student[0]["validation"])
    best = min(student, key=lambda e: e["validation"]["kl"])
    assert metrics["validation"]["student"]["best"]["step"] == best["step"]
    # the kept weights are the best ones: validating them again gives the logged best KL
    from distill.models.classifiers import load_classifier
    from distill.tasks.classifier import validator

    recipe = parse_recipe(tiny_recipe)
    data = load_data(recipe.data, recipe.seed)
    teacher = load_classifier(tmp_path / "run/teacher/model.safetensors", recipe.teacher.model, (1, 8, 8), 10)
    from distill.evaluate import predict_logits

    check = validator(data, predict_logits(teacher, data.val_x))
    kept = load_classifier(tmp_path / "run/student/model.safetensors", recipe.student.model, (1, 8, 8), 10)
    assert check(kept)["kl"] == pytest.approx(best["validation"]["kl"], abs=2e-6)
    assert not (tmp_path / "run/student/best.pt").exists()  # dropped with the checkpoints once the stage is done


def test_patience_stops_early_and_a_resumed_run_makes_the_same_choices(tmp_path, tiny_recipe):
    # a learning rate this high makes the validation loss stop improving soon
    tiny_recipe["student"]["train"] |= {"epochs": 12, "eval_every": 3, "patience": 2, "lr": 3.0, "checkpoint_every": 4}
    recipe = parse_recipe(tiny_recipe)
    run_recipe(recipe, tmp_path / "straight")
    entries = log_entries(tmp_path / "straight", "student")
    assert entries[-1]["stopped"] and entries[-1]["step"] < 12 * 21
    assert [e["best"] for e in entries[-2:]] == [False, False]

    class Interrupted(Exception):
        pass

    stop_at = entries[-2]["step"] + 1  # between the last two validations: best, stale count and best.pt in play

    def interrupt(stage, step):
        if (stage, step) == ("student", stop_at):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path / "resumed", on_step=interrupt)
    run_recipe(recipe, tmp_path / "resumed", resume=True)
    assert log_entries(tmp_path / "resumed", "student") == entries
    for stage in ("baseline", "student"):
        a = load_file(tmp_path / "straight" / stage / "model.safetensors")
        b = load_file(tmp_path / "resumed" / stage / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_a_budget_in_steps_ends_mid_epoch_and_resumes_to_the_same_weights(tmp_path, tiny_recipe):
    # digits: 1,293 training examples after the validation split, batch 64: 21 steps an epoch; 30 steps end mid-way
    tiny_recipe["student"]["train"] |= {"epochs": 1, "max_steps": 30, "checkpoint_every": 4}
    recipe = parse_recipe(tiny_recipe)
    run_recipe(recipe, tmp_path / "straight")
    lines = [json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in lines if e["stage"] == "student" and "validation" not in e]
    assert max(steps) == 30 and steps[-1] == 30
    assert [e["step"] for e in log_entries(tmp_path / "straight", "student")] == [21, 30]  # each epoch and the end

    def interrupt(stage, step):
        if (stage, step) == ("student", 25):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "resumed", on_step=interrupt)
    run_recipe(recipe, tmp_path / "resumed", resume=True)
    a = load_file(tmp_path / "straight/student/model.safetensors")
    b = load_file(tmp_path / "resumed/student/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_worse_than_the_student_alone_is_said_at_run_time_and_first_in_the_report(
    tmp_path, tiny_recipe, capsys
):
    tiny_recipe["teacher"]["train"] |= {"epochs": 1, "lr": 0.001}  # a teacher that has barely learnt anything
    metrics = run_recipe(parse_recipe(tiny_recipe), tmp_path / "run")
    assert "warning: the teacher is not better than the student trained alone" in capsys.readouterr().out
    assert metrics["warnings"][0].startswith("the teacher is not better than the student trained alone")
    report = (tmp_path / "run" / "REPORT.md").read_text().splitlines()
    assert report[2].startswith("**Warning:** the teacher is not better")
    if metrics["models"]["student"]["test_errors"] > metrics["models"]["baseline"]["test_errors"]:
        assert "the teacher is no better than the student alone" in metrics["warnings"][1]


def test_a_good_teacher_raises_no_warning(tmp_path, tiny_recipe):
    tiny_recipe["teacher"]["train"] |= {"epochs": 8}
    metrics = run_recipe(parse_recipe(tiny_recipe), tmp_path / "run")
    assert metrics["validation"]["teacher"]["best"]["accuracy"] > metrics["validation"]["baseline"]["best"]["accuracy"]
    assert not [w for w in metrics["warnings"] if w.startswith("the teacher")]


def _lead_reference(teacher: np.ndarray, baseline: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Float64 NumPy: mean and standard error of the per-example cross-entropy difference baseline − teacher."""

    def cross_entropy(logits):
        shifted = logits - logits.max(1, keepdims=True)
        return -(shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(1)))

    diff = cross_entropy(baseline) - cross_entropy(teacher)
    return diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))


def test_the_teacher_check_needs_the_teacher_clearly_better_than_the_baseline(capsys):
    """Clearly better: at least as accurate, and a cross-entropy lead of more than two standard errors of the paired
    difference; else one line — "not better" (less accurate, or no lead) or "not clearly better" (within noise)."""
    from distill.evaluate import paired_loss_lead
    from distill.tasks.checks import teacher_check

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=40)
    onehot = np.eye(4)[labels]
    sharp, noise = 3.0 * onehot + rng.normal(size=(40, 4)), rng.normal(size=(40, 4))

    def lead(teacher, baseline):
        t, b = torch.from_numpy(teacher), torch.from_numpy(baseline)
        return paired_loss_lead(t.float(), b.float(), torch.from_numpy(labels))

    clearly = lead(sharp, noise)
    mean, se = _lead_reference(sharp.astype(np.float32), noise.astype(np.float32), labels)
    assert clearly["loss_lead"] == pytest.approx(mean, abs=1e-6) and clearly["standard_error"] == pytest.approx(
        se, abs=1e-6
    )
    assert clearly["loss_lead"] > 2 * clearly["standard_error"] and teacher_check(clearly) == []
    assert teacher_check(lead(noise, sharp))[0].startswith("the teacher is not better than the student trained alone")
    # a lead within two standard errors (Reuters R8, seed 1: 1.6 errors, a teacher worse on test) is not clear
    wobble = {**clearly, "loss_lead": 0.01, "standard_error": 0.02}
    assert teacher_check({**clearly, "loss_lead": 0.039, "standard_error": 0.02})[0].startswith("the teacher is not cl")
    assert teacher_check({**clearly, "loss_lead": 0.041, "standard_error": 0.02}) == []
    line = teacher_check(wobble)[0]
    assert line.startswith("the teacher is not clearly better than the student trained alone on the validation split")
    assert "0.0100 ± 0.0200 on 40 examples: within 2 standard errors" in line and "data.validation_fraction" in line
    assert "warning: the teacher is not clearly better" in capsys.readouterr().out
    # as accurate with a cross-entropy lead below zero but within the error: not clearly better; beyond it: not better
    assert teacher_check({**clearly, "loss_lead": -0.01, "standard_error": 0.02})[0].startswith("the teacher is not cl")
    assert teacher_check({**clearly, "loss_lead": -0.03, "standard_error": 0.02})[0].startswith("the teacher is not be")
    # less accurate with a lower cross-entropy is still "not better"
    assert teacher_check({**clearly, "teacher_accuracy": 0.5, "baseline_accuracy": 0.6})[0].startswith(
        "the teacher is not better"
    )


def test_a_fired_teacher_check_is_answered_when_the_distilled_student_wins_all_the_same():
    from distill.tasks.checks import student_warnings

    results = {"student": {"test_errors": 227}, "baseline": {"test_errors": 259}}
    line = student_warnings(results, {}, teacher_weak=True)[0]
    assert line.startswith("the distilled student beats the student trained alone on the test split all the same")
    assert "(test errors 227 vs 259)" in line
    assert student_warnings(results, {}, teacher_weak=False) == []
    results["student"]["test_errors"] = 300
    assert student_warnings(results, {}, teacher_weak=True)[0].startswith("the distilled student is worse")
