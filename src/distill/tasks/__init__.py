"""The table of tasks: what the CLI, the recipe parser, the report and export look a task up in.

A row names the task's recipe schema, its run function, how its report summarises it, how its student is loaded
for export, which formats that student can take, and the task module itself (its declared stages, which ``distill
run`` and ``distill plan`` walk, and its ``distill init`` recipe). Adding a task is one module in this package and
one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.export.run_export import FORMATS, GGUF, check_target, export_student, model_type
from distill.io import STAGE_DONE
from distill.recipe import (
    EmbeddingRecipe,
    GenerateRecipe,
    LMRecipe,
    Recipe,
    TextClassificationRecipe,
    read_recipe,
)
from distill.recipe import parse_recipe as parse_with
from distill.report import ReportView, read_metrics, write_report
from distill.report.compare import compare
from distill.tasks import causal_lm, classifier, embedding, text_classification


@dataclass(frozen=True)
class Task:
    schema: type
    run: Callable | None = None  # (recipe, out, *, resume, force, on_step) -> metrics; None: not a `distill run` task
    report: ReportView | None = None
    load_student: Callable | None = None  # run folder -> export.run_export.Student
    export_formats: Callable[[Path], list[str]] = lambda student_folder: []
    student: str = ""  # what its student is, for messages
    command: str = "run"  # the command that takes its recipes
    module: object = None  # the task module: its stages, setup, teacher, prepare, ... (tasks/skeleton.py)


TASKS: dict[str, Task] = {
    "classification": Task(
        Recipe,
        classifier.run,
        classifier.VIEW,
        classifier.load_student,
        classifier.export_formats,
        "a classifier",
        module=classifier,
    ),
    "causal_lm": Task(
        LMRecipe,
        causal_lm.run,
        causal_lm.VIEW,
        causal_lm.load_student,
        causal_lm.export_formats,
        "a causal LM",
        module=causal_lm,
    ),
    "generate": Task(GenerateRecipe, command="generate"),
    "text_classification": Task(
        TextClassificationRecipe,
        text_classification.run,
        text_classification.VIEW,
        text_classification.load_student,
        text_classification.export_formats,
        "a text classifier (an HF sequence-classification folder)",
        module=text_classification,
    ),
    "embedding": Task(
        EmbeddingRecipe,
        embedding.run,
        embedding.VIEW,
        embedding.load_student,
        embedding.export_formats,
        "a sentence encoder",
        module=embedding,
    ),
}
SCHEMAS = {name: task.schema for name, task in TASKS.items()}


def parse_recipe(raw: Any, source: str = "recipe"):
    return parse_with(raw, SCHEMAS, source)


def load_recipe(path: str | Path, overrides: list[str] | None = None):
    """A recipe file with ``--set`` overrides, validated by its task's schema; one line on any problem."""
    return parse_recipe(read_recipe(path, overrides), str(path))


def task_of(recipe) -> str:
    return next(name for name, task in TASKS.items() if isinstance(recipe, task.schema))


def run_recipe(recipe, out: Path, **kwargs) -> dict:
    name = task_of(recipe)
    task = TASKS[name]
    if task.run is None:
        raise DistillError(f"a task: {name} recipe is not trained by distill run; run it with distill {task.command}")
    return task.run(recipe, Path(out), **kwargs)


def task_of_run(run_dir: Path) -> str:
    """The task of a run folder, from its resolved recipe."""
    return task_of(load_recipe(Path(run_dir) / "recipe.yaml"))


def report(run_dir: Path) -> Path:
    """Rewrite a finished run's REPORT.md, report.html and plots (the task is the one its metrics.json names)."""
    metrics = read_metrics(run_dir)
    return write_report(run_dir, TASKS[metrics.get("task", "classification")].report)


def export_run(run_dir: Path, fmt: str, out: Path | None = None, *, force: bool = False) -> dict:
    """``distill export``: the run's student as ``fmt`` in ``out`` (default ``RUN/exports/<fmt>/``), checked."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise DistillError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    folder = run_dir / "student"
    if not (folder / STAGE_DONE).exists():
        raise DistillError(
            f"no finished student in {run_dir}; finish it with distill run RECIPE --out {run_dir} --resume"
        )
    name = task_of_run(run_dir)
    task = TASKS[name]
    allowed = task.export_formats(folder)
    if fmt not in allowed:
        if fmt in GGUF:
            what = f"a {model_type(folder)} causal LM" if name == "causal_lm" else task.student
            reason = f"{fmt} needs a Llama-family causal LM student (the GGUF writer knows only llama)"
        else:
            what, reason = task.student, f"{fmt} is not written for task {name} yet"
        raise DistillError(f"{reason}; this run's student is {what}; it can be exported as: {', '.join(allowed)}")
    target = Path(out) if out is not None else run_dir / "exports" / fmt
    check_target(target, fmt, run_dir, force=force)  # before the student is loaded
    result = export_student(task.load_student(run_dir, fmt), fmt, target, run_dir, force=force)
    if (run_dir / "metrics.json").exists():  # the report lists every export with its check
        write_report(run_dir, task.report)
    return result


def compare_runs(run_dirs: list[Path], out: Path) -> Path:
    """``distill compare``: finished runs of one task side by side (COMPARE.md, compare.html, compare.png)."""
    runs = []
    for run_dir in map(Path, run_dirs):
        metrics = read_metrics(run_dir)
        runs.append((run_dir, metrics, TASKS[metrics.get("task", "classification")].report))
    return compare(runs, out)
