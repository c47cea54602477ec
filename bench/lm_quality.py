"""SmolLM2-135M teaches a 6-layer student cut from it, on Shakespeare, through the real `distill run` pipeline.

Compares, on held-out text: the teacher, the student before training, the student trained with plain
next-token cross-entropy and the distilled student (same data, same steps, same starting weights).
Bar: the distilled student has lower held-out perplexity and higher top-1 agreement with the teacher than
the cross-entropy student. Also reports how much of the student→teacher perplexity gap distillation closes.
Ends with one JSON line; exits 1 when the bar is missed.

    python bench/lm_quality.py [--set student.train.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill.io import STAGE_DONE
from distill.tasks import load_recipe
from distill.tasks.causal_lm import run as run_lm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/smollm2-shakespeare.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lm_quality"))
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    # Stages an earlier call finished or started: this call resumes them, so its wall time is not the run's.
    reused = [
        stage
        for stage in ("baseline", "student")
        if (args.out / stage / STAGE_DONE).exists() or (args.out / stage / "checkpoint.pt").exists()
    ]
    start = time.perf_counter()
    metrics = run_lm(recipe, args.out, resume=True)
    minutes = None if reused else (time.perf_counter() - start) / 60
    models = metrics["models"]
    teacher, init, ce, kd = (models[k] for k in ("teacher", "student_init", "baseline", "student"))
    gap = ce["perplexity"] - teacher["perplexity"]
    closed = (ce["perplexity"] - kd["perplexity"]) / gap if gap > 0 else None  # undefined: no gap to close
    passed = kd["perplexity"] < ce["perplexity"] and kd["agreement_with_teacher"] > ce["agreement_with_teacher"]
    for name, label in [
        ("teacher", "teacher"),
        ("student_init", "student, before training"),
        ("baseline", "student, cross-entropy"),
        ("student", "student, distilled"),
    ]:
        m = models[name]
        agree = "—" if m["agreement_with_teacher"] is None else f"{m['agreement_with_teacher']:.1%}"
        print(
            f"{label:26s} params {m['parameters']:>12,}  ppl {m['perplexity']:9.2f}  agree {agree:>6s}  "
            f"tokens/s {m['tokens_per_s']:8,.0f}"
        )
    shown_closed = f"{closed:.1%}" if closed is not None else "none (the cross-entropy student is not behind it)"
    shown_minutes = f"{minutes:.1f} min" if minutes is not None else f"time not measured (resumed {', '.join(reused)})"
    print(
        f"distillation closes {shown_closed} of the cross-entropy student's perplexity gap to the teacher; "
        f"{shown_minutes}; bar (lower ppl and higher agreement than cross-entropy): {'PASS' if passed else 'FAIL'}"
    )
    figures = {
        "bench": "lm_quality",
        "recipe": str(args.recipe),
        "overrides": args.overrides,
        "train_blocks": metrics["data"]["train_blocks"],
        "heldout_tokens": teacher["heldout_tokens"],
        "perplexity": {k: round(models[k]["perplexity"], 3) for k in models},
        "agreement": {k: models[k]["agreement_with_teacher"] for k in models if k != "teacher"},
        "kl_to_teacher": {k: models[k]["kl_to_teacher"] for k in models if k != "teacher"},
        "parameters": {k: models[k]["parameters"] for k in models},
        "tokens_per_s": {k: round(models[k]["tokens_per_s"], 1) for k in models},
        "gap_closed": None if closed is None else round(closed, 4),
        "minutes": None if minutes is None else round(minutes, 1),
        "reused_stages": reused,
        "pass": passed,
    }
    print(json.dumps(figures))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
