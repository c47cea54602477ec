"""The LM teacher cache built from a served teacher against the one built from the local teacher (issue 22.5).

One run, side by side: recipes/smollm2-shakespeare.yaml cut to BLOCKS training blocks (top-k cache, k 16, T 1,
as a served teacher requires), the teacher SmolLM2-135M; the served teacher is the same weights behind
`distill.testing.prompt_server` (vLLM's `prompt_logprobs` answer over loopback HTTP: JSON, threads, one forward at
a time). Measured: tokens/s of each cache build (the teacher already loaded), equality of the two caches (ids
equal, stored log-probs within one float16 step, tails within one float16 step or 1e-4 as probabilities; the
last position of each block excepted: no loss reads it), and the student distilled from each (same init, same
steps, no baseline): held-out perplexity within 1 % of each other.
Cut (2 CPU cores): 64 training blocks of 128 tokens, 16 held-out blocks, 24 student steps of a 2-layer student.
No vLLM here, and llama-cpp-python's server (echo log-probabilities, `teacher.endpoint.format: echo`) is opt-in
(tests/test_llama_server.py): the reference server stands in, so the tokens/s figure is that of our client against
a server with no batching. `--format echo` has it answer as llama-cpp-python does (echo + logprobs keyed by token
text, the distribution after each token, text prompts only): pieces several of our ids spell are dropped into the
tail, and a block whose text the server tokenizes otherwise (a block cut between two newlines the tokenizer would
merge) is skipped (`on_mismatch: skip`, counted), so there the bar is the student's perplexity and the ids are
reported (the share of top-k entries equal).

    python bench/served_cache.py [--format prompt_logprobs|echo]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.tasks import load_recipe, run_recipe
from distill.tasks.causal_lm import setup
from distill.teachers.lm_choice import cache_path, open_cache
from distill.testing.prompt_server import serve

RECIPE = Path("recipes/smollm2-shakespeare.yaml")
BLOCKS, HELDOUT, STEPS = 64, 16, 24
OVERRIDES = [
    f"data.limit_train_blocks={BLOCKS}",
    f"data.limit_heldout_blocks={HELDOUT}",
    "student.from_teacher.keep=2",
    f"student.train.max_steps={STEPS}",
    "student.train.epochs=10",
    "distill.cache_mode=topk",
    "distill.temperature=1.0",
    "baseline=false",
    "eval.generations=0",
]
BAR_PERPLEXITY = 0.01


def timed_cache(recipe, out: Path, s):
    """Seconds to build the recipe's cache (the teacher or the server already loaded), and the opened cache."""
    start = time.perf_counter()
    cache = open_cache(recipe, out, s, "cpu")
    return time.perf_counter() - start, cache, cache_path(recipe, out, s)


def within_one_float16_step(a: torch.Tensor, b: torch.Tensor, also: torch.Tensor | None = None) -> bool:
    """Stored log-probabilities agree when they differ by at most one float16 step at their size (two float32
    values a hair apart can round to neighbouring float16 numbers), or where ``also`` holds."""
    step = torch.from_numpy(np.spacing(np.maximum(np.abs(a.numpy()), np.abs(b.numpy())).astype(np.float16)))
    close = (a - b).abs() <= step.float() + 1e-12
    return bool((close if also is None else close | also).all())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=["prompt_logprobs", "echo"], default="prompt_logprobs")
    args = parser.parse_args()
    echo = args.format == "echo"
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="served-cache-"))
    local = load_recipe(RECIPE, OVERRIDES)
    s = setup(local)
    tokens = len(s.train) * s.train.input_ids.shape[1]
    local_seconds, local_cache, local_path = timed_cache(local, work / "local", s)
    like_llama_cpp = {"tokenizer": s.tokenizer, "layout": "next", "text_only": True} if echo else {}
    with serve(s.teacher, s.vocab_size, **like_llama_cpp) as url:
        endpoint = {"url": url, "api": "completions", "concurrency": 2, "format": args.format}
        endpoint |= {"on_mismatch": "skip"} if echo else {}  # text prompts: a block's text may tokenize otherwise
        served = load_recipe(
            RECIPE, [*OVERRIDES, *(f"teacher.endpoint.{key}={value}" for key, value in endpoint.items())]
        )
        served_seconds, served_cache, served_path = timed_cache(served, work / "served", s)
    kept = torch.from_numpy(~served_cache.skipped).nonzero()[:, 0]  # blocks the served teacher did not skip
    a, b = local_cache[kept], served_cache[kept]
    same_ids = bool(torch.equal(a.ids[:, :-1], b.ids[:, :-1]))
    equal_share = float((a.ids[:, :-1] == b.ids[:, :-1]).float().mean())
    logp_a, logp_b = a.logp[:, :-1].float(), b.logp[:, :-1].float()
    logp_diff = float((logp_a - logp_b).abs().max())
    logp_within = within_one_float16_step(logp_a, logp_b)
    # The server gives only the top k, so its tail is 1 − Σ top-k: a tail of 1e-6 is known to ~1e-7 only, which moves
    # no loss. A tail agrees when it is within one float16 step or within 1e-4 as a probability.
    tail_a, tail_b = a.tail[:, :-1].float(), b.tail[:, :-1].float()
    tail_diff = float((tail_a.exp() - tail_b.exp()).abs().max())
    tail_within = within_one_float16_step(tail_a, tail_b, (tail_a.exp() - tail_b.exp()).abs() <= 1e-4)
    # The run reads the served cache (its folder is keyed by the server): no server is needed once it is built.
    perplexity = {}
    for name, recipe in (("local", local), ("served", served)):
        metrics = run_recipe(recipe, work / name, resume=True)
        perplexity[name] = metrics["models"]["student"]["perplexity"]
    gap = abs(perplexity["served"] / perplexity["local"] - 1)
    figures = {
        "bench": "served_cache",
        "format": args.format,
        "blocks": len(s.train),
        "tokens": tokens,
        "local_tokens_per_s": round(tokens / local_seconds, 1),
        "served_tokens_per_s": round(tokens / served_seconds, 1),
        "same_ids": same_ids,
        "equal_topk_share": round(equal_share, 6),
        "max_logp_diff": logp_diff,
        "logp_within_one_float16_step": logp_within,
        "max_tail_probability_diff": tail_diff,
        "tails_agree": tail_within,
        "student_perplexity_local": round(perplexity["local"], 4),
        "student_perplexity_served": round(perplexity["served"], 4),
        "perplexity_gap": round(gap, 6),
        "cache_folders": [local_path.name, served_path.name],
        "skipped_blocks": int(served_cache.skipped.sum()),
    }
    figures["passed"] = gap <= BAR_PERPLEXITY and (echo or (same_ids and logp_within and tail_within))
    speeds = f"local {tokens / local_seconds:,.0f} tokens/s, served {tokens / served_seconds:,.0f} tokens/s"
    print(
        f"cache build: {speeds} (served / local {local_seconds / served_seconds:.2f}); ids equal: {same_ids}; "
        f"max |log-prob diff| {logp_diff:.2e} (within one float16 step: {logp_within}); tails agree: {tail_within} "
        f"(max |tail probability diff| {tail_diff:.1e})"
    )
    print(f"student perplexity: from the local cache {perplexity['local']:.3f}, from the served cache "
          f"{perplexity['served']:.3f} (gap {100 * gap:.3f} %, bar {100 * BAR_PERPLEXITY:.0f} %)")  # fmt: skip
    print(json.dumps(figures))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
