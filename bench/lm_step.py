"""A cached-KD training step of a language-model student against a cross-entropy step (issue 19, deliverable 3).

One run, side by side, interleaved: the same student (SmolLM2-135M's shape cut to 6 layers, random weights: only
the shapes set the cost), the same batch (8 × 128 tokens, as recipes/smollm2-shakespeare.yaml), a whole step —
forward, loss, backward, AdamW — with
- `ce`: next-token cross-entropy alone (`chunked_cross_entropy`), the plain-training step;
- `kd_ce_fused`: sampled KD from the cache (k = 16) + cross-entropy at α = 0.5 from one pass over the head
  (`chunked_sparse_kd_with_ce`, what the causal_lm task runs);
- `kd_ce_two_passes`: the same two terms as two chunked calls (what it ran before: two passes over the head);
- `kd`: the KD term alone (α = 0).
Median seconds per step over the repeats, after a warm-up step each. Bar: kd_ce_fused ≤ 1.10 × ce. The two-pass
figure is printed beside it. The fused and two-pass losses are checked equal on the first step. Ends with one
JSON line; exits 1 on a miss.

    python bench/lm_step.py [--repeats 5] [--threads 2] [--layers 6] [--batch 8] [--block 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.losses.mix import mix_weights, t2_scale
from distill.losses.sparse import (
    SparseTargets,
    chunked_cross_entropy,
    chunked_sparse_kd_loss,
    chunked_sparse_kd_with_ce,
)
from distill.models.causal_lm import head_of, last_hidden

BAR = 1.10
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = student(args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
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

    def step(kind: str) -> tuple[float, float]:
        started = time.perf_counter()
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(model)
        value = loss(kind, hidden, weight, bias)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, value.item()

    kinds = ("ce", "kd_ce_fused", "kd_ce_two_passes", "kd")
    with torch.no_grad():  # the fused and the two-pass losses are the same number
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(model)
        fused, two = (loss(kind, hidden, weight, bias).item() for kind in ("kd_ce_fused", "kd_ce_two_passes"))
    same = abs(fused - two) <= 1e-5 * abs(two)
    for kind in kinds:  # warm-up
        step(kind)
    seconds = {kind: [] for kind in kinds}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every kind alike
        for kind in kinds:
            seconds[kind].append(round(step(kind)[0], 4))
    median = {kind: statistics.median(values) for kind, values in seconds.items()}
    ratios = {kind: round(median[kind] / median["ce"], 4) for kind in kinds}
    passed = same and ratios["kd_ce_fused"] <= BAR
    print(f"student: {args.layers} layers of SmolLM2-135M's shape, {args.batch}×{args.block} tokens, "
          f"{args.threads} threads, k {K}, α {ALPHA}")  # fmt: skip
    for kind in kinds:
        print(f"{kind:18s} {median[kind]:.3f} s/step  {ratios[kind]:.3f}× ce")
    print(f"fused loss {fused:.6f} vs two passes {two:.6f}: {'same' if same else 'DIFFERENT'}")
    print(f"bar kd_ce_fused ≤ {BAR}× ce: {'pass' if passed else 'FAIL'}")
    figures = {
        "bench": "lm_step",
        "layers": args.layers,
        "tokens": args.batch * args.block,
        "threads": args.threads,
        "k": K,
        "alpha": ALPHA,
        "seconds_per_step": median,
        "all_seconds": seconds,
        "over_ce": ratios,
        "losses_equal": same,
        "bar": BAR,
        "pass": passed,
    }
    print(json.dumps(figures))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
