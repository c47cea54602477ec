"""Watching a run (issue 20): ``log_with`` sends every log.jsonl entry to accelerate's trackers as well, and the
progress bar shows the loss terms and the validation metric."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError
from distill.tasks import parse_recipe, run_recipe
from distill.train import progress_info, tracker_values

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def log_entries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar the run's TensorBoard files hold, tag → step → value (a repeated step: its last value)."""
    events = EventAccumulator(str(run_dir / "trackers" / run_dir.name), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def assert_trackers_match_the_log(run_dir: Path) -> None:
    """Each log.jsonl value is in TensorBoard under ``stage/key`` at the entry's step (float32 there)."""
    scalars = tensorboard_scalars(run_dir)
    checked = set()
    for entry in log_entries(run_dir):
        for tag, value in tracker_values(entry).items():
            assert scalars[tag][entry["step"]] == pytest.approx(value, rel=1e-6), (tag, entry["step"])
            checked.add(tag)
    assert {"student/loss", "student/kd", "student/ce", "student/validation/accuracy", "teacher/loss"} <= checked
    for tag, steps in scalars.items():  # and nothing that the log does not have
        stage = tag.split("/")[0]
        logged = {e["step"] for e in log_entries(run_dir) if e["stage"] == stage}
        assert set(steps) <= logged, tag


@pytest.fixture
def tracked_recipe(tiny_recipe):
    return tiny_recipe | {"baseline": False, "log_with": ["tensorboard"]}


def test_tensorboard_gets_every_training_term_and_validation_metric_of_the_log(tmp_path, tracked_recipe):
    run_dir = tmp_path / "tiny"
    run_recipe(parse_recipe(tracked_recipe), run_dir)
    assert list((run_dir / "trackers" / "tiny").glob("events.out.tfevents.*"))
    assert_trackers_match_the_log(run_dir)
    validations = [e for e in log_entries(run_dir) if e["stage"] == "student" and "validation" in e]
    assert len(validations) == 2  # one per epoch, both in TensorBoard
    assert set(tensorboard_scalars(run_dir)["student/validation/accuracy"]) == {e["step"] for e in validations}


def test_a_resumed_run_logs_to_the_trackers_again_from_its_checkpoint(tmp_path, tracked_recipe):
    class Interrupted(Exception):
        pass

    def interrupt(stage, step):
        if (stage, step) == ("student", 30):  # after the checkpoint at 28: steps 29 and 30 are logged twice
            raise Interrupted

    recipe = parse_recipe(tracked_recipe)
    run_dir = tmp_path / "tiny"
    with pytest.raises(Interrupted):
        run_recipe(recipe, run_dir, on_step=interrupt)
    run_recipe(recipe, run_dir, resume=True)
    assert_trackers_match_the_log(run_dir)
    steps = [e["step"] for e in log_entries(run_dir) if e["stage"] == "student" and "validation" not in e]
    assert steps == sorted(set(steps))  # log.jsonl itself has each step once
    assert set(tensorboard_scalars(run_dir)["student/loss"]) == set(steps)


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "trackio", "aim"])
def test_a_tracker_whose_package_is_missing_is_one_line(monkeypatch, tiny_recipe, tracker):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    for task in ({}, {"task": "embedding"}, {"task": "text_classification"}, {"task": "causal_lm"}):
        raw = (tiny_recipe if not task else task) | {"log_with": [tracker]}
        with pytest.raises(DistillError, match=f"log_with .*: {tracker} needs the {tracker} package: pip install "):
            parse_recipe(raw)


def test_a_missing_tracker_exits_2_with_one_line_before_any_work(tmp_path, tiny_recipe):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe | {"log_with": ["mlflow"]}))
    cli = [sys.executable, "-c", "from distill.cli import main; main()"]
    result = subprocess.run([*cli, "run", recipe, "--out", tmp_path / "run"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {recipe}: log_with = ['mlflow']: mlflow needs the mlflow package: pip install mlflow"
    ]
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_names_the_allowed_ones(tiny_recipe):
    with pytest.raises(DistillError, match="log_with.0 = 'wandb': Input should be 'tensorboard', 'mlflow'"):
        parse_recipe(tiny_recipe | {"log_with": ["wandb"]})


def test_progress_bar_shows_the_loss_terms_and_the_last_validation_metric():
    terms = {"loss": 0.41234, "kd": 0.3, "ce": 0.11}
    assert progress_info(terms, None, "accuracy") == "loss 0.4123  kd 0.3  ce 0.11"
    info = progress_info(terms, {"loss": 0.35, "accuracy": 0.912}, "accuracy")
    assert info == "loss 0.4123  kd 0.3  ce 0.11  val accuracy 0.912"
    assert progress_info(None, {"kl": 0.0123}, "kl") == "val kl 0.0123"
    assert progress_info(None, None, "loss") == ""


def test_tracker_values_are_the_entry_named_by_stage():
    training = {"stage": "student", "step": 5, "epoch": 0.25, "loss": 0.4, "kd": 0.3, "lr": 0.05}
    assert tracker_values(training) == {
        "student/epoch": 0.25,
        "student/loss": 0.4,
        "student/kd": 0.3,
        "student/lr": 0.05,
    }
    validation = {"stage": "teacher", "step": 21, "validation": {"loss": 0.2, "accuracy": 0.9}, "best": True}
    assert tracker_values(validation) == {"teacher/validation/loss": 0.2, "teacher/validation/accuracy": 0.9}
