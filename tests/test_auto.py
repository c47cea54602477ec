"""``temperature: auto`` and ``alpha: auto`` (issue 18): a short sweep on the validation split, on the teacher outputs
the run already has; the choice, the table and its cost in metrics.json and the report; exact resume; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from distill.errors import DistillError
from distill.recipe import DistillSpec, TrainSpec
from distill.tasks import parse_recipe, run_recipe
from distill.tasks.common import AUTO_ALPHAS, AUTO_TEMPERATURES, auto_budget, choose_auto


def fake_candidate(scores: dict, calls: list):
    """A candidate whose validation scores are looked up by (temperature, alpha)."""

    def candidate(name: str, settings: DistillSpec, budget: TrainSpec) -> dict:
        calls.append((name, settings.temperature, settings.alpha, budget.epochs))
        return scores[(settings.temperature, settings.alpha)]

    return candidate


def test_the_sweep_takes_temperatures_then_alphas_at_the_best_temperature(tmp_path):
    losses = {(t, a): abs(t - 4.0) + abs(a - 0.5) for t in AUTO_TEMPERATURES for a in AUTO_ALPHAS}
    scores = {key: {"loss": value, "accuracy": 0.5} for key, value in losses.items()}
    calls = []
    spec = DistillSpec(temperature="auto", alpha="auto", loss="reverse_kl")
    chosen, record = choose_auto(spec, tmp_path, fake_candidate(scores, calls), train=TrainSpec(epochs=8))
    assert [(t, a) for _, t, a, _ in calls] == [(1, 0.1), (2, 0.1), (4, 0.1), (8, 0.1), (4, 0.0), (4, 0.5)]
    assert all(epochs == 2 for *_, epochs in calls)
    assert (chosen.temperature, chosen.alpha, chosen.loss) == (4.0, 0.5, "reverse_kl")  # the rest kept
    assert record["choice"] == {"temperature": 4.0, "alpha": 0.5} and record["candidates"] == 6
    assert record["table"] == json.loads((tmp_path / "auto.json").read_text())["table"]
    # a resumed sweep trains none of the candidates it already has
    again = []
    choose_auto(spec, tmp_path, fake_candidate(scores, again), train=TrainSpec(epochs=8))
    assert again == []


def test_the_sweep_ranks_by_select_by_and_breaks_ties_by_loss(tmp_path):
    scores = {
        (1.0, 0.3): {"loss": 0.9, "accuracy": 0.8},
        (2.0, 0.3): {"loss": 0.5, "accuracy": 0.9},
        (4.0, 0.3): {"loss": 0.4, "accuracy": 0.9},  # same accuracy, lower loss
        (8.0, 0.3): {"loss": 0.1, "accuracy": 0.7},  # best loss, worse accuracy
    }
    spec = DistillSpec(temperature="auto", alpha=0.3)
    chosen, record = choose_auto(spec, tmp_path, fake_candidate(scores, []), train=TrainSpec(select_by="accuracy"))
    assert (chosen.temperature, chosen.alpha) == (4.0, 0.3) and record["choice"] == {"temperature": 4.0}
    assert record["candidates"] == 4
    fixed, none = choose_auto(DistillSpec(temperature=2.0), tmp_path / "x", fake_candidate({}, []), train=TrainSpec())
    assert fixed.temperature == 2.0 and none is None


def test_each_candidate_gets_a_quarter_of_the_students_budget_or_auto_epochs():
    quarter = auto_budget(DistillSpec(), TrainSpec(epochs=8, lr=0.3))
    assert quarter.model_dump() == TrainSpec(epochs=2, lr=0.3).model_dump()
    assert auto_budget(DistillSpec(), TrainSpec(epochs=3)).epochs == 1
    assert auto_budget(DistillSpec(), TrainSpec(max_steps=100)).max_steps == 25
    spec = auto_budget(DistillSpec(auto_epochs=3), TrainSpec(max_steps=100))
    assert (spec.epochs, spec.max_steps) == (3, None)


def _auto_recipe(tiny_recipe, **distill):
    tiny_recipe["student"]["train"] |= {"epochs": 4}
    tiny_recipe["distill"] = {"temperature": "auto", "alpha": "auto", **distill}
    return parse_recipe(tiny_recipe)


def test_auto_classifier_run_records_the_sweep_and_trains_the_student_with_the_choice(tmp_path, tiny_recipe):
    recipe = _auto_recipe(tiny_recipe)
    metrics = run_recipe(recipe, tmp_path / "auto")
    auto = metrics["auto"]
    assert auto["budget_each"] == {"epochs": 1} and auto["candidates"] == 6 and auto["select_by"] == "loss"
    best = min(auto["table"], key=lambda row: row["loss"])
    assert auto["choice"] == {"temperature": best["temperature"], "alpha": best["alpha"]}
    assert metrics["distill"]["temperature"] == best["temperature"] and metrics["distill"]["alpha"] == best["alpha"]
    assert auto["seconds"] == pytest.approx(sum(row["seconds"] for row in auto["table"]), abs=0.2)
    # each row is its candidate's best validation, as logged, and the candidates leave no folders behind
    log = [json.loads(line) for line in (tmp_path / "auto/log.jsonl").read_text().splitlines()]
    for row in auto["table"]:
        stage = f"auto-T{row['temperature']:g}-a{row['alpha']:g}"
        logged = [e["validation"]["loss"] for e in log if e["stage"] == stage and "validation" in e]
        assert logged and row["loss"] == min(logged)
        assert not (tmp_path / "auto" / stage).exists()
    report = (tmp_path / "auto/REPORT.md").read_text()
    assert "## Automatic settings" in report and f"temperature {best['temperature']:g}" in report
    # the student is the one a recipe with the chosen numbers trains: auto only chooses
    tiny_recipe["distill"] = auto["choice"]
    run_recipe(parse_recipe(tiny_recipe), tmp_path / "fixed")
    for stage in ("baseline", "student"):
        auto_weights = load_file(tmp_path / "auto" / stage / "model.safetensors")
        fixed_weights = load_file(tmp_path / "fixed" / stage / "model.safetensors")
        assert all((auto_weights[k] == fixed_weights[k]).all() for k in auto_weights)


def test_an_interrupted_sweep_resumes_to_the_same_table_and_student(tmp_path, tiny_recipe):
    recipe = _auto_recipe(tiny_recipe, alpha=0.1)
    whole = run_recipe(recipe, tmp_path / "whole")

    def stop(stage: str, step: int) -> None:
        if stage == "auto-T4-a0.1" and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "cut", on_step=stop)
    assert len(json.loads((tmp_path / "cut/auto.json").read_text())["table"]) == 2
    resumed = run_recipe(recipe, tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in whole["auto"]["table"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed["auto"]["table"]] == strip
    a, b = (load_file(tmp_path / run / "student/model.safetensors") for run in ("whole", "cut"))
    assert all((a[k] == b[k]).all() for k in a)


def test_auto_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_recipe):
    tiny_recipe["distill"] = {"temperature": "auto"}
    tiny_recipe["data"] |= {"validation_fraction": 0}
    with pytest.raises(DistillError, match="distill.temperature: auto is chosen on the validation split"):
        parse_recipe(tiny_recipe)
    # digits with 5 % labels: a validation split of 10 examples cannot tell the candidates apart
    tiny_recipe["data"] = {"source": "digits", "labeled_fraction": 0.05, "validation_fraction": 0.1}
    with pytest.raises(DistillError, match=r"validation split, which has \d+ labeled examples \(needs 20\+\)"):
        run_recipe(parse_recipe(tiny_recipe), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(DistillError, match="auto is for classification and text_classification"):
        parse_recipe({"task": "causal_lm", "distill": {"alpha": "auto"}})
    with pytest.raises(DistillError, match="distill.alpha = 'x': must be a number, or auto"):
        parse_recipe({"distill": {"alpha": "x"}})


def test_auto_from_the_command_line_exits_2_with_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-c",
        "from distill.cli import main; main()",
        "run",
        "recipes/digits.yaml",
        "--out",
        str(tmp_path / "run"),
    ]
    cmd += ["--set", "distill.temperature=auto", "--set", "data.validation_fraction=0"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: recipes/digits.yaml: (recipe): distill.temperature: auto is chosen on the validation split: set "
        "data.validation_fraction > 0 (e.g. 0.1) or give a number"
    ]
    assert not (tmp_path / "run").exists()
