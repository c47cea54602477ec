"""The run skeleton every task shares. A task says *what* its run is — its stages as data (``StageSpec``) and a few
functions with the same names in every task module — and ``run_stages`` says *how*, once: the run folder (what
``--force`` may delete, the recipe it records), the order of the stages, their seeds, "train this stage or load it"
with one marker, the ``auto`` sweeps (``auto.py``), the checks a run says aloud (``checks.py``), the int8 copy of the
student and the ending (metrics.json and the report). ``distill plan`` walks the same stages.

A task module (``tasks/<task>.py``) holds, top to bottom:

- ``stages(recipe) -> list[StageSpec]``: what trains, in order;
- ``setup(recipe) -> ctx``: data, models and every check that can fail, before anything is written;
- ``teacher(ctx, run, trained) -> list[str]``: the teacher signal, once the teacher is there (``trained``: the model
  of its ``teacher`` stage, None when it has none); the warnings it says now;
- ``prepare(ctx, run, name, settings, spec) -> (model, spec, batches, validator)``: stage ``name``'s fresh model and
  what the loop trains it on (``settings``: the distillation settings, None for hard labels; ``batches`` None: the
  model needs no training), the one preparation both the run and ``distill plan`` use;
- ``load(ctx, run, name, folder)`` and ``save(ctx, run, name, model, folder)``: a stage's model on disk;
- ``check_teacher(ctx, run, baseline) -> (warnings, record)``: is the teacher better than the baseline;
- ``evaluate(ctx, run, trained, distill, int8) -> (results, sections)``: every model's test metrics and what the
  report shows beyond the table;
- ``VIEW``, ``VALIDATED`` (the stages whose validation the report lists), ``QUALITY`` (how the student check reads
  the results), ``load_student``, ``export_formats``.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from distill.errors import DistillError
from distill.evaluate import calibration, disagreements
from distill.export.quantize import WEIGHTS, load_int8
from distill.export.run_export import Student, export_student
from distill.io import STAGE_DONE, atomic_path, fsync_path, fsync_tree, write_json
from distill.recipe import recipe_to_yaml
from distill.report import ReportView, write_report
from distill.tasks.auto import candidate_scores, choose_auto, choose_baseline_lr
from distill.tasks.checks import student_warnings
from distill.train import make_accelerator, remove_checkpoints, train_loop, validation_summary

OnStep = Callable[[str, int], None] | None


# What a run writes at the top of its folder: ``--force`` deletes a folder holding these and nothing else.
RUN_ENTRIES = {"recipe.yaml", "log.jsonl", "metrics.json", "REPORT.md", "report.html", "auto.json", "prune.json",
               "teacher", "baseline", "student", "cache", "exports", "trackers"}  # fmt: skip
RUN_PATTERNS = ("*.png", "auto-*", ".*.tmp-*", ".*.old-*", ".*.lock")  # plots, sweep candidates, temp files, locks


def prepare_run_dir(
    recipe, out: Path, *, resume: bool, force: bool, accelerator=None, command: str = "distill run"
) -> None:
    """Check and create the run folder, and record the recipe in it. Under several processes only the main one does,
    and the others wait for it (if it refuses, the launcher stops them)."""
    if accelerator is not None and accelerator.num_processes > 1:
        if accelerator.is_main_process:
            prepare_run_dir(recipe, out, resume=resume, force=force, command=command)
        accelerator.wait_for_everyone()
        return
    saved = out / "recipe.yaml"
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file, not a folder; choose a folder for the run")
    if out.exists() and any(out.iterdir()):
        if force:
            check_ours_to_replace(recipe, out)
            shutil.rmtree(out)
        elif not resume:
            raise DistillError(
                f"run folder {out} already exists; pass --resume to continue it or --force to replace it"
            )
        elif saved.exists() and saved_recipe(type(recipe), saved) != recipe:
            raise DistillError(
                f"{command}: the recipe differs from the one {out} was started with ({saved}); use the same recipe, "
                "or start a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(saved) as tmp:
        tmp.write_text(recipe_to_yaml(recipe))


def saved_recipe(schema: type, path: Path):
    """A run folder's recipe, validated; a torn or edited one is one line, not a traceback."""
    try:
        return schema.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(
            f"{path} is damaged or not a recipe distill wrote ({first}); the run cannot be resumed from it: start a "
            "new --out (or delete that run folder yourself)"
        ) from None


def check_ours_to_replace(recipe, out: Path) -> None:
    """``--force`` deletes ``out`` only when it is a run folder of ours: it holds the recipe a run wrote (the resolved
    recipe, as ``yaml.safe_dump`` writes it: a hand-written one never reads back byte for byte) and nothing but
    what runs write, and it is not the current folder, the home folder, or a folder holding the data or another
    file the recipe names. Anything else would delete what we did not write."""
    resolved = out.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    if resolved in protected or any(p.is_relative_to(resolved) for p in protected):
        raise DistillError(
            f"--force would delete {out} ({resolved}), which holds the current or home folder; choose "
            "a run folder of its own for --out"
        )
    named = [Path(value).expanduser() for value in _strings(recipe.model_dump(mode="json"))]
    inside = [path for path in named if _exists(path) and path.resolve().is_relative_to(resolved)]
    if inside:
        raise DistillError(
            f"--force would delete {out}, which holds {inside[0]} named by the recipe; choose another --out for the run"
        )
    saved = out / "recipe.yaml"
    try:
        text = saved.read_text()
        loaded = yaml.safe_load(text)
        ours = isinstance(loaded, dict) and "task" in loaded and yaml.safe_dump(loaded, sort_keys=False) == text
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise DistillError(
            f"--force replaces only a run folder distill wrote, and {out} is not one (no recipe.yaml written by a "
            "run); choose another --out, or empty that folder yourself"
        )
    foreign = sorted(
        entry.name
        for entry in out.iterdir()
        if entry.name not in RUN_ENTRIES and not any(entry.match(pattern) for pattern in RUN_PATTERNS)
    )
    if foreign:
        raise DistillError(
            f"--force would delete {len(foreign)} file(s) in {out} that no run wrote ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}); move them out, or choose another --out"
        )


def _strings(value) -> list[str]:
    """Every string in a recipe's JSON dump (the paths it names are among them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a string that is no path (too long, a NUL)
        return False


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
    """Where and with what the run was measured: the platform, the versions that shape the numbers, the command."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "distill": _version("distill"),
        "command": _command(),
        **extra,
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command() -> str:
    """The command line as the user typed it (``distill run ...`` rather than the script's full path)."""
    argv = sys.argv
    program = "distill" if Path(argv[0]).name == "distill" else Path(argv[0]).name
    return shlex.join([program, *argv[1:]])


def comparison(logits: dict[str, torch.Tensor], labels: torch.Tensor, example: Callable[[int], dict],
               classes: list[str]) -> dict:  # fmt: skip
    """What the report shows beyond the table for a classifier: each model's calibration on the test split, and
    where the distilled student disagrees with the teacher (``example(i)`` adds test example i's image or text)."""
    where = disagreements(logits["teacher"], logits["student"], labels)
    for entry in where["examples"]:
        entry |= example(entry["index"])
    return {
        "calibration": {name: calibration(values, labels) for name, values in logits.items()},
        "disagreements": where | {"classes": classes},
    }


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


# ---- `distill init`: what every task's starting recipe (its ``starter``) is written with ----


def quoted(value: Path | str) -> str:
    """``value`` as a YAML double-quoted scalar, so it reads back as the same string: written plain, ``my data #1``
    is cut at the comment, ``a: b`` does not parse and ``2024`` or ``yes`` read back as a number or a boolean."""
    return yaml.safe_dump(str(value), default_style='"', allow_unicode=True, width=math.inf).removesuffix("\n")


def data_source(data: Path, task: str) -> str:
    """The ``data.source`` of a path, read from what it holds."""
    if task == "causal_lm":
        return "jsonl" if data.suffix == ".jsonl" else "text"
    if data.is_dir():
        found = {p.name for p in data.iterdir()}
        if task == "classification":
            if "train.csv" in found:
                return "csv"
            if "train_x.npy" in found:
                return "npy"
            if any(name.startswith("train-images") for name in found):
                return "mnist"
        elif "train.csv" in found:
            return "csv"
        elif "train.jsonl" in found:
            return "jsonl"
    wanted = {
        "classification": "train.csv + test.csv, {train,test}_{x,y}.npy or MNIST idx files",
        "text_classification": "train.csv + test.csv or train.jsonl + test.jsonl",
        "embedding": "train.csv + test.csv or train.jsonl + test.jsonl",
    }[task]
    raise DistillError(f"--data {data}: cannot tell what it holds; a {task} recipe reads a folder with {wanted}")


@dataclass(frozen=True)
class StageSpec:
    """One trained stage of a run (``RUN/<name>/``), as data."""

    name: str  # teacher | baseline | student
    signal: str = "labels"  # what it learns from: "labels" (hard labels) or "teacher" (the distillation signal)
    auto: bool = False  # the settings the recipe leaves to ``auto`` are chosen by a sweep of short runs first
    checks: tuple[str, ...] = ()  # said aloud: "teacher" (after it: is the teacher better?), "student" (at the end)
    build_seed: int | None = None  # torch.manual_seed(recipe.seed + this) before its model is built
    train_seed: int | None = 1  # ... and before it trains (the RNG stream of training, restored on resume)
    loop_seed: int = 0  # the loop's seed (the order of the examples): recipe.seed + this
    validate_start: bool = False  # its starting weights compete on the validation split (train.train_loop)
    train_spec: Callable | None = None  # recipe → its TrainSpec (default: teacher.train for "teacher", else student's)

    def settings(self, recipe):
        """The stage's training settings in ``recipe``."""
        if self.train_spec is not None:
            return self.train_spec(recipe)
        return recipe.teacher.train if self.name == "teacher" else recipe.student.train


@dataclass(frozen=True)
class Run:
    """What every stage of one run shares."""

    recipe: object
    out: Path
    resume: bool
    on_step: OnStep
    accelerator: object

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def run_stages(task, recipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None) -> dict:
    """A whole run of ``task`` (a task module): setup → teacher → baseline (its lr sweep) → the teacher check →
    the student's sweep → student → (main process only) int8 copy → evaluation → the student check → metrics.json and
    the report."""
    out, name = Path(out), task.TASK
    if getattr(task, "ONE_PROCESS", False) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DistillError(f"task: {name} runs in one process; launch it without torchrun")
    stages = task.stages(recipe)
    ctx = task.setup(recipe)
    accelerator = make_accelerator(getattr(recipe, "mixed_precision", "no"), recipe.log_with, out)
    prepare_run_dir(recipe, out, resume=resume, force=force, accelerator=accelerator)
    run = Run(recipe, out, resume, on_step, accelerator)
    trained, warnings, said, lead, auto, baseline_auto, distill = {}, [], [], None, None, None, recipe.distill
    if not any(stage.name == "teacher" for stage in stages):
        said = task.teacher(ctx, run, None)
    for stage in stages:
        spec = stage.settings(recipe)
        if stage.auto and stage.signal == "labels":
            spec, baseline_auto = choose_baseline_lr(recipe.distill, out, sweep(task, ctx, run, stage), train=spec,
                                                     accelerator=accelerator)  # fmt: skip
        elif stage.auto:
            distill, spec, auto = choose_auto(recipe.distill, out, sweep(task, ctx, run, stage), train=spec,
                                              accelerator=accelerator)  # fmt: skip
            if auto and baseline_auto:
                auto["baseline"] = baseline_auto
        settings = distill if stage.signal == "teacher" else None
        trained[stage.name] = train_or_load_stage(task, ctx, run, stage, settings, spec)
        if stage.name == "teacher":
            said = task.teacher(ctx, run, trained["teacher"])
        if "teacher" in stage.checks:
            warnings, lead = task.check_teacher(ctx, run, trained[stage.name])
    teacher_weak = bool(warnings)
    warnings += said
    if not accelerator.is_main_process:  # evaluation, export and report: once, by the main process
        return {}
    int8 = int8_student(out, task.load_student) if "int8" in task.export_formats(out / "student") else None
    results, sections = task.evaluate(ctx, run, trained, distill, int8)
    sections.setdefault("machine", {})["precision"] = accelerator.precision_note  # what the stages trained in, and why
    validation = {stage: validation_summary(out, stage) for stage in task.VALIDATED if stage in results}
    sections["validation"] = validation
    if any("student" in stage.checks for stage in stages):
        warnings += student_warnings(results, validation, teacher_weak=teacher_weak, auto=auto is not None,
                                     **getattr(task, "QUALITY", {}))  # fmt: skip
        sections["warnings"] = warnings
    sections |= ({"auto": auto} if auto else {}) | ({"teacher_check": lead} if lead else {})
    return finish(out, recipe, name, results, task.VIEW, **sections)


def sweep(task, ctx, run: Run, stage: StageSpec):
    """The ``auto`` sweep's candidate: a short run of ``stage``'s model (its seeds) under another name, scored on the
    validation split."""

    def candidate(name: str, settings, budget) -> dict:
        signal = "teacher" if settings else "labels"
        stage_model(task, ctx, run, replace(stage, name=name, signal=signal), settings, budget)
        return candidate_scores(run.out, name, run.accelerator)

    return candidate


def train_or_load_stage(task, ctx, run: Run, stage: StageSpec, settings, spec):
    """Stage ``stage``'s model: loaded when a resumed run finished it, else trained now and saved."""
    return train_or_load(
        run.out / stage.name,
        resume=run.resume,
        load=lambda folder: task.load(ctx, run, stage.name, folder),
        train=lambda: stage_model(task, ctx, run, stage, settings, spec),
        save=lambda model, folder: task.save(ctx, run, stage.name, model, folder),
        accelerator=run.accelerator,
    )


def stage_model(task, ctx, run: Run, stage: StageSpec, settings, spec):
    """``stage``'s model built from its seed and trained in the loop (its checkpoints in ``RUN/<name>/``)."""
    seed = run.recipe.seed
    if stage.build_seed is not None:
        torch.manual_seed(seed + stage.build_seed)
    model, spec, batches, validator = task.prepare(ctx, run, stage.name, settings, spec)
    if batches is None:  # nothing to train (a static embedding table without epochs)
        return model
    if stage.train_seed is not None:
        torch.manual_seed(seed + stage.train_seed)
    return train_loop(stage.name, model, spec, batches, run.out, run.accelerator, seed=seed + stage.loop_seed,
                      resume=run.resume, on_step=stage_step(stage.name, run.on_step), validator=validator,
                      validate_start=stage.validate_start)  # fmt: skip
