"""LM distillation throughput on a GPU: Qwen2-shaped teacher (~1.5B) → student (~0.5B), bf16, seq 2048.

Randomly initialised models of real shapes (weights cannot travel to the GPU machine). One training step =
teacher forward (live) + student forward/backward + AdamW step, through the same loss functions as
`distill run`. Reports tokens/s, model-FLOPs utilisation (2·N_teacher + 6·N_student FLOPs per token
live, 6·N_student cached) and peak memory for: live + chunked loss, live + plain (full logits) loss,
cached sparse targets + chunked loss. Bar: ≥ 40% utilisation live (chunked). Ends with one JSON line;
exits 1 when the bar is missed. `--quick` runs tiny shapes on the CPU to check the script itself.

    python bench/gpu_throughput.py [--batch 4 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from distill.losses.chunked import chunked_distillation_loss, full_logits_distillation_loss
from distill.losses.sparse import SparseTargets, chunked_sparse_kd_loss
from distill.models.causal_lm import head_of, last_hidden

# Qwen2.5-1.5B and -0.5B shapes (vocab 151,936).
TEACHER = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
)
STUDENT = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


def build(shape: dict, vocab: int, dtype: torch.dtype, device: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=shape["hidden_size"] < 1024, **shape)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def step_fn(mode: str, teacher, student, optimizer, ids, targets):
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    attention = torch.ones_like(ids)
    hidden = last_hidden(student, ids, attention)[:, :-1]
    weight, _ = head_of(student)
    if mode == "cached":
        loss = chunked_sparse_kd_loss(hidden, weight, targets, mask=mask)
    else:
        with torch.no_grad():
            teacher_hidden = last_hidden(teacher, ids, attention)[:, :-1]
        loss_fn = chunked_distillation_loss if mode == "live_chunked" else full_logits_distillation_loss
        loss = loss_fn(hidden, weight, teacher_hidden, head_of(teacher)[0], mask=mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(mode: str, teacher, student, args, device: str) -> dict:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    targets = SparseTargets(ids=torch.randint(0, args.vocab, (args.batch, args.seq - 1, 16), device=device))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(args.warmup):
            step_fn(mode, teacher, student, optimizer, ids, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step_fn(mode, teacher, student, optimizer, ids, targets)
        if device == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"mode": mode, "error": "out of memory"}
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = ids.numel() / seconds
    flops_per_token = 6 * count(student) + (0 if mode == "cached" else 2 * count(teacher))
    result = {"mode": mode, "tokens_per_s": round(tokens_per_s), "step_ms": round(1000 * seconds, 1)}
    if device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            result["mfu"] = round(tokens_per_s * flops_per_token / (peak * 1e12), 4)
    del optimizer
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        args.batch, args.seq, args.vocab, args.steps, args.warmup = 2, 64, 512, 2, 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    teacher = build(TINY if args.quick else TEACHER, args.vocab, dtype, device).eval().requires_grad_(False)
    student = build(TINY if args.quick else STUDENT, args.vocab, dtype, device).train()
    rows = [measure(mode, teacher, student, args, device) for mode in ("live_chunked", "live_plain", "cached")]
    for row in rows:
        print(row)
    live = rows[0].get("mfu")
    passed = live is not None and live >= 0.40
    print(
        json.dumps(
            {
                "bench": "gpu_throughput",
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "teacher_params": count(teacher),
                "student_params": count(student),
                "batch": args.batch,
                "seq": args.seq,
                "runs": rows,
                "pass": passed,
            }
        )
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
