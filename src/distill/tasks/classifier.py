"""The classifier recipe (task: classification), start to finish: teacher → cache → baseline student → distilled
student → evaluation → report. Each stage leaves ``RUN/<stage>/model.safetensors`` when done; a resumed run skips
finished stages and continues the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from distill.data.arrays import ArrayData, load_data
from distill.errors import DistillError
from distill.evaluate import classifier_metrics, paired_loss_lead, predict_logits, validation_scores
from distill.export.run_export import CLASSIFIER_EXAMPLES, Student
from distill.models.classifiers import build_classifier, load_classifier, save_classifier
from distill.recipe import DistillSpec, ModelSpec, Recipe, TrainSpec, auto_settings, load_recipe_as
from distill.report import ACCURACY_COLUMNS, accuracy_view
from distill.tasks.auto import candidate_scores, check_auto_data, choose_auto, choose_baseline_lr
from distill.tasks.checks import student_warnings, teacher_check
from distill.tasks.skeleton import (
    OnStep,
    comparison,
    finish,
    int8_student,
    machine,
    prepare_run_dir,
    stage_step,
)
from distill.tasks.skeleton import train_or_load as train_or_load_stage
from distill.teachers.identity import file_id
from distill.teachers.live import LiveTeacher
from distill.teachers.logits_cache import build_logits_cache
from distill.teachers.store import cache_root
from distill.train import Stage, Validator, make_accelerator, train_stage, validation_summary


def run(recipe: Recipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None) -> dict:
    out = Path(out)
    data = load_data(recipe.data, recipe.seed)
    if recipe.distill.signal == "cache" and recipe.student.train.jitter:
        raise DistillError("student.train.jitter needs distill.signal: live (a cache holds unshifted inputs)")
    for spec in (recipe.teacher.model, recipe.student.model):  # a bad model spec fails before any work
        build_classifier(spec, data.input_shape, data.num_classes)
    check_auto_data(auto_settings(recipe.distill, recipe.student.train), 0 if data.val_y is None else len(data.val_y))
    accelerator = make_accelerator(recipe.mixed_precision, recipe.log_with, out)
    prepare_run_dir(recipe, out, resume=resume, force=force, accelerator=accelerator)
    common = {"seed": recipe.seed, "resume": resume, "on_step": on_step}

    if recipe.teacher.checkpoint:
        teacher_weights = Path(recipe.teacher.checkpoint).expanduser()
        teacher = load_classifier(teacher_weights, recipe.teacher.model, data.input_shape, data.num_classes)
    else:
        teacher, teacher_weights = train_or_load(
            "teacher",
            recipe.teacher.model,
            {"train": recipe.teacher.train},
            data,
            out,
            accelerator,
            **common | {"validator": validator(data)},
        )
    teacher_on_validation = predict_logits(teacher, data.val_x) if data.val_x is not None else None
    check = validator(data, teacher_on_validation)
    live = LiveTeacher(teacher, accelerator.device)
    teacher_id = file_id(teacher_weights)
    if recipe.distill.signal == "cache":
        with accelerator.main_process_first():  # the main process builds it, the others open it
            signal = build_logits_cache(
                cache_root(recipe.distill, out) / f"teacher-{teacher_id}",
                live,
                data.train_x,
                teacher_id=teacher_id,
                data_id=data.fingerprint(),
            )
    else:
        signal = live

    student_seed = recipe.seed + 1000  # baseline and distilled student start from the same weights

    def candidate(name: str, settings: DistillSpec | None, budget: TrainSpec) -> dict:
        kwargs = {"train": budget} | ({"teacher": signal, "distill": settings} if settings else {})
        train(name, recipe.student.model, kwargs, data, out, accelerator, student_seed, resume, on_step, check)
        return candidate_scores(out, name, accelerator)

    models = {"teacher": (teacher, teacher_weights)}
    baseline_auto = None
    if recipe.baseline:
        baseline_train, baseline_auto = choose_baseline_lr(
            recipe.distill, out, candidate, train=recipe.student.train, accelerator=accelerator
        )
        models["baseline"] = train_or_load(
            "baseline",
            recipe.student.model,
            {"train": baseline_train},
            data,
            out,
            accelerator,
            **common | {"seed": student_seed, "validator": check},
        )
    warnings, lead = [], None
    if check is not None and recipe.baseline and accelerator.is_main_process:  # the main process writes the log
        baseline_on_validation = predict_logits(models["baseline"][0], data.val_x)  # the weights it kept
        lead = paired_loss_lead(teacher_on_validation, baseline_on_validation, torch.from_numpy(data.val_y))
        warnings = teacher_check(lead)

    distill, student_train, auto = choose_auto(
        recipe.distill, out, candidate, train=recipe.student.train, accelerator=accelerator
    )
    if auto and baseline_auto:
        auto["baseline"] = baseline_auto
    models["student"] = train_or_load(
        "student",
        recipe.student.model,
        {"train": student_train, "teacher": signal, "distill": distill},
        data,
        out,
        accelerator,
        **common | {"seed": student_seed, "validator": check},
    )
    if not accelerator.is_main_process:  # evaluation, export and report: once, by the main process
        return {}
    if int8 := int8_student(out, load_student):
        models["student_int8"] = int8
    results, logits = evaluate_models(recipe, models, data)
    classes = [str(c) for c in range(data.num_classes)]
    shown = comparison(logits, torch.from_numpy(data.test_y), lambda i: example(data, i), classes)
    if "student_int8" in results:
        results["student_int8"]["parameters"] = results["student"]["parameters"]
    distill = distill.model_dump(mode="json")
    environment = machine(processor=platform.machine(), cpu_threads_for_latency=recipe.eval.threads)
    validation = {name: validation_summary(out, name) for name in models if name != "student_int8"}
    warnings += student_warnings(results, validation, teacher_weak=bool(warnings), auto=auto is not None)
    extra = {"validation": validation, "warnings": warnings} | ({"auto": auto} if auto else {}) | shown
    extra |= {"teacher_check": lead} if lead else {}
    return finish(out, recipe, "classification", results, VIEW, distill=distill, machine=environment, **extra)


def example(data: ArrayData, index: int) -> dict:
    """Test example ``index`` as the report shows it: an image's pixels (grey, 0–255), or a vector's first values."""
    x = data.test_x[index].reshape(data.input_shape)
    if len(data.input_shape) < 2:
        return {"text": "features " + ", ".join(f"{v:.3g}" for v in x[:12]) + (" …" if x.size > 12 else "")}
    image = x[0] if len(data.input_shape) == 3 else x  # the first channel of a [C, H, W] image
    low, high = float(image.min()), float(image.max())
    grey = np.round(255 * (image - low) / (high - low or 1.0)).astype(np.uint8)
    return {"image": grey.tolist()}


def train_or_load(
    name: str,
    spec: ModelSpec,
    stage_kwargs: dict,
    data: ArrayData,
    out: Path,
    accelerator: Accelerator,
    *,
    seed: int,
    resume: bool,
    on_step: OnStep,
    validator: Validator | None = None,
) -> tuple[torch.nn.Module, Path]:
    """Build the model (seeded) and train it, unless a resumed run finished it; its weights file."""
    folder = out / name
    model = train_or_load_stage(
        folder,
        resume=resume,
        load=lambda f: load_classifier(f / "model.safetensors", spec, data.input_shape, data.num_classes),
        train=lambda: train(name, spec, stage_kwargs, data, out, accelerator, seed, resume, on_step, validator),
        save=lambda m, f: save_classifier(m, f, spec, data.input_shape, data.num_classes),
        accelerator=accelerator,
    )
    return model, folder / "model.safetensors"


def train(name, spec, stage_kwargs, data, out, accelerator, seed, resume, on_step, validator) -> torch.nn.Module:
    """A model built from ``seed`` and trained as stage ``name``."""
    torch.manual_seed(seed)
    model = build_classifier(spec, data.input_shape, data.num_classes)
    torch.manual_seed(seed + 1)  # the RNG stream of training (dropout, jitter), restored on resume
    stage = Stage(name=name, model=model, **stage_kwargs)
    return train_stage(
        stage,
        data.train_x,
        data.train_y,
        out,
        accelerator,
        seed=seed,
        input_shape=data.input_shape,
        resume=resume,
        on_step=stage_step(name, on_step),
        validator=validator,
    )


def validator(data: ArrayData, teacher_logits: torch.Tensor | None = None) -> Validator | None:
    """A model → its scores on the validation split (``evaluate.validation_scores``); None without a split."""
    if data.val_x is None:
        return None
    labels = torch.from_numpy(data.val_y)
    return lambda model: validation_scores(predict_logits(model, data.val_x), labels, teacher_logits)


def evaluate_models(recipe: Recipe, models: dict, data: ArrayData) -> tuple[dict, dict]:
    """Every model's metrics on the test split, and its test logits (computed once, also for the report)."""
    logits = {name: predict_logits(model, data.test_x) for name, (model, _) in models.items()}
    results = {
        name: classifier_metrics(
            model,
            weights,
            logits[name],
            data.test_x,
            data.test_y,
            None if name == "teacher" else logits["teacher"],
            threads=recipe.eval.threads,
            runs=recipe.eval.latency_runs,
        )
        for name, (model, weights) in models.items()
    }
    return results, logits


def load_student(run_dir: Path) -> Student:
    """The finished student and the held-out inputs its export is checked on."""
    folder = run_dir / "student"
    info = json.loads((folder / "model.json").read_text())
    spec, shape = ModelSpec(**info["model"]), tuple(info["input_shape"])

    def reload(export: Path) -> torch.nn.Module:
        return load_classifier(export / "model.safetensors", spec, shape, info["num_classes"])

    recipe = load_recipe_as(Recipe, run_dir / "recipe.yaml")
    test_x = load_data(recipe.data, recipe.seed).test_x[:CLASSIFIER_EXAMPLES]
    inputs = np.ascontiguousarray(test_x, dtype=np.float32)
    return Student("classifier", reload(folder).eval(), folder, inputs, info=info, reload=reload)


def export_formats(student_folder: Path) -> list[str]:
    return ["safetensors", "int8", "onnx", "onnx-int8"]


def note(metrics: dict) -> str:
    machine = metrics.get("machine", {})
    return (
        f"Latency: median of repeated batch-1 forward passes after warm-up, "
        f"{machine.get('cpu_threads_for_latency', '?')} CPU thread(s), torch {machine.get('torch', '?')}, "
        f"{machine.get('platform', '?')}. File size: the weights file on disk."
    )


VIEW = accuracy_view(ACCURACY_COLUMNS, note)
