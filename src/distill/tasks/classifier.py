"""The classifier recipe (task: classification), start to finish: teacher → cache → baseline student → distilled
student → evaluation → report. Each stage leaves ``RUN/<stage>/model.safetensors`` when done; a resumed run skips
finished stages and continues the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.data.arrays import ArrayData, load_data
from distill.errors import DistillError
from distill.evaluate import classifier_metrics, paired_loss_lead, predict_logits, validation_scores
from distill.export.run_export import CLASSIFIER_EXAMPLES, Student
from distill.losses import IGNORE_INDEX
from distill.models.classifiers import build_classifier, load_classifier, save_classifier
from distill.recipe import DistillSpec, ModelSpec, Recipe, TrainSpec, auto_settings, load_recipe_as
from distill.report import ACCURACY_COLUMNS, accuracy_view
from distill.tasks.auto import check_auto_data
from distill.tasks.checks import teacher_check
from distill.tasks.skeleton import OnStep, Run, StageSpec, comparison, data_source, machine, quoted, run_stages
from distill.teachers.identity import file_id
from distill.teachers.live import LiveTeacher
from distill.teachers.logits_cache import build_logits_cache
from distill.teachers.store import cache_root
from distill.train import ClassifierBatches, Stage, Validator

TASK = "classification"
VALIDATED = ("teacher", "baseline", "student")  # the stages whose validation the report lists


def stages(recipe: Recipe) -> list[StageSpec]:
    """Teacher (unless given as a checkpoint) → baseline (hard labels) → the teacher check → student. Each model is
    built from its seed and trained from the next; the baseline and the student start from the same weights."""
    student = {"build_seed": STUDENT_SEED, "train_seed": STUDENT_SEED + 1, "loop_seed": STUDENT_SEED}
    teacher = [] if recipe.teacher.checkpoint else [StageSpec("teacher", "labels", build_seed=0, train_seed=1)]
    baseline = [StageSpec("baseline", "labels", auto=True, checks=("teacher",), **student)] if recipe.baseline else []
    return [*teacher, *baseline, StageSpec("student", "teacher", auto=True, checks=("student",), **student)]


STUDENT_SEED = 1000  # recipe.seed + this: the baseline's and the distilled student's weights


@dataclass
class Setup:
    data: ArrayData
    teacher: torch.nn.Module | None = None
    teacher_weights: Path | None = None
    teacher_on_validation: torch.Tensor | None = None
    check: Validator | None = None  # the students' validation (with the teacher's logits)
    signal: object = None  # the teacher signal: live, or its logits cache


def setup(recipe: Recipe) -> Setup:
    data = load_data(recipe.data, recipe.seed)
    if recipe.distill.signal == "cache" and recipe.student.train.jitter:
        raise DistillError("student.train.jitter needs distill.signal: live (a cache holds unshifted inputs)")
    for spec in (recipe.teacher.model, recipe.student.model):  # a bad model spec fails before any work
        build_classifier(spec, data.input_shape, data.num_classes)
    check_auto_data(auto_settings(recipe.distill, recipe.student.train), 0 if data.val_y is None else len(data.val_y))
    return Setup(data)


def teacher(ctx: Setup, run: Run, trained: torch.nn.Module | None) -> list[str]:
    """The teacher (trained, or the recipe's checkpoint), its validation logits and its signal: live or cached."""
    recipe, data = run.recipe, ctx.data
    if trained is None:
        ctx.teacher_weights = Path(recipe.teacher.checkpoint).expanduser()
        trained = load_classifier(ctx.teacher_weights, recipe.teacher.model, data.input_shape, data.num_classes)
    else:
        ctx.teacher_weights = run.out / "teacher" / "model.safetensors"
    ctx.teacher = trained
    ctx.teacher_on_validation = predict_logits(trained, data.val_x) if data.val_x is not None else None
    ctx.check = validator(data, ctx.teacher_on_validation)
    live = LiveTeacher(trained, run.accelerator.device)
    teacher_id = file_id(ctx.teacher_weights)
    ctx.signal = live
    if recipe.distill.signal == "cache":
        with run.accelerator.main_process_first():  # the main process builds it, the others open it
            ctx.signal = build_logits_cache(
                cache_root(recipe.distill, run.out) / f"teacher-{teacher_id}",
                live,
                data.train_x,
                teacher_id=teacher_id,
                data_id=data.fingerprint(),
            )
    return []


def prepare(ctx: Setup, run: Run, name: str, settings: DistillSpec | None, spec: TrainSpec):
    """Stage ``name``'s model, built, and its batches: a hard-label stage trains on the labeled examples, a distilled
    one on all of them (``example_ids`` index the teacher cache)."""
    data = ctx.data
    model = build_classifier(model_spec(run.recipe, name), data.input_shape, data.num_classes)
    extra = {"teacher": ctx.signal, "distill": settings} if settings else {}
    stage = Stage(name=name, model=model, train=spec, **extra)
    keep = data.train_y != IGNORE_INDEX if stage.teacher is None else np.ones(len(data.train_y), dtype=bool)
    if not keep.any():
        raise DistillError(f"{name}: no training examples (no labeled ones for a hard-label stage)")
    x, y = (data.train_x, data.train_y) if keep.all() else (data.train_x[keep], data.train_y[keep])
    ids = torch.from_numpy(np.flatnonzero(keep))
    batches = ClassifierBatches(torch.from_numpy(x), torch.from_numpy(y), ids, stage, data.input_shape)
    return model, spec, batches, validator(data) if name == "teacher" else ctx.check


def model_spec(recipe: Recipe, name: str) -> ModelSpec:
    return recipe.teacher.model if name == "teacher" else recipe.student.model


def load(ctx: Setup, run: Run, name: str, folder: Path) -> torch.nn.Module:
    data = ctx.data
    return load_classifier(folder / "model.safetensors", model_spec(run.recipe, name), data.input_shape,
                           data.num_classes)  # fmt: skip


def save(ctx: Setup, run: Run, name: str, model: torch.nn.Module, folder: Path) -> None:
    save_classifier(model, folder, model_spec(run.recipe, name), ctx.data.input_shape, ctx.data.num_classes)


def check_teacher(ctx: Setup, run: Run, baseline: torch.nn.Module) -> tuple[list[str], dict | None]:
    """Is the teacher clearly better than the baseline on the validation split (``checks.teacher_check``)?"""
    if ctx.check is None or not run.main:  # the main process writes the log
        return [], None
    baseline_on_validation = predict_logits(baseline, ctx.data.val_x)  # the weights it kept
    lead = paired_loss_lead(ctx.teacher_on_validation, baseline_on_validation, torch.from_numpy(ctx.data.val_y))
    return teacher_check(lead), lead


def evaluate(ctx: Setup, run: Run, trained: dict, distill: DistillSpec, int8) -> tuple[dict, dict]:
    recipe, data = run.recipe, ctx.data
    models = {"teacher": (ctx.teacher, ctx.teacher_weights)}
    models |= {name: (trained[name], run.out / name / "model.safetensors") for name in ("baseline", "student")
               if name in trained}  # fmt: skip
    if int8:
        models["student_int8"] = int8
    results, logits = evaluate_models(recipe, models, data)
    classes = [str(c) for c in range(data.num_classes)]
    shown = comparison(logits, torch.from_numpy(data.test_y), lambda i: example(data, i), classes)
    if "student_int8" in results:
        results["student_int8"]["parameters"] = results["student"]["parameters"]
    environment = machine(processor=platform.machine(), cpu_threads_for_latency=recipe.eval.threads)
    return results, {"distill": distill.model_dump(mode="json"), "machine": environment, **shown}


def starter(teacher: Path | None, data: Path) -> str:
    """The starting recipe ``distill init`` writes (``tasks/starter.py``)."""
    checkpoint = f"  checkpoint: {quoted(teacher)}  # your trained teacher's weights\n" if teacher else ""
    return f"""# A classifier distilled into a smaller one (written by distill init; every key is optional).
task: classification
name: {quoted(data.name)}
seed: 0
data:
  source: {data_source(data, "classification")}
  path: {quoted(data)}
  labeled_fraction: 1.0     # the share of training labels you have; the rest is unlabeled transfer data
  validation_fraction: 0.1  # labeled examples held out: every stage is validated there, the teacher checked
teacher:
{checkpoint}  model: {{arch: mlp, hidden: [1200, 1200], dropout: 0.5}}  # the architecture of the teacher
  train: {{epochs: 8, batch_size: 128, lr: 0.1}}
student:
  model: {{arch: mlp, hidden: [800, 800]}}  # the small model you want
  train: {{epochs: 4, batch_size: 128, lr: 0.1, patience: 3}}  # stops when validation stops improving
distill:
  # auto: a short sweep on the validation split picks them (T 1/2/4/8, then alpha 0/0.1/0.5; RUN/auto.json and the
  # report show the table). Put the chosen numbers here to skip the sweep on later runs.
  temperature: auto  # softer teacher distributions carry more of what it knows about the other classes
  alpha: auto        # weight of the hard labels next to the soft ones
"""


def run(recipe: Recipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None) -> dict:
    return run_stages(sys.modules[__name__], recipe, out, resume=resume, force=force, on_step=on_step)


def example(data: ArrayData, index: int) -> dict:
    """Test example ``index`` as the report shows it: an image's pixels (grey, 0–255), or a vector's first values."""
    x = data.test_x[index].reshape(data.input_shape)
    if len(data.input_shape) < 2:
        return {"text": "features " + ", ".join(f"{v:.3g}" for v in x[:12]) + (" …" if x.size > 12 else "")}
    image = x[0] if len(data.input_shape) == 3 else x  # the first channel of a [C, H, W] image
    low, high = float(image.min()), float(image.max())
    grey = np.round(255 * (image - low) / (high - low or 1.0)).astype(np.uint8)
    return {"image": grey.tolist()}


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


def load_student(run_dir: Path, fmt: str = "safetensors") -> Student:
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
