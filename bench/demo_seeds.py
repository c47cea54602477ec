"""The demo (`make demo`: recipes/mnist.yaml) over several seeds: is its win bigger than its seed-to-seed spread?

Each seed changes everything random: which 5 % of the images keep their labels, the validation split, the
initial weights and the batch order. Prints teacher / baseline / distilled test errors per seed and mean ± sd.
Bar (issue 18): the distilled student beats the baseline on every seed, by a mean margin larger than twice the
margin's standard deviation over seeds, and each run takes ≤ 180 s. Ends with one JSON line; exits 1 on a miss.

    python bench/demo_seeds.py --seeds 0 1 2 [--out runs/demo-seeds]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distill.tasks import load_recipe, run_recipe

MAX_SECONDS = 180


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default="recipes/mnist.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-seeds"))
    args = parser.parse_args()
    errors: dict[str, list[int]] = {"teacher": [], "baseline": [], "student": []}
    seconds = []
    for seed in args.seeds:
        started = time.perf_counter()
        metrics = run_recipe(load_recipe(args.recipe, [f"seed={seed}"]), args.out / f"seed{seed}", force=True)
        seconds.append(round(time.perf_counter() - started, 1))
        for name in errors:
            errors[name].append(metrics["models"][name]["test_errors"])
        print(f"seed {seed}: " + ", ".join(f"{n} {v[-1]}" for n, v in errors.items()) + f" ({seconds[-1]} s)")
    margins = [b - s for b, s in zip(errors["baseline"], errors["student"], strict=True)]
    spread = statistics.stdev(margins) if len(margins) > 1 else None
    figures = {
        "seeds": args.seeds,
        **{f"{name}_errors": {"mean": statistics.mean(v), "sd": _sd(v), "each": v} for name, v in errors.items()},
        "margin": {"mean": statistics.mean(margins), "sd": spread, "each": margins},
        "seconds": seconds,
    }
    passed = (
        spread is not None
        and min(margins) > 0
        and statistics.mean(margins) > 2 * spread
        and max(seconds) <= MAX_SECONDS
    )
    for name in errors:
        f = figures[f"{name}_errors"]
        print(f"{name:9s} test errors {f['mean']:.1f} ± {f['sd']:.1f}")
    margin = f"{statistics.mean(margins):.1f} ± {spread or float('nan'):.1f}"
    print(f"margin    {margin} errors (bar: > 2 sd, every seed > 0)")
    print(json.dumps({"bench": "demo_seeds", "passed": passed, **figures}))
    return 0 if passed else 1


def _sd(values: list[int]) -> float | None:
    return round(statistics.stdev(values), 1) if len(values) > 1 else None


if __name__ == "__main__":
    sys.exit(main())
