"""A cached-KD training step of a language-model student against a cross-entropy step (issue 19, deliverable 3), in
float32 and in bf16 against the machine's matmul peaks (issue 37, deliverable 3).

One run, side by side, interleaved: the same student (SmolLM2-135M's shape cut to 6 layers, random weights: only
the shapes set the cost), the same batch (8 × 128 tokens, as recipes/smollm2-shakespeare.yaml), a whole step —
forward, loss, backward, AdamW — with
- `ce`: next-token cross-entropy alone (`chunked_cross_entropy`), the plain-training step;
- `kd_ce_fused`: sampled KD from the cache (k = 16) + cross-entropy at α = 0.5 from one pass over the head
  (`chunked_sparse_kd_with_ce`, what the causal_lm task runs);
- `kd_ce_two_passes`: the same two terms as two chunked calls (what it ran before: two passes over the head);
- `kd`: the KD term alone (α = 0).
Each kind runs in float32 and in bf16 (forward and loss under ``torch.autocast("cpu", bfloat16)``, as a run with
``mixed_precision: bf16`` trains: the head's matmuls in bf16, float32 log-sum-exp, gradients and AdamW), interleaved.
Median seconds per step over the repeats, after a warm-up step each; each step's matmul FLOPs (counted by
``torch.utils.flop_counter``) per second as a fraction of the machine's float32 or bf16 matmul peak, measured here first
(the best of square and head-shaped products). Bars: kd_ce_fused ≤ 1.10 × ce (float32); bf16 kd_ce_fused ≤ 0.70 × the
float32 one. The fused and two-pass losses are checked equal on the first step.

``--run`` adds the second bar of issue 37: a 64-step distillation run of the shipped Shakespeare recipe
(``distill run``, SmolLM2 teacher cache, the student pruned to ½ of its block weights, no teacher adaptation, no
baseline: ``RUN_SETTINGS``) in float32 and in bf16 — same data, same init, one teacher cache — whose held-out
perplexities must agree within 1 %. Ends with one JSON line; exits 1 on a
miss.

    python bench/lm_step.py [--repeats 5] [--threads 2] [--layers 6] [--batch 8] [--block 128] [--run --out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from distill.losses.mix import mix_weights, t2_scale
from distill.losses.sparse import (
    SparseTargets,
    chunked_cross_entropy,
    chunked_sparse_kd_loss,
    chunked_sparse_kd_with_ce,
)
from distill.models.causal_lm import head_of, last_hidden
from distill.recipe import TrainSpec
from distill.train import make_optimizer

BAR = 1.10
BF16_BAR = 0.70  # bf16 fused KD+CE step over the float32 one
RUN_BAR = 0.01  # |bf16 − float32| / float32 held-out perplexity of the 64-step run
RUN_STEPS = 64
# the shipped recipe's student (½ of the block weights, depth importance) and data, pinned here so that the two runs
# compare precisions only: the teacher as shipped (no adaptation), no baseline, 64 student steps, one teacher cache
RUN_SETTINGS = [
    "teacher.train=null",
    "student.prune={params: 0.5, axes: [depth]}",
    "baseline=false",
    f"student.train.max_steps={RUN_STEPS}",
]
PRECISIONS = {"float32": None, "bf16": torch.bfloat16}
ALPHA, TEMPERATURE, K = 0.5, 1.0, 16


def student(layers: int) -> LlamaForCausalLM:
    """SmolLM2-135M's configuration (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied head)."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def matmul_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """The best FLOP/s of ``dtype`` matmuls here: square products and the LM head's shape (tokens × hidden × vocab)."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 576, 49152)):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--run", action="store_true", help="also the 64-step float32 vs bf16 distillation runs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lm_step_runs"), help="where --run writes its runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peaks = {name: matmul_peak(dtype or torch.float32) for name, dtype in PRECISIONS.items()}
    model = student(args.layers)
    optimizer = make_optimizer(model, TrainSpec(optimizer="adamw", lr=1e-5))  # the runs' AdamW (fused)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.block), generator=generator)
    attention = torch.ones_like(ids)
    next_tokens = ids[:, 1:]
    mask = torch.ones_like(next_tokens, dtype=torch.bool)
    targets = SparseTargets(torch.randint(0, vocab, (*next_tokens.shape, K), generator=generator))
    kd_weight, ce_weight = mix_weights(ALPHA, t2_scale(TEMPERATURE, True))
    common = {"mask": mask, "normalizer": float(mask.sum()), "vocab_size": vocab}

    def loss(kind: str, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        kw = common | {"student_bias": bias}
        if kind == "ce":
            return chunked_cross_entropy(hidden, weight, next_tokens, **kw)
        if kind == "kd":
            return kd_weight * chunked_sparse_kd_loss(hidden, weight, targets, temperature=TEMPERATURE, **kw)
        if kind == "kd_ce_fused":
            return chunked_sparse_kd_with_ce(
                hidden, weight, targets, next_tokens, kd_weight=kd_weight, ce_weight=ce_weight,
                temperature=TEMPERATURE, **kw,
            )[0]  # fmt: skip
        kd = chunked_sparse_kd_loss(hidden, weight, targets, temperature=TEMPERATURE, **kw)
        return kd_weight * kd + ce_weight * chunked_cross_entropy(hidden, weight, next_tokens, **kw)

    def step(kind: str, precision: str) -> tuple[float, float]:
        dtype = PRECISIONS[precision]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
            hidden = last_hidden(model, ids, attention)[:, :-1].float()  # as accelerate's forward returns it
            weight, bias = head_of(model)
            value = loss(kind, hidden, weight, bias)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, value.item()

    kinds = ("ce", "kd_ce_fused", "kd_ce_two_passes", "kd")
    rows = [
        (kind, precision)
        for kind in kinds
        for precision in PRECISIONS
        if precision == "float32" or kind != "kd_ce_two_passes"
    ]
    with torch.no_grad():  # the fused and the two-pass losses are the same number
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(model)
        fused, two = (loss(kind, hidden, weight, bias).item() for kind in ("kd_ce_fused", "kd_ce_two_passes"))
    same = abs(fused - two) <= 1e-5 * abs(two)
    flops = {}
    for kind, precision in rows:  # warm-up, and each step's matmul FLOPs
        with FlopCounterMode(display=False) as counter:
            step(kind, precision)
        flops[f"{kind}/{precision}"] = counter.get_total_flops()
    # the same matmuls in either precision; the counter misses in-place ``addmm_`` (the float32 path folds each chunk
    # after the first into the head's gradient that way), so every row takes the larger count of its kind
    for kind in kinds:
        most = max(count for row, count in flops.items() if row.startswith(f"{kind}/"))
        flops |= {row: most for row in flops if row.startswith(f"{kind}/")}
    seconds = {f"{kind}/{precision}": [] for kind, precision in rows}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every kind alike
        for kind, precision in rows:
            seconds[f"{kind}/{precision}"].append(round(step(kind, precision)[0], 4))
    median = {row: statistics.median(values) for row, values in seconds.items()}
    ratios = {row: round(median[row] / median[f"ce/{row.split('/')[1]}"], 4) for row in median}
    peak_share = {row: round(flops[row] / median[row] / peaks[row.split("/")[1]], 3) for row in median}
    bf16_over_float32 = {
        kind: round(median[f"{kind}/bf16"] / median[f"{kind}/float32"], 4) for kind in kinds if f"{kind}/bf16" in median
    }
    bars = {
        "kd_ce_fused_within_1.10x_ce": same and ratios["kd_ce_fused/float32"] <= BAR,
        "bf16_kd_ce_fused_within_0.70x_float32": bf16_over_float32["kd_ce_fused"] <= BF16_BAR,
    }
    print(f"student: {args.layers} layers of SmolLM2-135M's shape, {args.batch}×{args.block} tokens, "
          f"{args.threads} threads, k {K}, α {ALPHA}")  # fmt: skip
    print(f"matmul peaks: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    for row in median:
        print(f"{row:26s} {median[row]:.3f} s/step  {ratios[row]:.3f}× ce  {flops[row] / median[row] / 1e9:6.1f} "
              f"GFLOP/s = {peak_share[row]:.2f} of the peak")  # fmt: skip
    for kind, ratio in bf16_over_float32.items():
        print(f"bf16 / float32 {kind:18s} {ratio:.3f}×")
    print(f"fused loss {fused:.6f} vs two passes {two:.6f}: {'same' if same else 'DIFFERENT'}")
    figures = {
        "bench": "lm_step",
        "layers": args.layers,
        "tokens": args.batch * args.block,
        "threads": args.threads,
        "k": K,
        "alpha": ALPHA,
        "matmul_peak_flops": peaks,
        "seconds_per_step": median,
        "all_seconds": seconds,
        "step_flops": flops,
        "peak_share": peak_share,
        "over_ce": ratios,
        "bf16_over_float32": bf16_over_float32,
        "losses_equal": same,
    }
    if args.run:
        figures["run"] = distillation_runs(args.out)
        change = figures["run"]["change"]
        bars["bf16_run_within_1pct"] = change is not None and abs(change) <= RUN_BAR
    else:
        bars["bf16_run_within_1pct"] = "not measured (--run)"
    for bar, met in bars.items():
        print(f"bar {bar}: {'pass' if met is True else 'FAIL' if met is False else met}")
    figures["bars"] = bars
    figures["pass"] = all(met is True for met in bars.values())
    print(json.dumps(figures))
    return 0 if figures["pass"] else 1


def distillation_runs(out: Path) -> dict:
    """The shipped Shakespeare recipe for 64 student steps, float32 then bf16: held-out perplexity and wall time."""
    from distill.tasks import load_recipe, run_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-shakespeare.yaml"
    result = {}
    for precision in ("no", "bf16"):
        recipe = load_recipe(recipe_path, [*RUN_SETTINGS, f"mixed_precision={precision}",
                                           f"distill.cache_dir={out / 'cache'}"])  # fmt: skip
        started = time.perf_counter()
        metrics = run_recipe(recipe, out / precision, force=True)
        result[precision] = {
            "heldout_perplexity": metrics["models"]["student"]["perplexity"],
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "precision": metrics["machine"]["precision"],
        }
        print(f"64-step run, {precision}: held-out perplexity {result[precision]['heldout_perplexity']:.3f}, "
              f"{result[precision]['minutes']} min ({result[precision]['precision']})")  # fmt: skip
    base = result["no"]["heldout_perplexity"]
    result["change"] = round(result["bf16"]["heldout_perplexity"] / base - 1, 5) if base else None
    return result


if __name__ == "__main__":
    sys.exit(main())
