"""The run skeleton every task shares: the run folder, the teacher-cache folder, "train this stage or load it"
with one marker, the int8 copy of the student, and the ending (metrics.json and the report)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from distill.errors import DistillError
from distill.evaluate import calibration, disagreements
from distill.export.quantize import WEIGHTS, load_int8
from distill.export.run_export import Student, export_student
from distill.io import atomic_path, fsync_path, fsync_tree, write_json
from distill.recipe import DistillSpec, TrainSpec, auto_settings, recipe_to_yaml
from distill.report import ReportView, write_report
from distill.train import LOWER_IS_BETTER, STAGE_DONE, remove_checkpoints, validation_summary

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


CLEAR_LEAD = 2.0  # standard errors: a lead a teacher no better than the baseline shows by chance ~2 % of the time


def teacher_check(lead: dict) -> list[str]:
    """Classifiers: one line, printed now and put first in the report, unless the teacher is clearly better than
    the student trained alone on the validation split (``evaluate.paired_loss_lead``): at least as accurate, and its
    cross-entropy lower by more than ``CLEAR_LEAD`` standard errors of the paired difference ("not better": less
    accurate, or a cross-entropy higher by more than one error; "not clearly better": in between). The cross-entropy
    is the quality of the probabilities, what soft labels carry; the error bar keeps a split of a few dozen examples
    from deciding on noise. Two errors, not one: with one, a teacher no better than the baseline looked clearly
    better on one split in six (Reuters R8, seed 1 of bench/robustness.py: 32 validation texts, lead 1.6 errors,
    a teacher worse on the test split)."""
    teacher, baseline, n = lead["teacher_accuracy"], lead["baseline_accuracy"], lead["examples"]
    measured = (
        f"accuracy {teacher:.2%} vs {baseline:.2%}, cross-entropy lower by {lead['loss_lead']:.4f} ± "
        f"{lead['standard_error']:.4f} on {n} examples"
    )
    if (
        teacher < baseline or lead["loss_lead"] < -lead["standard_error"]
    ):  # less accurate, or clearly worse probabilities
        line = (
            f"the teacher is not better than the student trained alone on the validation split ({measured}): soft "
            "labels cannot lift a student above a teacher no better than itself; make the teacher stronger (train it "
            "longer or larger, or start from a better checkpoint)"
        )
    elif lead["loss_lead"] <= CLEAR_LEAD * lead["standard_error"]:  # no lead beyond the noise of the split
        line = (
            f"the teacher is not clearly better than the student trained alone on the validation split ({measured}: "
            f"within {CLEAR_LEAD:g} standard errors): distillation may not help; hold out more labeled examples "
            "(data.validation_fraction) to tell, or make the teacher stronger"
        )
    else:
        return []
    print(f"warning: {line}", flush=True)
    return [line]


def teacher_warnings(teacher: dict, baseline: dict) -> list[str]:
    """Language models: one line, printed now and put first in the report, when the teacher's held-out loss (the
    validation scores of each) is no lower than the student's trained alone. Soft labels cannot lift the student
    above such a teacher."""
    if teacher["loss"] < baseline["loss"]:
        return []
    line = (
        f"the teacher is not better than the student trained alone on the validation split (loss "
        f"{teacher['loss']:.4f} vs {baseline['loss']:.4f}): soft labels cannot lift a student above a teacher no "
        "better than itself; make the teacher stronger (train it longer or larger, or start from a better checkpoint)"
    )
    print(f"warning: {line}", flush=True)
    return [line]


MEMORISED = 1.5  # validation over training perplexity of an adapted LM teacher past which the run says so (a guard)


def memorised_teacher_warnings(fit: dict) -> list[str]:
    """Language models with ``teacher.train``: one line, printed now and put in the report, when the adapted teacher's
    perplexity on the validation split is more than ``MEMORISED`` times that on the training blocks (``fit``, as
    ``teacher_fit`` measures it). Its targets on the blocks the student trains on then lean towards their labels far
    more than on new text, and carry less than its held-out quality promises. Seen in bench/lm_students.py (20.8 on
    training blocks, 48.3 on validation): the weight of the hard labels (alpha 0, 0.5, 0.7) hardly moved the distilled
    student, and targets from teachers adapted without the block (two folds) did better (BENCHMARKS.md)."""
    train, validation = fit["training_perplexity"], fit["validation_perplexity"]
    if validation < MEMORISED * train:
        return []
    line = (
        f"the adapted teacher has memorised its training blocks: perplexity {train:.4g} on them vs {validation:.4g} "
        f"on the validation split ({validation / train:.2f}x); its targets on the blocks the student trains on lean "
        "towards their labels far more than on new text, so distillation adds less than its quality there promises; "
        "adapt it for fewer epochs or at a lower teacher.train.lr, or on other text in a run of its own (then give "
        "that run's teacher folder as teacher.path)"
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
    when better): that first, with the likely reason read from the numbers. When the teacher check fired and the
    distilled student wins all the same, that too: the report must not leave the check's doubt standing alone."""
    if "baseline" not in results:
        return []
    s, b = results["student"][quality], results["baseline"][quality]
    wins = s < b
    if isinstance(s, float):
        s, b = f"{s:.4g}", f"{b:.4g}"
    if wins and teacher_weak:
        return [
            f"the distilled student beats the student trained alone on the test split all the same ({noun} {s} vs "
            f"{b}): the validation split was too small to tell, or the teacher's soft labels help in another way (its "
            "labels of unlabeled inputs, smoother targets)"
        ]
    if s == b or wins:
        return []
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


# The auto sweep's grid. Coordinate search: the learning rate first (at T 2, α 0.1), then the temperatures at the
# chosen rate, then α at the chosen temperature (9 short runs when all three are auto, not 36). The values span what
# the literature and our benches use (BENCHMARKS.md).
AUTO_LRS = {"adamw": (1e-4, 3e-4, 1e-3), "sgd": (0.01, 0.03, 0.1)}
AUTO_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
AUTO_ALPHAS = (0.0, 0.1, 0.5)
AUTO_TEMPERATURE_WHILE_SWEEPING_LR = 2.0
AUTO_ALPHA_WHILE_SWEEPING = 0.1
AUTO_TABLE = "auto.json"
AUTO_MIN_VALIDATION = 20  # fewer held-out examples cannot tell the candidates apart


def check_auto_data(keys: list[str], validation_examples: int, noun: str = "examples") -> None:
    """Before any work: settings left to the sweep (``recipe.auto_settings``) need a validation split big enough to
    choose on."""
    if keys and validation_examples < AUTO_MIN_VALIDATION:
        raise DistillError(
            f"{keys[0]}: auto chooses on the validation split, which has {validation_examples} labeled {noun} (needs "
            f"{AUTO_MIN_VALIDATION}+): add labeled data, raise data.validation_fraction or give a number"
        )


# (stage name, distillation settings or None for hard labels only, training budget) → best validation scores
Candidate = Callable[[str, DistillSpec | None, TrainSpec], dict]


def auto_budget(distill: DistillSpec, train: TrainSpec) -> TrainSpec:
    """The student's training settings with the short budget each sweep candidate gets: ``distill.auto_epochs``
    epochs, else a quarter of the student's budget (epochs, or ``max_steps``), at least one."""
    if distill.auto_epochs:
        return train.model_copy(update={"epochs": distill.auto_epochs, "max_steps": None})
    if train.max_steps:
        return train.model_copy(update={"max_steps": max(1, train.max_steps // 4)})
    return train.model_copy(update={"epochs": max(1, train.epochs // 4)})


def _sweep(out: Path, section: str, candidate: Candidate, budget: TrainSpec, select_by: str, main: bool):
    """``run(distill, lr)`` → the row of that candidate (trained now, or read from ``RUN/auto.json[section]`` where a
    resumed run finished it), ``rank`` for ``min``, and the table. Each finished candidate is written at once and its
    folder removed."""
    path = out / AUTO_TABLE
    try:
        tables = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(tables, dict):
            raise ValueError(f"a JSON {type(tables).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DistillError(
            f"{path} is damaged ({exc}); delete it to run the auto sweep's short runs again, then rerun with --resume"
        ) from None
    table = tables.setdefault(section, [])

    def run(distill: DistillSpec | None, lr: float) -> dict:
        point = {"temperature": distill.temperature, "alpha": distill.alpha} if distill else {}
        point["lr"] = lr
        for row in table:
            if all(row.get(key) == value for key, value in point.items()):
                return row
        name = f"auto-T{distill.temperature:g}-a{distill.alpha:g}-lr{lr:g}" if distill else f"auto-baseline-lr{lr:g}"
        started = time.perf_counter()
        scores = candidate(name, distill, budget.model_copy(update={"lr": lr}))
        row = {**point, **scores, "seconds": round(time.perf_counter() - started, 1)}
        table.append(row)
        if main:
            write_json(path, tables)
            shutil.rmtree(out / name, ignore_errors=True)
        return row

    def rank(row: dict) -> tuple[float, float]:
        value = row[select_by] if LOWER_IS_BETTER[select_by] else -row[select_by]
        return value, row["loss"]

    return run, rank, table


def _record(choice: dict, budget: TrainSpec, table: list, select_by: str) -> dict:
    return {
        "choice": choice,
        "select_by": select_by,
        "budget_each": {"steps": budget.max_steps} if budget.max_steps else {"epochs": budget.epochs},
        "candidates": len(table),
        "seconds": round(sum(row["seconds"] for row in table), 1),
        "table": table,
    }


def choose_baseline_lr(
    distill: DistillSpec, out: Path, candidate: Candidate, *, train: TrainSpec, accelerator=None
) -> tuple[TrainSpec, dict | None]:
    """The baseline's training settings with ``lr: auto`` chosen (its own sweep, on hard labels, ranked like the
    student's: the comparison stays fair), and the sweep's record (None when the rate is a number)."""
    if train.lr != "auto":
        return train, None
    main = accelerator is None or accelerator.is_main_process
    budget = auto_budget(distill, train)
    run, rank, table = _sweep(out, "baseline", candidate, budget, train.select_by, main)
    best = min((run(None, lr) for lr in AUTO_LRS[train.optimizer]), key=rank)
    if main:
        print(f"auto: chose lr {best['lr']:g} for the baseline from {len(table)} short runs", flush=True)
    return train.model_copy(update={"lr": best["lr"]}), _record({"lr": best["lr"]}, budget, table, train.select_by)


def choose_auto(
    distill: DistillSpec, out: Path, candidate: Candidate, *, train: TrainSpec, accelerator=None
) -> tuple[DistillSpec, TrainSpec, dict | None]:
    """``distill`` and the student's ``train`` with their ``auto`` settings chosen, and the sweep's record (None
    when nothing was auto).

    Each candidate is a short run of the student (``auto_budget``) from its initial weights on the teacher outputs
    the run already has, so the sweep costs student time only; it is ranked by its best validation
    ``train.select_by`` (ties: the loss). Every finished candidate is added to ``RUN/auto.json`` at once, so a
    resumed run skips it, and its folder is removed."""
    keys = auto_settings(distill, train)
    if not keys:
        return distill, train, None
    main = accelerator is None or accelerator.is_main_process
    budget = auto_budget(distill, train)
    run, rank, table = _sweep(out, "table", candidate, budget, train.select_by, main)

    def at(temperature, alpha) -> DistillSpec:
        return distill.model_copy(update={"temperature": temperature, "alpha": alpha})

    t_auto, a_auto = distill.temperature == "auto", distill.alpha == "auto"
    t0 = AUTO_TEMPERATURE_WHILE_SWEEPING_LR if t_auto else distill.temperature
    a0 = AUTO_ALPHA_WHILE_SWEEPING if a_auto else distill.alpha
    lrs = AUTO_LRS[train.optimizer] if train.lr == "auto" else (train.lr,)
    best = min((run(at(t0, a0), lr) for lr in lrs), key=rank)  # a fixed rate: one run, reused by the next lines
    temperatures = AUTO_TEMPERATURES if t_auto else (t0,)
    best = min((run(at(t, a0), best["lr"]) for t in temperatures), key=rank)
    alphas = AUTO_ALPHAS if a_auto else (a0,)
    best = min((run(at(best["temperature"], a), best["lr"]) for a in alphas), key=rank)
    names = [key.rsplit(".", 1)[1] for key in keys]  # distill.temperature → temperature, student.train.lr → lr
    choice = {name: best[name] for name in names}
    settings = ", ".join(f"{key} {value:g}" for key, value in choice.items())
    if main:
        print(f"auto: chose {settings} from {len(table)} short runs on the validation split", flush=True)
    chosen = distill.model_copy(update={k: v for k, v in choice.items() if k != "lr"})
    return chosen, train.model_copy(update={"lr": best["lr"]}), _record(choice, budget, table, train.select_by)


def candidate_scores(out: Path, name: str, accelerator=None) -> dict:
    """A finished sweep candidate's best validation scores, as its log says (read once every process is done, so
    the main process has written them)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return validation_summary(out, name)["best"]
