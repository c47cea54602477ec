"""`distill plan` against measured runs of our recipes (issue 20.4): peak RSS and seconds per epoch.

For each recipe (shortened with --set overrides so that its run takes a minute or two): `distill plan RECIPE --json`
in its own process, then `distill run RECIPE` in another, with the same overrides and environment.

- Peak RSS: the run's maximum resident set (``os.wait4`` on the child) against the plan's process peak, which is the
  RSS of a process that has imported what `distill run` imports (measured by the plan in its own process) + the
  data + the largest stage.
- Seconds per epoch of each training stage: the epoch's examples / the stage's last logged ``examples_per_s`` (the
  loop's running mean since the stage started: every step, validation and checkpoint before that line; it is rounded
  to 0.1 example/s, a 5 % uncertainty at 1 example/s). The plan's figure is taken over the same span: its s/epoch
  (steps, validations, checkpoints) over the logged epochs, less the validation and checkpoint the loop makes after
  the stage's last line. The first step's one-time set-up is in the run's figure, not in the plan's.

Bar: every figure within 25 % of the measured one (plan / measured in [0.75, 1.25]); a figure not measured fails.
Ends with one JSON line; exits 1 when a figure misses the bar. The classifier recipes run on one thread
(OMP_NUM_THREADS=1), plan and run alike: on two cores shared with other work, two threads make tiny steps wait on
each other (tens of times slower at random); the LM recipe keeps torch's default.

    python bench/plan_check.py [--recipes digits mnist smollm2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTILL = [sys.executable, "-c", "from distill.cli import main; main()"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RECIPES = {  # name: (recipe, --set overrides, environment)
    "digits": ("recipes/digits.yaml", [], ONE_THREAD),
    "mnist": ("recipes/mnist.yaml", ["teacher.train.epochs=3", "student.train.epochs=2"], ONE_THREAD),
    "smollm2": (
        "recipes/smollm2-shakespeare.yaml",
        ["data.limit_train_blocks=24", "data.limit_heldout_blocks=4", "eval.batch_size=2", "eval.generations=0"],
        {},
    ),
}
BAR = 0.25


def overrides(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


def plan(recipe: str, sets: list[str], env: dict) -> dict:
    done = subprocess.run(
        [*DISTILL, "plan", recipe, "--json", *overrides(sets)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if done.returncode:
        raise SystemExit(f"distill plan {recipe} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def run(recipe: str, sets: list[str], env: dict, out: Path) -> tuple[int, float]:
    """The run's peak RSS in bytes (its own, from wait4) and its wall time."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [*DISTILL, "run", recipe, "--out", str(out), "--force", *overrides(sets)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"distill run {recipe} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def logged(out: Path) -> dict[str, dict]:
    """Each stage's last training line of log.jsonl."""
    last = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "examples_per_s" in entry:
            last[entry["stage"]] = entry
    return last


def planned_span(stage: dict, entry: dict) -> float:
    """The plan's seconds per epoch over the span the log line covers (see the module docstring)."""
    epochs = entry["step"] / stage["steps_per_epoch"]
    after = stage["validation_seconds"] if stage["validations_per_epoch"] else 0.0
    if entry["step"] % stage["steps_per_epoch"] == 0:  # an epoch's end: the loop writes a checkpoint after the line
        after += stage["checkpoint_seconds"]
    return (epochs * stage["epoch_seconds"] - after) / epochs


def ratio(planned: float | None, measured: float | None) -> float | None:
    return None if not planned or not measured else round(planned / measured, 3)


def check(name: str, work: Path) -> dict:
    recipe, sets, extra = RECIPES[name]
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | extra
    planned = plan(recipe, sets, env)
    peak, wall = run(recipe, sets, env, work / name)
    lines = logged(work / name)
    figures = {"recipe": recipe, "set": sets, "env": extra, "run_seconds": round(wall, 1)}
    figures["peak_rss"] = {"plan": planned["peak"], "measured": peak, "ratio": ratio(planned["peak"], peak)}
    figures["s_per_epoch"] = {}
    for stage in planned["stages"]:
        if not stage["training"]:
            continue
        entry = lines.get(stage["name"])
        measured = stage["examples"] / entry["examples_per_s"] if entry and entry["examples_per_s"] else None
        expected = planned_span(stage, entry) if entry else None
        figures["s_per_epoch"][stage["name"]] = {
            "plan": None if expected is None else round(expected, 4),
            "measured": None if measured is None else round(measured, 4),
            "ratio": ratio(expected, measured),
        }
    return figures


def show(name: str, figures: dict) -> None:
    p = figures["peak_rss"]
    print(f"{name}: run {figures['run_seconds']} s")
    print(
        f"  peak RSS     plan {p['plan'] / 2**20:8.0f} MiB   measured {p['measured'] / 2**20:8.0f} MiB   {p['ratio']}"
    )
    for stage, f in figures["s_per_epoch"].items():
        print(f"  s/epoch {stage:<9} plan {f['plan']!s:>10}   measured {f['measured']!s:>10}   {f['ratio']}")


def passes(value: float | None) -> bool:
    return value is not None and 1 - BAR <= value <= 1 + BAR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        for name in args.recipes:
            results[name] = check(name, work)
            show(name, results[name])
    ratios = [r["peak_rss"]["ratio"] for r in results.values()]
    ratios += [f["ratio"] for r in results.values() for f in r["s_per_epoch"].values()]
    ok = all(passes(value) for value in ratios)
    print(json.dumps({"bench": "plan_check", "bar": BAR, "recipes": results, "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
