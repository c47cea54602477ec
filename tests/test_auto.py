"""``temperature: auto``, ``alpha: auto`` and ``student.train.lr: auto`` (issue 18): a short sweep on the validation
split, on the teacher outputs the run already has; the choice, the table and its cost in metrics.json and the report;
exact resume; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from distill.errors import DistillError
from distill.recipe import DistillSpec, StudentTrainSpec, TrainSpec
from distill.tasks import parse_recipe, run_recipe
from distill.tasks.auto import AUTO_ALPHAS, AUTO_LRS, AUTO_TEMPERATURES, auto_budget, choose_auto, choose_baseline_lr


def fake_candidate(scores: dict, calls: list):
    """A candidate whose validation scores are looked up by (temperature, alpha), or by (temperature, alpha, lr)
    when the table has those keys; a hard-label candidate (settings None) by lr."""

    def candidate(name: str, settings: DistillSpec | None, budget: TrainSpec) -> dict:
        if settings is None:
            calls.append((name, budget.lr))
            return scores[budget.lr]
        calls.append((name, settings.temperature, settings.alpha, budget.epochs))
        key = (settings.temperature, settings.alpha)
        return scores[key] if key in scores else scores[(*key, budget.lr)]

    return candidate


def test_the_sweep_takes_temperatures_then_alphas_at_the_best_temperature(tmp_path):
    losses = {(t, a): abs(t - 4.0) + abs(a - 0.5) for t in AUTO_TEMPERATURES for a in AUTO_ALPHAS}
    scores = {key: {"loss": value, "accuracy": 0.5} for key, value in losses.items()}
    calls = []
    spec = DistillSpec(temperature="auto", alpha="auto", loss="reverse_kl")
    chosen, train, record = choose_auto(spec, tmp_path, fake_candidate(scores, calls), train=TrainSpec(epochs=8))
    # T 2 first (the point a learning-rate sweep would take), then the other temperatures, then α at the best T
    assert [(t, a) for _, t, a, _ in calls] == [(2, 0.1), (1, 0.1), (4, 0.1), (8, 0.1), (4, 0.0), (4, 0.5)]
    assert all(epochs == 2 for *_, epochs in calls)
    assert (chosen.temperature, chosen.alpha, chosen.loss) == (4.0, 0.5, "reverse_kl")  # the rest kept
    assert train == TrainSpec(epochs=8)
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
    train = TrainSpec(select_by="accuracy")
    chosen, _, record = choose_auto(spec, tmp_path, fake_candidate(scores, []), train=train)
    assert (chosen.temperature, chosen.alpha) == (4.0, 0.3) and record["choice"] == {"temperature": 4.0}
    assert record["candidates"] == 4
    fixed, same, none = choose_auto(DistillSpec(temperature=2.0), tmp_path / "x", fake_candidate({}, []), train=train)
    assert fixed.temperature == 2.0 and same == train and none is None


def test_lr_auto_sweeps_the_rate_first_then_temperature_and_alpha_at_it(tmp_path):
    lrs = AUTO_LRS["adamw"]
    scores = {
        (t, a, lr): {"loss": abs(t - 4) + abs(a - 0.1) + abs(lr - lrs[1]) * 1e3}
        for t in AUTO_TEMPERATURES
        for a in AUTO_ALPHAS
        for lr in lrs
    }
    calls = []
    spec, train = DistillSpec(temperature="auto", alpha="auto"), StudentTrainSpec(optimizer="adamw", lr="auto")
    chosen, trained_with, record = choose_auto(spec, tmp_path, fake_candidate(scores, calls), train=train)
    names = [call[0] for call in calls]
    assert names[:3] == [f"auto-T2-a0.1-lr{lr:g}" for lr in lrs]  # the rate at T 2, α 0.1
    assert names[3:] == [
        "auto-T1-a0.1-lr0.0003",
        "auto-T4-a0.1-lr0.0003",
        "auto-T8-a0.1-lr0.0003",
        "auto-T4-a0-lr0.0003",
        "auto-T4-a0.5-lr0.0003",
    ]
    assert record["choice"] == {"temperature": 4.0, "alpha": 0.1, "lr": lrs[1]} and record["candidates"] == 8
    assert (chosen.temperature, chosen.alpha, trained_with.lr) == (4.0, 0.1, lrs[1])
    # only the rate auto: three runs at the recipe's temperature and α
    calls = []
    fixed = DistillSpec(temperature=4.0, alpha=0.1)
    _, trained_with, record = choose_auto(fixed, tmp_path / "lr", fake_candidate(scores, calls), train=train)
    assert [c[0] for c in calls] == [f"auto-T4-a0.1-lr{lr:g}" for lr in lrs] and record["choice"] == {"lr": lrs[1]}


def test_the_baseline_gets_its_own_rate_sweep_on_hard_labels(tmp_path):
    """A fair baseline: lr: auto gives the student trained alone the same chance (its own sweep, same budget)."""
    sgd = AUTO_LRS["sgd"]
    scores = {lr: {"loss": 1.0, "accuracy": acc} for lr, acc in zip(sgd, (0.5, 0.7, 0.7), strict=True)}
    calls = []
    train = StudentTrainSpec(lr="auto", epochs=4, select_by="accuracy")
    trained_with, record = choose_baseline_lr(DistillSpec(), tmp_path, fake_candidate(scores, calls), train=train)
    assert calls == [(f"auto-baseline-lr{lr:g}", lr) for lr in sgd]
    assert trained_with.lr == sgd[1] and record["choice"] == {"lr": sgd[1]}  # a tie: the first best
    assert record["budget_each"] == {"epochs": 1}
    assert json.loads((tmp_path / "auto.json").read_text())["baseline"] == record["table"]
    same, none = choose_baseline_lr(DistillSpec(), tmp_path / "x", fake_candidate({}, []), train=TrainSpec(lr=0.2))
    assert same.lr == 0.2 and none is None


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
        stage = f"auto-T{row['temperature']:g}-a{row['alpha']:g}-lr{row['lr']:g}"
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


def test_lr_auto_run_sweeps_baseline_and_student_apart_and_trains_each_with_its_choice(tmp_path, tiny_recipe):
    tiny_recipe["student"]["train"] |= {"epochs": 4, "lr": "auto"}
    metrics = run_recipe(parse_recipe(tiny_recipe), tmp_path / "auto")
    auto, baseline = metrics["auto"], metrics["auto"]["baseline"]
    assert [row["lr"] for row in auto["table"]] == [row["lr"] for row in baseline["table"]] == list(AUTO_LRS["sgd"])
    assert all(row["temperature"] == 3.0 and row["alpha"] == 0.1 for row in auto["table"])
    assert auto["choice"] == {"lr": min(auto["table"], key=lambda row: row["loss"])["lr"]}
    assert baseline["choice"] == {"lr": min(baseline["table"], key=lambda row: row["loss"])["lr"]}
    assert "## Automatic settings" in (tmp_path / "auto/REPORT.md").read_text()
    # each student is the one a recipe with its chosen rate trains
    for stage, lr in (("student", auto["choice"]["lr"]), ("baseline", baseline["choice"]["lr"])):
        tiny_recipe["student"]["train"]["lr"] = lr
        run_recipe(parse_recipe(tiny_recipe), tmp_path / f"fixed-{stage}")
        ours = load_file(tmp_path / "auto" / stage / "model.safetensors")
        fixed = load_file(tmp_path / f"fixed-{stage}" / stage / "model.safetensors")
        assert all((ours[k] == fixed[k]).all() for k in ours)


def test_an_interrupted_sweep_resumes_to_the_same_table_and_student(tmp_path, tiny_recipe):
    recipe = _auto_recipe(tiny_recipe, alpha=0.1)
    whole = run_recipe(recipe, tmp_path / "whole")

    def stop(stage: str, step: int) -> None:
        if stage == "auto-T4-a0.1-lr0.05" and step == 3:
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
    tiny_recipe |= {"distill": {"temperature": 2.0}, "student": {"train": {"lr": "auto"}}}
    tiny_recipe["data"]["validation_fraction"] = 0
    with pytest.raises(DistillError, match="student.train.lr: auto is chosen on the validation split"):
        parse_recipe(tiny_recipe)
    with pytest.raises(DistillError, match="student.train.lr = 'fast': must be a number > 0, or auto"):
        parse_recipe({"student": {"train": {"lr": "fast"}}})
    with pytest.raises(DistillError, match="teacher.train.lr"):
        parse_recipe({"teacher": {"train": {"lr": "auto"}}})
    with pytest.raises(DistillError, match="student.train.lr: auto is for classification and text_classification"):
        parse_recipe({"task": "embedding", "student": {"from_teacher": {"keep": 2}, "train": {"lr": "auto"}}})


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
