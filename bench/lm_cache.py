"""Distilling an LM from the offline teacher cache vs from the live teacher: same student, same data.

Two runs of the real pipeline (no cross-entropy baseline): the student distilled from the live teacher
(full-distribution forward KL) and from the sampled cache (k tokens per position drawn from the teacher).
The cache is built first and timed on its own. Bars: a cached epoch ≥ 1.5× faster than a live one, and the
cached student's held-out perplexity within 2% of the live (full-distribution) student's.
Ends with one JSON line; exits 1 when a bar is missed.

    python bench/lm_cache.py [--set data.limit_train_blocks=256 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill.tasks import load_recipe
from distill.tasks.causal_lm import build_cache
from distill.tasks.causal_lm import run as run_lm


def seconds_per_epoch(run_dir: Path, blocks: int) -> float:
    """From the loop's own throughput figure, logged over the whole student stage."""
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [e for e in entries if e.get("stage") == "student"][-1]
    return blocks / last["examples_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/smollm2-shakespeare.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lm_cache"))
    args = parser.parse_args()

    common = [*args.overrides, "baseline=false"]
    cached = load_recipe(args.recipe, [*common, "distill.signal=cache"])
    live = load_recipe(args.recipe, [*common, "distill.signal=live"])
    called, start = time.time(), time.perf_counter()
    cache_dir = build_cache(cached, args.out / "cache")
    build_seconds = time.perf_counter() - start
    # meta.json is written last, once, when the cache is complete: older than this call means an earlier call built
    # the cache and this one only opened it, so the build was not timed here (null, "not measured").
    cache_reused = (cache_dir / "meta.json").stat().st_mtime < called
    if cache_reused:
        build_seconds = None
    results = {}
    for name, recipe in (("cache", cached), ("live", live)):
        metrics = run_lm(recipe, args.out / name, resume=True)
        blocks = metrics["data"]["train_blocks"]
        results[name] = {
            "seconds_per_epoch": round(seconds_per_epoch(args.out / name, blocks), 2),
            "perplexity": round(metrics["models"]["student"]["perplexity"], 3),
            "agreement": metrics["models"]["student"]["agreement_with_teacher"],
        }
    speedup = results["live"]["seconds_per_epoch"] / results["cache"]["seconds_per_epoch"]
    ppl_gap = results["cache"]["perplexity"] / results["live"]["perplexity"] - 1
    bytes_per_token = json.loads((cache_dir / "meta.json").read_text())["bytes_per_token"]
    passed = speedup >= 1.5 and abs(ppl_gap) <= 0.02
    live_s, cache_s = results["live"]["seconds_per_epoch"], results["cache"]["seconds_per_epoch"]
    shown_build = f"{build_seconds:.1f} s" if build_seconds is not None else "not measured (cache built earlier)"
    print(
        f"epoch: live {live_s:.1f} s, cache {cache_s:.1f} s "
        f"({speedup:.2f}×); cache build {shown_build}, {bytes_per_token} bytes/token; perplexity live "
        f"{results['live']['perplexity']:.2f} vs cache {results['cache']['perplexity']:.2f} ({ppl_gap:+.2%}); "
        f"bar (≥ 1.5×, within 2%): {'PASS' if passed else 'FAIL'}"
    )
    figures = {
        "bench": "lm_cache",
        "overrides": args.overrides,
        **results,
        "cache_build_seconds": None if build_seconds is None else round(build_seconds, 1),
        "cache_reused": cache_reused,
        "bytes_per_token": bytes_per_token,
        "cache_speedup": round(speedup, 3),
        "perplexity_gap": round(ppl_gap, 4),
        "pass": passed,
    }
    print(json.dumps(figures))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
