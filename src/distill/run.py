"""The classifier recipe, start to finish: teacher → cache → baseline student → distilled student →
evaluation → report. Each stage leaves ``RUN/<stage>/model.safetensors`` when done; a resumed run skips
finished stages and continues the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.data.arrays import ArrayData, load_data
from distill.errors import DistillError
from distill.evaluate import classifier_metrics, predict_logits
from distill.io import atomic_path, sha256_file, write_json
from distill.models.classifiers import build_classifier, load_classifier, save_classifier
from distill.recipe import ModelSpec, Recipe, load_recipe, recipe_to_yaml
from distill.report import write_report
from distill.teachers.cache import build_logits_cache
from distill.teachers.live import LiveTeacher
from distill.train import Stage, make_accelerator, remove_checkpoints, train_stage


def prepare_run_dir(recipe: Recipe, out: Path, *, resume: bool, force: bool, accelerator=None) -> None:
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
        elif saved.exists() and load_recipe(saved) != recipe:
            raise DistillError(
                f"--resume: the recipe differs from the one {out} was started with ({saved}); "
                "resume with the same recipe or start a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(saved) as tmp:
        tmp.write_text(recipe_to_yaml(recipe))


def _train_or_load(
    name: str,
    spec: ModelSpec,
    stage_kwargs: dict,
    data: ArrayData,
    out: Path,
    accelerator: Accelerator,
    *,
    seed: int,
    resume: bool,
    on_step,
) -> tuple[torch.nn.Module, Path]:
    """Build the model (seeded), train it unless its final weights exist, save it."""
    weights = out / name / "model.safetensors"
    if resume and weights.exists():
        return load_classifier(weights, spec, data.input_shape, data.num_classes), weights
    torch.manual_seed(seed)
    model = build_classifier(spec, data.input_shape, data.num_classes)
    torch.manual_seed(seed + 1)  # the RNG stream of training (dropout, jitter), restored on resume
    stage = Stage(name=name, model=model, **stage_kwargs)
    model = train_stage(
        stage,
        data.train_x,
        data.train_y,
        out,
        accelerator,
        seed=seed,
        input_shape=data.input_shape,
        resume=resume,
        on_step=(lambda step: on_step(name, step)) if on_step else None,
    )
    if accelerator.is_main_process:  # every process holds the same weights; one writes them
        save_classifier(model, out / name, spec, data.input_shape, data.num_classes)
        remove_checkpoints(out / name)
    accelerator.wait_for_everyone()
    return model, weights


def run(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[str, int], None] | None = None,
) -> dict:
    out = Path(out)
    data = load_data(recipe.data, recipe.seed)
    if recipe.distill.signal == "cache" and recipe.student.train.jitter:
        raise DistillError("student.train.jitter needs distill.signal: live (a cache holds unshifted inputs)")
    for spec in (recipe.teacher.model, recipe.student.model):  # a bad model spec fails before any work
        build_classifier(spec, data.input_shape, data.num_classes)
    accelerator = make_accelerator(recipe.mixed_precision)
    prepare_run_dir(recipe, out, resume=resume, force=force, accelerator=accelerator)
    common = {"seed": recipe.seed, "resume": resume, "on_step": on_step}

    if recipe.teacher.checkpoint:
        teacher_weights = Path(recipe.teacher.checkpoint).expanduser()
        teacher = load_classifier(teacher_weights, recipe.teacher.model, data.input_shape, data.num_classes)
    else:
        teacher, teacher_weights = _train_or_load(
            "teacher", recipe.teacher.model, {"train": recipe.teacher.train}, data, out, accelerator, **common
        )
    live = LiveTeacher(teacher, accelerator.device)
    teacher_id = sha256_file(teacher_weights)[:16]
    if recipe.distill.signal == "cache":
        cache_dir = Path(recipe.distill.cache_dir).expanduser() if recipe.distill.cache_dir else out / "cache"
        with accelerator.main_process_first():  # the main process builds it, the others open it
            signal = build_logits_cache(
                cache_dir / f"teacher-{teacher_id}",
                live,
                data.train_x,
                teacher_id=teacher_id,
                data_id=data.fingerprint(),
            )
    else:
        signal = live

    student_seed = recipe.seed + 1000  # baseline and distilled student start from the same weights
    models = {"teacher": (teacher, teacher_weights)}
    if recipe.baseline:
        models["baseline"] = _train_or_load(
            "baseline",
            recipe.student.model,
            {"train": recipe.student.train},
            data,
            out,
            accelerator,
            **common | {"seed": student_seed},
        )
    models["student"] = _train_or_load(
        "student",
        recipe.student.model,
        {"train": recipe.student.train, "teacher": signal, "distill": recipe.distill},
        data,
        out,
        accelerator,
        **common | {"seed": student_seed},
    )
    if not accelerator.is_main_process:  # evaluation, export and report: once, by the main process
        return {}
    metrics = evaluate_models(recipe, with_int8_student(out, models), data)
    if "student_int8" in metrics["models"]:
        metrics["models"]["student_int8"]["parameters"] = metrics["models"]["student"]["parameters"]
    write_json(out / "metrics.json", metrics)
    write_report(out)
    return metrics


def int8_student(out: Path) -> tuple[torch.nn.Module, Path]:
    """The distilled student as dynamic int8 (``distill export RUN --format int8``, checked on reload)."""
    from distill.export.quantize import WEIGHTS, load_int8
    from distill.export.run_export import export_run

    folder = Path(export_run(out, "int8", force=True)["path"])
    return load_int8(folder), folder / WEIGHTS


def with_int8_student(out: Path, models: dict) -> dict:
    """``models`` plus the int8 student; a failed export check is reported and the run goes on without it."""
    try:
        return models | {"student_int8": int8_student(out)}
    except DistillError as exc:
        print(f"warning: no int8 student in the comparison: {exc}")
        return models


def evaluate_models(recipe: Recipe, models: dict, data: ArrayData) -> dict:
    teacher_logits = predict_logits(models["teacher"][0], data.test_x)
    results = {
        name: classifier_metrics(
            model,
            weights,
            data.test_x,
            data.test_y,
            None if name == "teacher" else teacher_logits,
            threads=recipe.eval.threads,
            runs=recipe.eval.latency_runs,
        )
        for name, (model, weights) in models.items()
    }
    return {
        "recipe": recipe.name,
        "task": "classification",
        "models": results,
        "distill": recipe.distill.model_dump(mode="json"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "torch": torch.__version__,
            "cpu_threads_for_latency": recipe.eval.threads,
        },
    }
