"""The run skeleton every task shares: the run folder, the teacher-cache folder, "train this stage or load it"
with one marker, the int8 copy of the student, and the ending (metrics.json and the report)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from distill.errors import DistillError
from distill.export.quantize import WEIGHTS, load_int8
from distill.export.run_export import Student, export_student
from distill.io import atomic_path, fsync_path, fsync_tree, write_json
from distill.recipe import DistillSpec, TrainSpec, recipe_to_yaml
from distill.report import ReportView, write_report
from distill.train import LOWER_IS_BETTER, STAGE_DONE, remove_checkpoints, validation_summary

OnStep = Callable[[str, int], None] | None


def prepare_run_dir(recipe, out: Path, *, resume: bool, force: bool, accelerator=None) -> None:
    """Check and create the run folder. Under several processes only the main one does, and the others wait for it
    (if it refuses, the launcher stops them)."""
    if accelerator is not None and accelerator.num_processes > 1:
        if accelerator.is_main_process:
            prepare_run_dir(recipe, out, resume=resume, force=force)
        accelerator.wait_for_everyone()
        return
    saved = out / "recipe.yaml"
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise DistillError(
                f"run folder {out} already exists; pass --resume to continue it or --force to replace it"
            )
        elif saved.exists() and type(recipe).model_validate(yaml.safe_load(saved.read_text())) != recipe:
            raise DistillError(
                f"--resume: the recipe differs from the one {out} was started with ({saved}); "
                "resume with the same recipe or start a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(saved) as tmp:
        tmp.write_text(recipe_to_yaml(recipe))


def cache_root(distill_spec, out: Path) -> Path:
    """Where teacher caches go: the recipe's ``distill.cache_dir`` (shared between runs), else ``RUN/cache``."""
    return Path(distill_spec.cache_dir).expanduser() if distill_spec.cache_dir else out / "cache"


def stage_step(name: str, on_step: OnStep) -> Callable[[int], None] | None:
    """The loop's per-step callback for stage ``name`` (tests use it to stop a run at a chosen step)."""
    return (lambda step: on_step(name, step)) if on_step else None


def train_or_load(folder: Path, *, resume: bool, load: Callable, train: Callable, save: Callable, accelerator=None):
    """``load(folder)`` when a resumed run finished this stage before, else ``train()`` it; the main process then
    calls ``save(model, folder)``, makes it durable, writes the marker and only then drops the checkpoints (a save
    that replaces the whole folder drops them itself, once the new one is durable), so a power cut never loses
    both the weights and the checkpoints (every process holds the same weights)."""
    if resume and (folder / STAGE_DONE).exists():
        remove_checkpoints(folder)  # left by a crash between the marker and their removal
        return load(folder)
    model = train()
    if accelerator is None or accelerator.is_main_process:
        save(model, folder)
        fsync_tree(folder)  # some saves write files beside an atomic_dir, unsynced
        fsync_path(folder.parent)
        write_json(folder / STAGE_DONE, {"stage": folder.name})
        remove_checkpoints(folder)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return model


def machine(**extra) -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__, **extra}


def int8_student(out: Path, load_student: Callable[[Path], Student]):
    """The distilled student as dynamic int8 (what ``distill export RUN --format int8`` writes, checked on reload),
    as (model, weights file); None, with a warning, when the export fails its check."""
    try:
        result = export_student(load_student(out), "int8", out / "exports" / "int8", out, force=True)
    except DistillError as exc:
        print(f"warning: no int8 student in the comparison: {exc}")
        return None
    folder = Path(result["path"])
    return load_int8(folder), folder / WEIGHTS


def finish(out: Path, recipe, task: str, models: dict, view: ReportView, **sections) -> dict:
    """The ending of every run: ``metrics.json`` (models, the distillation settings and ``sections``) and the
    report."""
    metrics = {"recipe": recipe.name, "task": task, "models": models, **sections}
    write_json(out / "metrics.json", metrics)
    write_report(out, view)
    return metrics


def validated_scores(out: Path, stage: str, check: Callable, model) -> dict:
    """A stage's scores on the validation split: as logged for the weights it kept (its best), or computed with
    ``check`` when the log has none (a teacher loaded from a checkpoint, a run folder from before validation)."""
    summary = validation_summary(out, stage)
    return summary["best"] if summary else check(model)


def teacher_warnings(teacher: dict, baseline: dict, *, by_loss: bool = False) -> list[str]:
    """One line, printed now and put first in the report, when the teacher is no better than the student trained
    alone on the validation split (the validation scores of each): higher accuracy, or on a tie (small splits
    often tie) a lower loss; ``by_loss`` (language models): a lower loss. Soft labels cannot lift the student
    above such a teacher."""
    rank = (lambda m: -m["loss"]) if by_loss else (lambda m: (m["accuracy"], -m["loss"]))
    if rank(teacher) > rank(baseline):
        return []
    line = (
        f"the teacher is not better than the student trained alone on the validation split (accuracy "
        f"{teacher['accuracy']:.2%} vs {baseline['accuracy']:.2%}, loss {teacher['loss']:.4f} vs "
        f"{baseline['loss']:.4f}): soft labels cannot lift a student above a teacher no better than itself; make the "
        "teacher stronger (train it longer or larger, or start from a better checkpoint)"
    )
    print(f"warning: {line}", flush=True)
    return [line]


def student_warnings(
    results: dict,
    validation: dict,
    *,
    teacher_weak: bool,
    auto: bool = False,
    quality: str = "test_errors",
    noun: str = "test errors",
) -> list[str]:
    """When the distilled student loses to the baseline on the test split (a higher ``quality``, which is lower
    when better): that first, with the likely reason read from the numbers."""
    if "baseline" not in results or results["student"][quality] <= results["baseline"][quality]:
        return []
    s, b = results["student"][quality], results["baseline"][quality]
    if isinstance(s, float):
        s, b = f"{s:.4g}", f"{b:.4g}"
    summary = validation.get("student") or {}
    if teacher_weak:
        reason = "the teacher is no better than the student alone (above)"
    elif summary.get("still_improving"):
        reason = "the student was still improving on validation when training ended: train it longer"
    elif auto:
        reason = (
            "the temperature and α were already the best of the sweep on validation (below), so the teacher's lead "
            "over the student alone is too small to carry over: a stronger teacher or more unlabeled inputs help most"
        )
    else:
        reason = "try another distill.temperature (e.g. 2-10) or a hard-label weight distill.alpha (e.g. 0.1-0.5)"
    return [
        f"the distilled student is worse than the student trained alone on the test split ({noun} {s} vs {b}): {reason}"
    ]


# The auto sweep's grid. Coordinate search: the temperatures first, then α at the chosen temperature (6 short runs
# when both are auto, not 12). The values span what the literature and our benches use (BENCHMARKS.md).
AUTO_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
AUTO_ALPHAS = (0.0, 0.1, 0.5)
AUTO_ALPHA_WHILE_SWEEPING_T = 0.1
AUTO_TABLE = "auto.json"
AUTO_MIN_VALIDATION = 20  # fewer held-out examples cannot tell the candidates apart


def check_auto_data(distill: DistillSpec, validation_examples: int, noun: str = "examples") -> None:
    """Before any work: an ``auto`` setting needs a validation split big enough to choose on."""
    if distill.auto_keys and validation_examples < AUTO_MIN_VALIDATION:
        raise DistillError(
            f"distill.{distill.auto_keys[0]}: auto chooses on the validation split, which has {validation_examples} "
            f"labeled {noun} (needs {AUTO_MIN_VALIDATION}+): add labeled data, raise data.validation_fraction or "
            "give a number"
        )


Candidate = Callable[[str, DistillSpec, TrainSpec], dict]  # (stage name, settings, budget) → best validation scores


def auto_budget(distill: DistillSpec, train: TrainSpec) -> TrainSpec:
    """The student's training settings with the short budget each sweep candidate gets: ``distill.auto_epochs``
    epochs, else a quarter of the student's budget (epochs, or ``max_steps``), at least one."""
    if distill.auto_epochs:
        return train.model_copy(update={"epochs": distill.auto_epochs, "max_steps": None})
    if train.max_steps:
        return train.model_copy(update={"max_steps": max(1, train.max_steps // 4)})
    return train.model_copy(update={"epochs": max(1, train.epochs // 4)})


def choose_auto(
    distill: DistillSpec, out: Path, candidate: Candidate, *, train: TrainSpec, accelerator=None
) -> tuple[DistillSpec, dict | None]:
    """``distill`` with its ``auto`` settings chosen, and the sweep's record (None when nothing was auto).

    Each candidate is a short run of the student (``auto_budget``) from its initial weights on the teacher outputs
    the run already has, so the sweep costs student time only; it is ranked by its best validation
    ``train.select_by`` (ties: the loss). Every finished candidate is added to ``RUN/auto.json`` at once, so a
    resumed run skips it, and its folder is removed."""
    if not distill.auto_keys:
        return distill, None
    main = accelerator is None or accelerator.is_main_process
    budget, select_by = auto_budget(distill, train), train.select_by
    path = out / AUTO_TABLE
    table = json.loads(path.read_text())["table"] if path.exists() else []

    def run(temperature: float, alpha: float) -> dict:
        for row in table:
            if (row["temperature"], row["alpha"]) == (temperature, alpha):
                return row
        name = f"auto-T{temperature:g}-a{alpha:g}"
        started = time.perf_counter()
        scores = candidate(name, distill.model_copy(update={"temperature": temperature, "alpha": alpha}), budget)
        row = {"temperature": temperature, "alpha": alpha, **scores, "seconds": round(time.perf_counter() - started, 1)}
        table.append(row)
        if main:
            write_json(path, {"table": table})
            shutil.rmtree(out / name, ignore_errors=True)
        return row

    def rank(row: dict) -> tuple[float, float]:
        value = row[select_by] if LOWER_IS_BETTER[select_by] else -row[select_by]
        return value, row["loss"]

    temperatures = AUTO_TEMPERATURES if distill.temperature == "auto" else (distill.temperature,)
    alphas = AUTO_ALPHAS if distill.alpha == "auto" else (distill.alpha,)
    sweep_alpha = AUTO_ALPHA_WHILE_SWEEPING_T if distill.alpha == "auto" else distill.alpha
    best = min((run(t, sweep_alpha) for t in temperatures), key=rank)
    best = min((run(best["temperature"], a) for a in alphas), key=rank)
    choice = {key: best[key] for key in distill.auto_keys}
    record = {
        "choice": choice,
        "select_by": select_by,
        "budget_each": {"steps": budget.max_steps} if budget.max_steps else {"epochs": budget.epochs},
        "candidates": len(table),
        "seconds": round(sum(row["seconds"] for row in table), 1),
        "table": table,
    }
    settings = ", ".join(f"{key} {value:g}" for key, value in choice.items())
    if main:
        print(f"auto: chose {settings} from {len(table)} short runs on the validation split", flush=True)
    return distill.model_copy(update=choice), record


def candidate_scores(out: Path, name: str, accelerator=None) -> dict:
    """A finished sweep candidate's best validation scores, as its log says (read once every process is done, so
    the main process has written them)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return validation_summary(out, name)["best"]
