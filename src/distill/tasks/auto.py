"""The ``auto`` sweep: the settings a recipe leaves to ``auto`` (temperature, α, learning rate) chosen by short runs of
the student ranked on the validation split; every finished candidate is recorded in ``RUN/auto.json`` at once, so a
resumed run skips it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from distill.errors import DistillError
from distill.io import write_json
from distill.recipe import DistillSpec, TrainSpec, auto_settings
from distill.train import LOWER_IS_BETTER, validation_summary

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


class Sweep:
    """One section of ``RUN/auto.json``: the candidates finished so far (read back on resume) and the next ones.
    ``run(distill, lr)`` gives a candidate's row — read from the table where a resumed run finished it, else trained
    now, written to the table at once and its folder removed; ``rank`` orders rows for ``min``."""

    def __init__(self, out: Path, section: str, candidate: Candidate, budget: TrainSpec, select_by: str, main: bool):
        self.out, self.candidate, self.budget, self.select_by, self.main = out, candidate, budget, select_by, main
        self.path = out / AUTO_TABLE
        self.tables = _read_tables(self.path)
        self.table = self.tables.setdefault(section, [])

    def run(self, distill: DistillSpec | None, lr: float) -> dict:
        point = {"temperature": distill.temperature, "alpha": distill.alpha} if distill else {}
        point["lr"] = lr
        for row in self.table:
            if all(row.get(key) == value for key, value in point.items()):
                return row
        name = f"auto-T{distill.temperature:g}-a{distill.alpha:g}-lr{lr:g}" if distill else f"auto-baseline-lr{lr:g}"
        started = time.perf_counter()
        scores = self.candidate(name, distill, self.budget.model_copy(update={"lr": lr}))
        row = {**point, **scores, "seconds": round(time.perf_counter() - started, 1)}
        self.table.append(row)
        if self.main:
            write_json(self.path, self.tables)
            shutil.rmtree(self.out / name, ignore_errors=True)
        return row

    def rank(self, row: dict) -> tuple[float, float]:
        value = row[self.select_by] if LOWER_IS_BETTER[self.select_by] else -row[self.select_by]
        return value, row["loss"]

    def record(self, choice: dict) -> dict:
        """What metrics.json keeps of the sweep."""
        budget = self.budget
        return {
            "choice": choice,
            "select_by": self.select_by,
            "budget_each": {"steps": budget.max_steps} if budget.max_steps else {"epochs": budget.epochs},
            "candidates": len(self.table),
            "seconds": round(sum(row["seconds"] for row in self.table), 1),
            "table": self.table,
        }


def _read_tables(path: Path) -> dict:
    try:
        tables = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(tables, dict):
            raise ValueError(f"a JSON {type(tables).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DistillError(
            f"{path} is damaged ({exc}); delete it to run the auto sweep's short runs again, then rerun with --resume"
        ) from None
    return tables


def choose_baseline_lr(
    distill: DistillSpec, out: Path, candidate: Candidate, *, train: TrainSpec, accelerator=None
) -> tuple[TrainSpec, dict | None]:
    """The baseline's training settings with ``lr: auto`` chosen (its own sweep, on hard labels, ranked like the
    student's: the comparison stays fair), and the sweep's record (None when the rate is a number)."""
    if train.lr != "auto":
        return train, None
    main = accelerator is None or accelerator.is_main_process
    sweep = Sweep(out, "baseline", candidate, auto_budget(distill, train), train.select_by, main)
    best = min((sweep.run(None, lr) for lr in AUTO_LRS[train.optimizer]), key=sweep.rank)
    if main:
        print(f"auto: chose lr {best['lr']:g} for the baseline from {len(sweep.table)} short runs", flush=True)
    return train.model_copy(update={"lr": best["lr"]}), sweep.record({"lr": best["lr"]})


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
    sweep = Sweep(out, "table", candidate, auto_budget(distill, train), train.select_by, main)
    run, rank = sweep.run, sweep.rank

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
        print(f"auto: chose {settings} from {len(sweep.table)} short runs on the validation split", flush=True)
    chosen = distill.model_copy(update={k: v for k, v in choice.items() if k != "lr"})
    return chosen, train.model_copy(update={"lr": best["lr"]}), sweep.record(choice)


def candidate_scores(out: Path, name: str, accelerator=None) -> dict:
    """A finished sweep candidate's best validation scores, as its log says (read once every process is done, so
    the main process has written them)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return validation_summary(out, name)["best"]
