"""`distill init TASK --teacher PATH --data PATH`: a commented starting recipe for a user's own teacher and data.

The recipe is the task's defaults written out with a comment on each choice, the data source read from what the
data folder holds; it is validated by the task's schema before it is written, so `distill run` accepts it. Sizes
and budgets are starting points to edit; the distillation settings of the classifier tasks are ``auto`` (chosen on
the validation split), the protocol bench/robustness.py runs on every data set we have.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.io import atomic_path
from distill.tasks import TASKS, parse_recipe


def templates() -> dict:
    """Each task's ``starter(teacher, data) -> str``, by task name (the tasks ``distill run`` trains)."""
    return {name: task.module.starter for name, task in TASKS.items() if task.module is not None}


def write_starter(task: str, teacher: Path | None, data: Path, out: Path, *, force: bool = False) -> Path:
    """Write the starting recipe of ``task`` for ``teacher`` and ``data`` to ``out`` (validated first)."""
    starters = templates()
    if task not in starters:
        raise DistillError(f"distill init: unknown task {task!r}; choose one of {', '.join(starters)}")
    if teacher is None and task != "classification":
        raise DistillError(f"distill init {task} needs --teacher PATH (the model to distil)")
    for what, path in (("--teacher", teacher), ("--data", data)):
        if path is not None and not path.exists():
            raise DistillError(f"{what} {path} does not exist")
    if out.exists() and not force:
        raise DistillError(f"{out} already exists; pass --force to replace it")
    resolved = None if teacher is None else teacher.expanduser().resolve()
    text = starters[task](resolved, data.expanduser().resolve())
    parse_recipe(yaml.safe_load(text), str(out))  # what init writes always validates
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
