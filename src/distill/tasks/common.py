"""The run skeleton every task shares: the run folder, the teacher-cache folder, "train this stage or load it"
with one marker, the int8 copy of the student, and the ending (metrics.json and the report)."""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from distill.errors import DistillError
from distill.export.quantize import WEIGHTS, load_int8
from distill.export.run_export import Student, export_student
from distill.io import atomic_path, fsync_path, fsync_tree, write_json
from distill.recipe import recipe_to_yaml
from distill.report import ReportView, write_report
from distill.train import STAGE_DONE, remove_checkpoints, validation_summary

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
    results: dict, validation: dict, *, teacher_weak: bool, quality: str = "test_errors", noun: str = "test errors"
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
    else:
        reason = "try another distill.temperature (e.g. 2-10) or a hard-label weight distill.alpha (e.g. 0.1-0.5)"
    return [
        f"the distilled student is worse than the student trained alone on the test split ({noun} {s} vs {b}): {reason}"
    ]
