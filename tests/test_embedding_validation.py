"""The validation split of task: embedding: a seeded random part of each source's training texts, never trained on;
the student validated there (its training loss and cosine to the teacher's embeddings), best weights kept, early
stopping, exact resume; validation_fraction 0 trains on every text as before."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from text_fixtures import write_topic_csv

from distill.data.labeled_text import clauses, load_text_data, validation_mask
from distill.errors import DistillError
from distill.losses.embedding import embedding_losses
from distill.models.encoders import encode, load_encoder, pad_id_of, tokenize
from distill.recipe import EmbeddingRecipe
from distill.tasks import parse_recipe
from distill.tasks.embedding import load_embedding_student
from distill.tasks.embedding import run as run_embedding


def recipe_for(data_dir, teacher_dir, cache, student, loss="mse", **data) -> EmbeddingRecipe:
    return EmbeddingRecipe.model_validate(
        {
            "task": "embedding",
            "data": [{"source": "csv", "path": str(data_dir), "max_length": 16, **data}],
            "teacher": {"path": str(teacher_dir)},
            "student": student,
            "distill": {"loss": loss, "cache_dir": str(cache)},
            "eval": {"threads": 1, "batch_size": 8},
        }
    )


def log_lines(run_dir, stage="student"):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    entries = [e for e in map(json.loads, lines) if e["stage"] == stage]
    return [e for e in entries if "validation" not in e], [e for e in entries if "validation" in e]


def held_out_scores(run_dir, recipe: EmbeddingRecipe, teacher_dir) -> dict[str, float]:
    """The saved student's training loss and cosine to the teacher on the held-out texts, computed afresh."""
    texts = load_text_data(recipe.data[0], recipe.seed).train_texts
    held = validation_mask(len(texts), recipe.data[0].validation_fraction, recipe.seed, "csv")
    held_texts = [t for t, h in zip(texts, held, strict=True) if h]
    teacher, teacher_tok = load_encoder(teacher_dir)
    targets = torch.from_numpy(encode(teacher, tokenize(teacher_tok, held_texts, 16), pad_id_of(teacher_tok)))
    model, tokenizer = load_embedding_student(run_dir / "student", teacher.dim, teacher.normalize)
    predicted = torch.from_numpy(encode(model, tokenize(tokenizer, held_texts, 16), pad_id_of(tokenizer)))
    terms = embedding_losses(predicted, targets, recipe.distill.loss)
    return {"loss": terms["loss"].item(), "cosine": 1 - terms["cosine"].item()}


def with_clauses(data_dir) -> None:
    """Put a comma in every training text: two clauses of 3+ words each."""
    with (data_dir / "train.csv").open() as handle:
        rows = list(csv.reader(handle))
    with (data_dir / "train.csv").open("w", newline="") as handle:
        split = [[" ".join(t.split()[:3]) + ", " + " ".join(t.split()[3:]), label] for t, label in rows[1:]]
        csv.writer(handle).writerows(rows[:1] + split)


def test_held_out_texts_are_never_trained_on_and_validate_the_student_every_epoch(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    with_clauses(data_dir)
    train = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "log_every": 1}
    student = {"path": str(student_dir), "train": train}
    recipe = recipe_for(data_dir, teacher_dir, tmp_path / "cache", student, "mse+cosine", clauses=True)
    recipe = recipe.model_copy(update={"data": [recipe.data[0].model_copy(update={"validation_fraction": 0.2})]})
    metrics = run_embedding(recipe, tmp_path / "run")

    texts = load_text_data(recipe.data[0], recipe.seed).train_texts
    held = validation_mask(len(texts), 0.2, recipe.seed, "csv")
    kept = [t for t, h in zip(texts, held, strict=True) if not h]
    assert held.sum() == 12 and len(kept) == 48
    # 48 texts and their 96 clauses are trained on; the 12 held-out texts and their clauses are not
    assert metrics["data"]["csv"] == {
        "train_texts": 48,
        "validation_texts": 12,
        "clause_texts": 96,
        "test_texts": 30,
        "max_length": 16,
    }
    assert len(clauses(kept)) == 96
    training, validations = log_lines(tmp_path / "run")
    steps_per_epoch = (48 + 96 + 15) // 16
    assert training[-1]["step"] == 3 * steps_per_epoch
    assert [e["step"] for e in validations] == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert all(set(e["validation"]) == {"loss", "cosine"} for e in validations)
    summary = metrics["validation"]["student"]
    best = min(validations, key=lambda e: e["validation"]["loss"])
    assert summary["validations"] == 3 and summary["best"]["step"] == best["step"]
    # The logged figures are the training loss (mse+cosine) on exactly the held-out texts, of the weights kept.
    fresh = held_out_scores(tmp_path / "run", recipe, teacher_dir)
    assert fresh == pytest.approx(best["validation"], abs=1e-5)
    assert not (tmp_path / "run" / "student" / "best.pt").exists()  # dropped once the stage is saved
    assert "48 training / 12 validation / 30 test texts" in (tmp_path / "run" / "REPORT.md").read_text()


def test_validation_fraction_0_trains_on_every_text_without_validating(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    train = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "log_every": 1, "eval_every": 1}
    student = {"path": str(student_dir), "train": train}
    recipe = recipe_for(data_dir, teacher_dir, tmp_path / "cache", student, validation_fraction=0)
    metrics = run_embedding(recipe, tmp_path / "run")
    assert metrics["data"]["csv"]["train_texts"] == 60 and metrics["data"]["csv"]["validation_texts"] == 0
    training, validations = log_lines(tmp_path / "run")
    assert validations == [] and metrics["validation"] == {"student": None}
    assert [e["step"] for e in training] == list(range(1, 2 * 4 + 1))  # 60 texts: 4 batches of 16 per epoch
    assert not validation_mask(60, 0.0, 0, "csv").any()


def test_patience_stops_early_and_a_resumed_run_makes_the_same_choices(tmp_path, teacher_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    # the validation loss levels off after about 30 of the 120 steps
    train = {"epochs": 30, "batch_size": 16, "optimizer": "adamw", "lr": 0.3, "eval_every": 2, "patience": 2}
    student = {"from_teacher": {"keep": 2}, "train": train | {"checkpoint_every": 3}}
    recipe = recipe_for(data_dir, teacher_dir, tmp_path / "cache", student)
    run_embedding(recipe, tmp_path / "straight")
    _, validations = log_lines(tmp_path / "straight")
    assert validations[-1]["stopped"] and validations[-1]["step"] < 30 * 4
    assert [e["best"] for e in validations[-2:]] == [False, False]
    best = [e for e in validations if e["best"]][-1]  # the weights kept are the best ones, not the last
    kept = held_out_scores(tmp_path / "straight", recipe, teacher_dir)
    assert kept == pytest.approx(best["validation"], abs=1e-5) and kept["loss"] < validations[-1]["validation"]["loss"]

    class Interrupted(Exception):
        pass

    stop_at = validations[-2]["step"] + 1  # between the last two validations: the best, its count and best.pt in play

    def interrupt(stage, step):
        if (stage, step) == ("student", stop_at):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_embedding(recipe, tmp_path / "resumed", on_step=interrupt)
    run_embedding(recipe, tmp_path / "resumed", resume=True)
    assert log_lines(tmp_path / "resumed")[1] == validations
    a = load_file(tmp_path / "straight" / "student" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_static_tables_are_validated_only_when_trained(tmp_path, teacher_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    built = recipe_for(data_dir, teacher_dir, tmp_path / "cache", {"static": {"pca_dims": None}})
    metrics = run_embedding(built, tmp_path / "built")
    # built, never trained: no split (every text counts in the table) and no validation, quietly
    assert metrics["data"]["csv"]["train_texts"] == 60 and metrics["validation"] == {"student": None}
    tuned = {"static": {"pca_dims": None, "epochs": 2, "batch_size": 16}}
    metrics = run_embedding(recipe_for(data_dir, teacher_dir, tmp_path / "cache", tuned), tmp_path / "tuned")
    assert metrics["data"]["csv"]["train_texts"] == 54 and metrics["data"]["csv"]["validation_texts"] == 6
    _, validations = log_lines(tmp_path / "tuned")
    assert [e["step"] for e in validations] == [4, 8]  # 54 texts: 4 batches of 16 per epoch
    assert metrics["validation"]["student"]["validations"] == 2


def test_bad_validation_settings_are_one_line():
    base = {"task": "embedding", "student": {"from_teacher": {"keep": 2}}}
    for metric in ("accuracy", "kl", "agreement"):
        with pytest.raises(DistillError) as caught:
            parse_recipe(base | {"student": {"from_teacher": {"keep": 2}, "train": {"select_by": metric}}})
        line = str(caught.value)
        assert "\n" not in line and f"student.train.select_by {metric!r} has nothing to measure" in line
        assert "use select_by: loss" in line
    no_split = base | {"data": [{"validation_fraction": 0}], "student": {"path": "x", "train": {"patience": 2}}}
    with pytest.raises(DistillError, match="student.train.patience needs a validation split"):
        parse_recipe(no_split)
    parse_recipe(base | {"student": {"path": "x", "train": {"patience": 2}}})  # the default split allows it
    for count in (0, 1):
        with pytest.raises(DistillError, match=r"add training texts or set data.validation_fraction: 0$"):
            validation_mask(count, 0.1, 0, "csv")
    assert validation_mask(2, 0.1, 0, "csv").sum() == 1  # at least one text held out, at least one trained on


def test_the_split_is_seeded_and_leaves_the_test_split_alone(tmp_path):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    spec = recipe_for(data_dir, "t", tmp_path, {"from_teacher": {"keep": 2}}).data[0]
    a, b, other = (validation_mask(60, 0.1, seed, "csv") for seed in (0, 0, 1))
    assert a.sum() == 6 and np.array_equal(a, b) and not np.array_equal(a, other)
    # the test texts are read as they are whatever the split: it only ever takes from the training texts
    assert (
        load_text_data(spec, 0).test_texts
        == load_text_data(spec.model_copy(update={"validation_fraction": 0})).test_texts
    )
