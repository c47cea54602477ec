"""Every GPU path in one call: each task tiny in bf16 on CUDA, FSDP on one GPU, the chunked loss against Liger-Kernel
at real shapes, and bench/gpu_throughput.py. Ends with one JSON line; exits 1 on any failure (a figure that was not
measured is a failure, never a pass). Meant for the GPU machine, under 8 minutes on one H100/H200:

    python bench/gpu_check.py            # on a GPU
    python bench/gpu_check.py --cpu      # the same checks, tiny, on the CPU: checks the script itself

Models are randomly initialised at the shapes that matter (weights cannot travel to the GPU machine); the tasks use
the tiny models and data the tests build (tests/*_fixtures.py). The GPU machine lacks pydantic, gguf and
liger-kernel: carry their wheels (see the device tool's README) —

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        pydantic pydantic-core annotated-types typing-inspection gguf liger-kernel
    # on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:src python3 bench/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the package and the fixtures the tests build

from lm_fixtures import TEXT, save_tiny, tiny_llama, tiny_tokenizer  # noqa: E402
from text_fixtures import save_sentence_encoder, tiny_bert, tiny_bert_tokenizer, write_topic_csv  # noqa: E402

from distill.tasks import export_run, parse_recipe, run_recipe  # noqa: E402
from distill.testing.arithmetic import char_tokenizer, make_problems  # noqa: E402

CHECKS: dict[str, Callable[[Path, argparse.Namespace], dict]] = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


def on_device(device: str) -> dict:
    """Peak device memory since the last reset: the proof that the work ran on the GPU."""
    if device != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if peak == 0:
        raise AssertionError("nothing was allocated on the GPU: the run stayed on the CPU")
    return {"peak_mib": round(peak / 2**20, 1)}


def finite_metrics(metrics: dict, *names: str) -> None:
    for name in names:
        if name not in metrics["models"]:
            raise AssertionError(f"no {name} in metrics.json")


@check
def classifier_cache(work: Path, args) -> dict:
    raw = {
        "name": "gpu-check",
        "seed": 0,
        "mixed_precision": "no" if args.cpu else "bf16",
        "data": {"source": "digits", "limit_train": 400},
        "teacher": {"model": {"hidden": [128]}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
        "student": {"model": {"hidden": [32]}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
        "distill": {"temperature": 3.0, "alpha": 0.1, "signal": "cache"},
        "eval": {"latency_runs": 5},
    }
    metrics = run_recipe(parse_recipe(raw), work / "run")
    finite_metrics(metrics, "teacher", "baseline", "student")
    exports = {
        fmt: export_run(work / "run", fmt, force=True).get("top1_agreement") for fmt in ("safetensors", "int8", "onnx")
    }
    return {"student_errors": metrics["models"]["student"]["test_errors"], "export_top1_agreement": exports}


def lm_recipe(work: Path, signal: str, args, **distill) -> dict:
    tok = tiny_tokenizer()
    if not (work / "teacher").exists():
        save_tiny(tiny_llama(tok, layers=4, seed=0), tok, work / "teacher")
        (work / "corpus.txt").write_text(TEXT)
    return {
        "task": "causal_lm",
        "name": f"gpu-{signal}",
        "mixed_precision": "no" if args.cpu else "bf16",
        "data": {"source": "text", "path": str(work / "corpus.txt"), "block_size": 32, "heldout_fraction": 0.2},
        "teacher": {"path": str(work / "teacher"), "dtype": "float32" if args.cpu else "bfloat16"},
        "student": {
            "from_teacher": {"keep": 2},
            "train": {"epochs": 1, "batch_size": 8, "grad_accum": 2, "optimizer": "adamw", "lr": 3e-3},
        },
        "distill": {"signal": signal, "cache_k": 8, "chunk_size": 64, **distill},
        "eval": {"batch_size": 4, "threads": 1},
    }


@check
def lm_live_and_cache(work: Path, args) -> dict:
    out = {}
    for signal in ("live", "cache"):
        metrics = run_recipe(parse_recipe(lm_recipe(work, signal, args)), work / signal)
        finite_metrics(metrics, "teacher", "baseline", "student")
        out[signal] = {k: metrics["models"]["student"].get(k) for k in ("perplexity", "agreement_with_teacher")}
    out["export_top1_agreement"] = {
        fmt: export_run(work / "live", fmt, force=True).get("top1_agreement") for fmt in ("safetensors", "gguf-f16")
    }
    return out


@check
def lm_adapt_prune_fused(work: Path, args) -> dict:
    """Issue 19: the teacher adapted on the device first, a student pruned from it (importance hooks on the device),
    two epochs from a two-set sampled cache, KD + CE from one pass over the head (alpha 0.5)."""
    raw = lm_recipe(work, "cache", args, alpha=0.5)
    raw["teacher"]["train"] = {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3}
    raw["student"] = {"prune": {"params": 0.5, "axes": ["depth", "width"], "calibration_blocks": 4},
                      "train": raw["student"]["train"] | {"epochs": 2}}  # fmt: skip
    metrics = run_recipe(parse_recipe(raw), work / "adapt")
    finite_metrics(metrics, "teacher_base", "teacher", "baseline", "student")
    return {"pruning": metrics["pruning"]["kept"], "student_perplexity": metrics["models"]["student"]["perplexity"]}


@check
def lm_recorded(work: Path, args) -> dict:
    """distill generate with the local teacher on the GPU (top-4 log-probs), then a run on the recorded signal."""
    from distill.tasks.generate import generate

    raw = lm_recipe(work, "recorded", args, alpha=0.0, temperature=1.0)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(TEXT.split(".")[:12])))
    spec = {
        "task": "generate",
        "prompts": {"path": str(prompts), "chat_template": False},
        "teacher": {"path": raw["teacher"]["path"], "dtype": raw["teacher"]["dtype"]},
        "sampling": {"temperature": 1.0, "max_new_tokens": 12, "samples": 2, "logprobs": 4, "batch_size": 8},
        "verify": {"method": "none"},
    }
    counts = generate(parse_recipe(spec), work / "traces.jsonl")
    raw["data"] = {
        "source": "jsonl",
        "path": str(work / "traces.kept.jsonl"),
        "block_size": 128,
        "heldout_fraction": 0.25,
    }
    metrics = run_recipe(parse_recipe(raw), work / "run")
    finite_metrics(metrics, "student")
    return {"traces": counts.get("kept"), "student_perplexity": metrics["models"]["student"].get("perplexity")}


@check
def lm_onpolicy(work: Path, args) -> dict:
    tok = char_tokenizer()
    save_tiny(tiny_llama(tok, layers=2, seed=1), tok, work / "teacher")
    with (work / "pairs.jsonl").open("w") as handle:
        for p in make_problems(32, seed=5):
            handle.write(json.dumps({"prompt": p["prompt"], "response": p["solution"]}) + "\n")
    raw = {
        "task": "causal_lm",
        "mixed_precision": "no" if args.cpu else "bf16",
        "data": {"source": "jsonl", "path": str(work / "pairs.jsonl"), "block_size": 48, "heldout_fraction": 0.2},
        "teacher": {"path": str(work / "teacher"), "dtype": "float32" if args.cpu else "bfloat16"},
        "student": {"from_teacher": {"keep": 1}, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3}},
        "distill": {"signal": "live", "onpolicy": {"lam": 1.0, "beta": 0.5, "max_new_tokens": 8}},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1},
    }
    metrics = run_recipe(parse_recipe(raw), work / "run")
    finite_metrics(metrics, "student")
    return {"student_perplexity": metrics["models"]["student"].get("perplexity")}


@check
def text_tasks(work: Path, args) -> dict:
    tok = tiny_bert_tokenizer()
    teacher = save_sentence_encoder(work / "teacher", tiny_bert(tok, layers=4), tok)
    data = write_topic_csv(work / "topics", n_train=150, n_test=60)
    train = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3}
    classification = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(data), "labeled_fraction": 0.2, "max_length": 16},
        "teacher": {"path": str(teacher), "train": {"epochs": 1, "batch_size": 16}},
        "student": {"from_teacher": {"keep": 2}, "train": train},
        "distill": {"temperature": 2.0},
        "eval": {"threads": 1, "batch_size": 8},
    }
    text = run_recipe(parse_recipe(classification), work / "text")
    embedding = {
        "task": "embedding",
        "data": [{"source": "csv", "path": str(data), "max_length": 16}],
        "teacher": {"path": str(teacher), "train": {"epochs": 1, "batch_size": 16}},
        "student": {"from_teacher": {"keep": 2}, "train": train},
        "distill": {"loss": "mse"},
        "eval": {"threads": 1, "batch_size": 8},
    }
    embed = run_recipe(parse_recipe(embedding), work / "embed")
    exports = {run: export_run(work / run, "safetensors").get("top1_agreement") for run in ("text", "embed")}
    return {
        "text_student_accuracy": text["models"]["student"].get("test_accuracy"),
        "embedding_cosine": embed["models"]["student"].get("cosine_to_teacher"),
        "export_top1_agreement": exports,
    }


@check
def fsdp_one_gpu(work: Path, args) -> dict:
    """fully_shard over a one-process group (NCCL on a GPU) against the plain loop: the same weights (bf16 bounds)."""
    from accelerate import Accelerator

    from distill.recipe import LMDistillSpec, TrainSpec
    from distill.tasks.causal_lm import LMBatches
    from distill.teachers.lm_signals import LiveLMSignal
    from distill.train import train_loop

    device = "cpu" if args.cpu else "cuda"
    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (14, 32), generator=torch.Generator().manual_seed(0)).numpy()
    from distill.data.token_blocks import TokenData

    data = TokenData(input_ids=ids, labels=ids.astype("int64"), attention_mask=(ids * 0 + 1).astype("int8"))
    teacher = tiny_llama(tok, layers=2, seed=9).to(device)
    spec_kd = LMDistillSpec(signal="live", temperature=1.0)
    trained = {}
    for fsdp in (False, True):
        if fsdp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            backend = "gloo" if args.cpu else "nccl"
            torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            spec = TrainSpec(epochs=1, batch_size=6, grad_accum=2, optimizer="adamw", lr=1e-3, fsdp=fsdp)
            batches = LMBatches(data, len(tok), 16, spec_kd, LiveLMSignal(teacher, "forward_kl", 1.0))
            model = tiny_llama(tok, layers=2, seed=3)
            accelerator = Accelerator(mixed_precision="no" if args.cpu else "bf16")
            trained[fsdp] = train_loop(f"fsdp{fsdp}", model, spec, batches, work, accelerator, seed=0).state_dict()
        finally:
            if fsdp:
                torch.distributed.destroy_process_group()
    worst = max(
        (trained[True][k].float().cpu() - v.float().cpu()).abs().max().item() for k, v in trained[False].items()
    )
    if worst > (1e-5 if args.cpu else 2e-2):
        raise AssertionError(f"FSDP weights differ from the plain loop's by {worst:.3g}")
    return {"max_weight_diff": worst, **on_device(device)}


@check
def chunked_vs_liger(work: Path, args) -> dict:
    """Forward + backward of forward KL from hidden states: ours (chunked), plain (full logits), Liger's fused JSD
    (beta 0 = forward KL). Time and memory above the inputs; values and gradients against the plain loss."""
    from distill.losses.chunked import chunked_distillation_loss, full_logits_distillation_loss

    device = "cpu" if args.cpu else "cuda"
    n, vocab, hidden = (256, 2048, 64) if args.cpu else (8192, 151_936, 896)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(n, hidden, device=device, dtype=dtype, generator=g)
    h_t = torch.randn(n, hidden, device=device, dtype=dtype, generator=g)
    w_s = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.05).requires_grad_()
    w_t = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.05

    def ours(hs):
        return chunked_distillation_loss(hs, w_s, h_t, w_t)

    def plain(hs):
        return full_logits_distillation_loss(hs, w_s, h_t, w_t)

    candidates = {"chunked": ours, "plain": plain}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        candidates["liger"] = lambda hs: jsd(hs, w_s, h_t, w_t)
    except ImportError:
        pass  # reported as not measured below: a failure on a GPU
    results = {}
    for name, loss_fn in candidates.items():
        results[name] = measure_loss(loss_fn, h_s, w_s, device)
    reference = results["plain"]["value"]
    for row in results.values():
        row["value_rel_diff"] = abs(row["value"] - reference) / abs(reference)
    grad_ref = results["plain"]["grad"].float().flatten()
    for row in results.values():
        grad = row.pop("grad").float().flatten()
        row["grad_cosine"] = round(float(torch.nn.functional.cosine_similarity(grad, grad_ref, dim=0)), 5)
    if "liger" not in results and not args.cpu:
        raise AssertionError("liger-kernel is not installed: the comparison was not measured")
    bad = {k: v for k, v in results.items() if v["value_rel_diff"] > 2e-2 or v["grad_cosine"] < 0.99}
    if bad:
        raise AssertionError(f"loss values or gradients differ from the plain loss: {bad}")
    return {"tokens": n, "vocab": vocab, "hidden": hidden, **results}


def measure_loss(loss_fn, h_s: torch.Tensor, w_s: torch.Tensor, device: str, repeats: int = 5) -> dict:
    def once():
        hs = h_s.detach().requires_grad_()
        loss = loss_fn(hs)
        loss.backward()
        w_s.grad = None
        return loss.detach(), hs.grad

    loss, grad = once()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    row = {"ms": round(1000 * (time.perf_counter() - start) / repeats, 2), "value": float(loss), "grad": grad}
    if device == "cuda":
        row["gib_above_inputs"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    return row


@check
def throughput(work: Path, args) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), *(["--quick"] if args.cpu else [])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"gpu_throughput.py printed no JSON (exit {done.returncode}): {done.stderr[-400:]}")
    figures = json.loads(lines[-1])
    if done.returncode != 0 and not args.cpu:  # on the CPU (--quick) its bar cannot be met: MFU is not measured
        raise AssertionError(f"gpu_throughput.py missed its bar: {figures['runs']}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every check tiny on the CPU (checks the script)")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            json.dumps({"bench": "gpu_check", "pass": False, "error": "no CUDA device (use --cpu to test the script)"})
        )
        return 1
    torch.manual_seed(0)
    results, started = {}, time.perf_counter()
    for name in args.only or CHECKS:
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as work:
            try:
                if not args.cpu:
                    torch.cuda.reset_peak_memory_stats()
                figures = CHECKS[name](Path(work), args)
                if not args.cpu and "peak_mib" not in figures:
                    figures |= on_device("cuda")
                results[name] = {"ok": True, **figures}
            except Exception as exc:  # every check runs; each failure is reported with its last frames
                tail = "".join(traceback.format_exception(exc)[-3:])
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600], "where": tail[-1500:]}
        results[name]["seconds"] = round(time.perf_counter() - began, 1)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']}", flush=True)
    passed = all(r["ok"] for r in results.values())
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    summary = {"bench": "gpu_check", "device": device, "torch": torch.__version__, "checks": results}
    print(json.dumps(summary | {"seconds": round(time.perf_counter() - started, 1), "pass": passed}, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
