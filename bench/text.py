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

``--bootstrap N`` adds, for the 4-layer embedding student, a paired bootstrap over the probe test texts (N
resamples): the 90 % interval of the share of the teacher's probe accuracy the student keeps. It embeds the
training and test texts again with the saved student (the teacher's features come from its cache) and refits the
probes, so it costs a few minutes; it reports the figure, the bar still reads the point figure.

    python bench/text.py [--out runs/bench/text] [--reuse] [--bootstrap 2000]   # needs distill fetch
    all-mpnet-base-v2, all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.data.labeled_text import load_text_data
from distill.devices import to_numpy
from distill.losses import IGNORE_INDEX
from distill.models.encoders import load_encoder
from distill.models.probe import fit_probe
from distill.tasks import load_recipe
from distill.tasks.embedding import embed_texts, load_student
from distill.tasks.embedding import run as run_embedding
from distill.tasks.text_classification import run as run_text_classification
from distill.teachers.encoder_outputs import teacher_features
from distill.teachers.identity import encoder_id
from distill.teachers.store import cache_root

RECIPES = Path(__file__).parents[1] / "recipes"
# What each model's row in the JSON carries (when its run measured it): the tables in BENCHMARKS.md.
MODEL_FIGURES = (
    "parameters",
    "file_bytes",
    "test_accuracy",
    "agreement_with_teacher",
    "kl_to_teacher",
    "cosine_to_teacher",
    "latency_ms_batch1",
    "texts_per_s",
)


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


def model_figures(m: dict) -> dict:
    return {role: {k: v[k] for k in MODEL_FIGURES if k in v} for role, v in m["models"].items()}


def probe_correct(train: np.ndarray, test: np.ndarray, data, seed: int) -> np.ndarray:
    """Per test text: does the probe (as the run fits it: C=1 on the labeled training texts) get it right?"""
    labeled = data.train_labels != IGNORE_INDEX
    head, _ = fit_probe(train[labeled], data.train_labels[labeled], 1.0, seed)
    with torch.no_grad():
        return to_numpy(head(torch.from_numpy(test)).argmax(-1)) == data.test_labels


def paired_bootstrap(student: np.ndarray, teacher: np.ndarray, resamples: int, rng) -> tuple[float, float]:
    """5th and 95th percentiles of student accuracy / teacher accuracy over test sets resampled with replacement,
    the same texts for both (per-text hits in, a 90 % interval out)."""
    rows = rng.integers(0, len(student), size=(resamples, len(student)))
    low, high = np.percentile(student[rows].mean(1) / teacher[rows].mean(1), [5, 95])
    return float(low), float(high)


def probe_bootstrap(run_dir: Path, m: dict, resamples: int, seed: int = 0) -> dict:
    """Paired bootstrap of the student's probe accuracy as a share of the teacher's, per probe set: both models'
    per-text results on the same resampled test texts; the 5th and 95th percentiles of the share (a 90 % interval).
    The accuracies refitted here are checked against the run's own figures first."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher, teacher_tok = load_encoder(teacher_path)
    student = load_student(run_dir)
    cache, teacher_id = cache_root(recipe.distill, run_dir), encoder_id(teacher_path)

    def teacher_embeddings(texts: list[str], max_length: int) -> np.ndarray:
        pooled = torch.from_numpy(teacher_features(teacher, teacher_tok, texts, max_length, cache, teacher_id))
        return to_numpy(F.normalize(pooled, dim=-1) if teacher.normalize else pooled)

    rng = np.random.default_rng(seed)
    intervals = {}
    for spec in recipe.data:
        data = load_text_data(spec, recipe.seed)
        correct = {
            "teacher": probe_correct(
                teacher_embeddings(data.train_texts, spec.max_length),
                teacher_embeddings(data.test_texts, spec.max_length),
                data,
                recipe.seed,
            ),
            "student": probe_correct(
                embed_texts(student.model, student.tokenizer, data.train_texts, spec.max_length),
                embed_texts(student.model, student.tokenizer, data.test_texts, spec.max_length),
                data,
                recipe.seed,
            ),
        }
        for role, hits in correct.items():  # the same figure up to float order (thread count): a text or two
            recorded = m["models"][role][f"probe_{spec.source}"]
            if abs(hits.mean() - recorded) > 0.005:
                sys.exit(f"--bootstrap: {role} {spec.source} probe refits to {hits.mean():.6f}, the run has {recorded}")
        low, high = paired_bootstrap(correct["student"], correct["teacher"], resamples, rng)
        intervals[spec.source] = {
            "test_texts": len(data.test_labels),
            "accuracy_refitted": {role: round(float(hits.mean()), 6) for role, hits in correct.items()},
            "kept": round(float(correct["student"].mean() / correct["teacher"].mean()), 4),
            "interval_90": [round(float(low), 4), round(float(high), 4)],
        }
    return {"resamples": resamples, "seed": seed, "probe_kept": intervals}


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
        "models": model_figures(m),
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
        "models": model_figures(m),
        "pass": min(kept.values()) >= min_kept and speedup >= min_speedup,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/text"))
    parser.add_argument("--reuse", action="store_true", help="read runs that already finished instead of rerunning")
    parser.add_argument("--only", choices=["classification", "embedding", "static"], action="append")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="4-layer probe interval, N resamples")
    args = parser.parse_args()
    parts = args.only or ["classification", "embedding", "static"]
    results: dict = {"bench": "text"}
    if skipped := [p for p in ("classification", "embedding", "static") if p not in parts]:
        results["not_run"] = skipped  # --only: their bars are not checked, and the JSON says so
    if "classification" in parts:
        results["classification"] = classification(run("20newsgroups.yaml", args.out / "20newsgroups", args.reuse))
        print("classification:", json.dumps(results["classification"]))
    if "embedding" in parts:
        metrics = run("embed-mpnet-4layer.yaml", args.out / "embed-4layer", args.reuse)
        results["embedding_4layer"] = embedding(metrics, 0.97, 2.5)
        if args.bootstrap:
            interval = probe_bootstrap(args.out / "embed-4layer", metrics, args.bootstrap)
            results["embedding_4layer"]["probe_kept_bootstrap"] = interval
            for name, r in interval["probe_kept"].items():
                low, high = r["interval_90"]
                print(f"embedding, 4 layers, {name}: kept {r['kept']:.2%}, 90% interval [{low:.2%}, {high:.2%}]")
        print("embedding, 4 layers:", json.dumps(results["embedding_4layer"]))
    if "static" in parts:
        results["static"] = embedding(run("static-mpnet.yaml", args.out / "static", args.reuse), 0.85, 100.0)
        print("static:", json.dumps(results["static"]))
    results["pass"] = all(part["pass"] for part in results.values() if isinstance(part, dict))
    print(json.dumps(results))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
