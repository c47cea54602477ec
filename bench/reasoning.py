"""Reasoning distillation on multi-step arithmetic (issue 5): does a student learn more from the teacher's
step-by-step traces than from its final answers?

A teacher (small Llama, trained here from scratch on worked solutions) solves held-out problems writing its
steps. It then writes traces for a transfer set of prompts through ``distill generate`` (local teacher, exact-match
verification); three students of one size and one training budget learn from it:
(a) the teacher's final answers only, (b) its verified step-by-step traces, (c) on-policy GKD (λ, β) on the same
prompts, starting from scratch like the others. Held-out exact-match accuracy of all four, problems never seen in
training. Bar: (b) beats (a) by ≥ 20 points. Ends with one JSON line; exits 1 when the bar is missed.

The default task is six one-digit terms modulo 10 (five steps, each one entry of a small table; the answer in
one go a parity-like sum). ``--terms 3 --digits 2 --modulus 0`` is the plain-integer variant, whose carries a
CPU budget does not teach the students (BENCHMARKS.md).

    python bench/reasoning.py [--train 10000 --transfer 12000 --heldout 400 --student-epochs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.data.token_blocks import encode_pairs
from distill.models import count_parameters
from distill.models.causal_lm import load_causal_lm, save_causal_lm
from distill.recipe import SamplingSpec, TrainSpec
from distill.tasks import parse_recipe
from distill.tasks.causal_lm import LMBatches
from distill.tasks.generate import generate, generate_local
from distill.tasks.verify import exact_match
from distill.teachers.onpolicy import OnPolicyBatches
from distill.testing.arithmetic import char_tokenizer, make_problems
from distill.train import make_accelerator, train_loop

MAX_LENGTH = 64


def build(tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(name, model, batches, out: Path, epochs: int, lr: float, seed: int):
    spec = TrainSpec(
        epochs=epochs,
        batch_size=64,
        optimizer="adamw",
        lr=lr,
        weight_decay=0.01,
        warmup_steps=50,
        max_grad_norm=1.0,
        log_every=50,
        checkpoint_every=500,
    )
    resumed = (out / name / "checkpoint.pt").exists()  # an earlier call trained some or all of it
    start = time.perf_counter()
    model = train_loop(name, model, spec, batches, out, make_accelerator(), seed=seed, resume=True)
    return model.eval(), None if resumed else time.perf_counter() - start


def seconds(value: float | None) -> float | None:
    """Rounded seconds, or None (JSON null): not measured, because an earlier call did (some of) that work."""
    return None if value is None else round(value, 1)


def accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int) -> float:
    """Greedy, batched; the final answer extracted from whatever the model writes."""
    sampling = SamplingSpec(temperature=0, max_new_tokens=max_new_tokens)
    correct = 0
    for start in range(0, len(problems), 100):
        batch = problems[start : start + 100]
        outputs = generate_local(model, tokenizer, [p["prompt"] for p in batch], sampling, seed=0)
        correct += sum(exact_match(o["completion"], p) for o, p in zip(outputs, batch, strict=True))
    return correct / len(problems)


def smollm2_on_reasoning_gym(out: Path, n: int, seed: int) -> dict:
    """SmolLM2-135M-Instruct (the offline GGUF) through ``distill generate`` on reasoning-gym's basic_arithmetic:
    accuracy by reasoning-gym's own scorer, and generated tokens/s (batched, CPU)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(
        "basic_arithmetic", size=n, seed=seed, min_terms=2, max_terms=3, max_digits=2
    )
    prompts = out / "reasoning_gym.jsonl"
    instruction = " Think step by step, then end with 'The answer is N'."
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "prompt": e["question"] + instruction, "answer": e["answer"], "entry": e}) + "\n"
            for i, e in enumerate(dataset)
        )
    )
    recipe = parse_recipe(
        {
            "task": "generate",
            "seed": seed,
            "prompts": {"path": str(prompts)},
            "teacher": {"path": "smollm2"},
            "sampling": {"temperature": 0, "max_new_tokens": 128, "batch_size": 8},
            "verify": {"method": "reasoning_gym"},
        }
    )
    traces = out / "smollm2_traces.jsonl"
    traces.unlink(missing_ok=True)
    torch.set_num_threads(2)
    start = time.perf_counter()
    summary = generate(recipe, traces)
    seconds = time.perf_counter() - start
    tokens = sum(len(json.loads(line)["tokens"]) for line in traces.read_text().splitlines())
    return {
        "prompts": n,
        "accuracy": round(summary["kept"] / summary["traces"], 4),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds_incl_load": round(seconds, 1),
    }


def on_policy_student(args, tokenizer, teacher, traces, heldout, out: Path) -> dict:
    """Student (c): GKD from scratch, on-policy with probability lam, else on the teacher's fixed traces."""
    gkd = OnPolicyBatches(
        traces,
        teacher,
        len(tokenizer),
        lam=args.lam,
        beta=args.beta,
        max_new_tokens=48,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        seed=args.seed,
    )
    student = build(tokenizer, args.student_hidden, args.student_layers, args.seed + 1)
    model, train_seconds = train("c_on_policy", student, gkd, out, args.student_epochs, 2e-3, args.seed)
    return {"accuracy": accuracy(model, tokenizer, heldout, 48), "train_seconds": seconds(train_seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="worked problems the teacher learns from")
    parser.add_argument("--transfer", type=int, default=12000, help="prompts the teacher writes traces for")
    parser.add_argument("--heldout", type=int, default=400)
    parser.add_argument("--terms", type=int, default=6, help="numbers per problem (terms - 1 steps)")
    parser.add_argument("--digits", type=int, default=1, help="digits per number")
    parser.add_argument("--modulus", type=int, default=10, help="reduce every result modulo this (0: plain integers)")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--skip-on-policy", action="store_true", help="train students (a) and (b) only")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=12)
    parser.add_argument("--lam", type=float, default=0.5, help="share of on-policy steps for student (c)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reasoning"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smollm2-prompts", type=int, default=24, help="reasoning-gym prompts for SmolLM2 (0: skip)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    task = {"terms": args.terms, "digits": args.digits, "modulus": args.modulus or None}
    heldout = make_problems(args.heldout, seed=10_000 + args.seed, **task)
    unseen = {p["prompt"] for p in heldout}
    worked = make_problems(args.train, seed=20_000 + args.seed, **task, exclude=unseen)
    transfer = make_problems(
        args.transfer, seed=30_000 + args.seed, **task, exclude=unseen | {p["prompt"] for p in worked}
    )
    answer_tokens, trace_tokens = 12, 48

    # the teacher: trained from scratch on worked solutions
    teacher_dir = out / "teacher"
    if (teacher_dir / "model.safetensors").exists():
        teacher = load_causal_lm(teacher_dir)[0].eval()
        teacher_seconds = None  # trained by an earlier call: not measured here
    else:
        data = encode_pairs([(p["prompt"], p["solution"]) for p in worked], tokenizer, MAX_LENGTH)
        teacher, teacher_seconds = train(
            "teacher",
            build(tokenizer, 256, 4, args.seed),
            LMBatches(data, len(tokenizer), 512),
            out,
            args.teacher_epochs,
            1e-3,
            args.seed,
        )
        save_causal_lm(teacher, tokenizer, teacher_dir)
    results = {
        "teacher": {
            "accuracy": accuracy(teacher, tokenizer, heldout, trace_tokens),
            "parameters": count_parameters(teacher),
        }
    }
    print(f"teacher: {results['teacher']}", flush=True)

    # its traces for the transfer prompts, through distill generate (resumable), verified by exact match
    prompts = out / "transfer.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in transfer))
    recipe = parse_recipe(
        {
            "task": "generate",
            "seed": args.seed,
            "prompts": {"path": str(prompts), "chat_template": False},
            "teacher": {"path": str(teacher_dir)},
            "sampling": {"temperature": 0, "max_new_tokens": trace_tokens, "batch_size": 200},
            "verify": {"method": "exact"},
        }
    )
    written = out / "traces.jsonl"
    reused_traces = sum(1 for line in written.open() if line.strip()) if written.exists() else 0
    start = time.perf_counter()
    summary = generate(recipe, written)
    # Only a call that wrote every trace timed the writing; resumed or reused traces: not measured (null).
    generate_seconds = None if reused_traces else time.perf_counter() - start
    kept = [json.loads(line) for line in (out / "traces.kept.jsonl").read_text().splitlines()]
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    final = {r["id"]: r["predicted"] for r in traces}
    print(f"traces: {summary}", flush=True)

    # three students, one size, one budget
    student_data = {
        "a_final_answers": encode_pairs(
            [(r["prompt"], f"answer {final[r['id']]}") for r in kept], tokenizer, MAX_LENGTH
        ),
        "b_traces": encode_pairs([(r["prompt"], r["response"]) for r in kept], tokenizer, MAX_LENGTH),
    }
    for name, data in student_data.items():
        model, train_seconds = train(
            name,
            build(tokenizer, args.student_hidden, args.student_layers, args.seed + 1),
            LMBatches(data, len(tokenizer), 512),
            out,
            args.student_epochs,
            2e-3,
            args.seed,
        )
        tokens = answer_tokens if name.startswith("a") else trace_tokens
        results[name] = {
            "accuracy": accuracy(model, tokenizer, heldout, tokens),
            "train_seconds": seconds(train_seconds),
        }
        print(f"{name}: {results[name]}", flush=True)
    if not args.skip_on_policy:
        results["c_on_policy"] = on_policy_student(args, tokenizer, teacher, student_data["b_traces"], heldout, out)
        print(f"c_on_policy: {results['c_on_policy']}", flush=True)
    student = build(tokenizer, args.student_hidden, args.student_layers, args.seed + 1)
    for name in results:
        if name != "teacher":
            results[name]["parameters"] = count_parameters(student)

    smollm2 = smollm2_on_reasoning_gym(out, args.smollm2_prompts, args.seed) if args.smollm2_prompts else None
    if smollm2:
        print(f"SmolLM2-135M-Instruct on reasoning-gym basic_arithmetic: {smollm2}", flush=True)
    gap = results["b_traces"]["accuracy"] - results["a_final_answers"]["accuracy"]
    passed = results["teacher"]["accuracy"] >= 0.9 and gap >= 0.20
    acc = {name: f"{r['accuracy']:.1%}" for name, r in results.items()}
    print(
        f"held-out exact match: teacher {acc['teacher']}, (a) answers {acc['a_final_answers']}, "
        f"(b) traces {acc['b_traces']}, (c) on-policy {acc.get('c_on_policy', 'skipped')}; "
        f"(b) - (a) = {100 * gap:+.1f} points (bar: teacher ≥ 90%, ≥ +20): {'PASS' if passed else 'FAIL'}"
    )
    timed = {"teacher": teacher_seconds, "traces": generate_seconds}
    timed |= {name: r.get("train_seconds") for name, r in results.items() if name != "teacher"}
    print(
        "seconds: "
        + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} not measured (reused)" for k, v in timed.items())
    )
    figures = {
        "bench": "reasoning",
        "problems": {
            "worked": args.train,
            "transfer": args.transfer,
            "heldout": args.heldout,
            **task,
        },
        "traces": summary
        | {
            "generate_seconds": seconds(generate_seconds),
            "reused_traces": reused_traces,
            "teacher_train_seconds": seconds(teacher_seconds),
        },
        "models": results,
        "lam": args.lam,
        "beta": args.beta,
        "b_minus_a_points": round(100 * gap, 1),
        "smollm2_reasoning_gym": smollm2,
        "pass": passed,
    }
    print(json.dumps(figures))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
