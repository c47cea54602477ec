"""Pretrained text teachers (issue 6): soft-label classification, embedding distillation, static embeddings.

Runs the three shipped recipes one after the other (they share the cached teacher features) and checks:
- recipes/20newsgroups.yaml: MiniLM-L6 distilled from all-mpnet-base-v2 + probe head (10% labeled) beats the
  same MiniLM fine-tuned on the labeled part for the same steps, and keeps ≥ 95% of the teacher's accuracy;
- recipes/embed-mpnet-4layer.yaml: a 4-layer student cut from mpnet keeps ≥ 97% of the teacher's probe accuracy
  on every probe set at ≥ 2.5× its texts/s;
- recipes/static-mpnet.yaml: static token vectors reach ≥ 100× the teacher's texts/s and ≥ 85% of its probe
  accuracy on every probe set.
Speeds are measured inside each run, with the CPU to itself (run nothing else meanwhile). Ends with one JSON line;
exits 1 when a bar is missed.

    python bench/text.py [--out runs/bench/text] [--reuse]   # needs distill fetch all-mpnet-base-v2, all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill.tasks import load_recipe
from distill.tasks.embedding import run as run_embedding
from distill.tasks.text_classification import run as run_text_classification

RECIPES = Path(__file__).parents[1] / "recipes"


def run(recipe_name: str, out: Path, reuse: bool) -> dict:
    recipe = load_recipe(RECIPES / recipe_name)
    if reuse and (out / "metrics.json").exists():
        if load_recipe(out / "recipe.yaml") != recipe:
            sys.exit(f"--reuse: {out} ran another recipe than recipes/{recipe_name}; rerun it without --reuse")
        return json.loads((out / "metrics.json").read_text())
    runner = run_embedding if recipe.task == "embedding" else run_text_classification
    started = time.perf_counter()
    metrics = runner(recipe, out, force=True)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def classification(m: dict) -> dict:
    t, b, s = (m["models"][k] for k in ("teacher", "baseline", "student"))
    kept = s["test_accuracy"] / t["test_accuracy"]
    return {
        "teacher_accuracy": t["test_accuracy"],
        "baseline_accuracy": b["test_accuracy"],
        "student_accuracy": s["test_accuracy"],
        "student_keeps_of_teacher": round(kept, 4),
        "student_agreement": s["agreement_with_teacher"],
        "baseline_agreement": b["agreement_with_teacher"],
        "student_speedup_texts_per_s": round(s["texts_per_s"] / t["texts_per_s"], 2),
        "student_smaller": round(t["parameters"] / s["parameters"], 2),
        "pass": s["test_accuracy"] > b["test_accuracy"] and kept >= 0.95,
    }


def embedding(m: dict, min_kept: float, min_speedup: float) -> dict:
    t, s = m["models"]["teacher"], m["models"]["student"]
    kept = {k.removeprefix("probe_"): round(s[k] / t[k], 4) for k in t if k.startswith("probe_")}
    speedup = s["texts_per_s"] / t["texts_per_s"]
    return {
        "teacher_probe": {k.removeprefix("probe_"): t[k] for k in t if k.startswith("probe_")},
        "student_probe": {k.removeprefix("probe_"): s[k] for k in s if k.startswith("probe_")},
        "probe_kept": kept,
        "cosine_to_teacher": s["cosine_to_teacher"],
        "speedup_texts_per_s": round(speedup, 2),
        "teacher_texts_per_s": t["texts_per_s"],
        "student_texts_per_s": s["texts_per_s"],
        "student_smaller": round(t["parameters"] / s["parameters"], 2),
        "pass": min(kept.values()) >= min_kept and speedup >= min_speedup,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/text"))
    parser.add_argument("--reuse", action="store_true", help="read runs that already finished instead of rerunning")
    parser.add_argument("--only", choices=["classification", "embedding", "static"], action="append")
    args = parser.parse_args()
    parts = args.only or ["classification", "embedding", "static"]
    results: dict = {"bench": "text"}
    if "classification" in parts:
        results["classification"] = classification(run("20newsgroups.yaml", args.out / "20newsgroups", args.reuse))
        print("classification:", json.dumps(results["classification"]))
    if "embedding" in parts:
        metrics = run("embed-mpnet-4layer.yaml", args.out / "embed-4layer", args.reuse)
        results["embedding_4layer"] = embedding(metrics, 0.97, 2.5)
        print("embedding, 4 layers:", json.dumps(results["embedding_4layer"]))
    if "static" in parts:
        results["static"] = embedding(run("static-mpnet.yaml", args.out / "static", args.reuse), 0.85, 100.0)
        print("static:", json.dumps(results["static"]))
    results["pass"] = all(part["pass"] for part in results.values() if isinstance(part, dict))
    print(json.dumps(results))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
