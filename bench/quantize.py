"""Distilled students → quantized files: what the small file keeps and what it costs, measured.

1. MNIST (`recipes/mnist.yaml`, the demo): distilled student fp32 vs dynamic int8. Bar: int8 file ≤ 0.3× the
   fp32 file, test accuracy down by ≤ 0.5 points.
2. SmolLM2 → 6-layer student (`recipes/smollm2-shakespeare.yaml`, the lm_quality run): fp32 vs int8 vs
   GGUF q8_0. Bar: held-out perplexity up by ≤ 2% and batch-1 CPU latency ≥ 1.3× faster than fp32. The GGUF's
   perplexity is measured through transformers' GGUF loader; its speed and agreement in llama.cpp itself
   (llama-cpp-python). Without llama-cpp-python the GGUF's speed is not measured: the JSON gives null, the
   printout says "not measured", and the bar fails (a figure that was not measured never passes).
3. The chain as one table: teacher → distilled student → int8 student, size and speed ratios, quality kept.

Runs resume finished stages, so on a machine that already ran `make demo` and bench/lm_quality.py this
only evaluates and exports. Ends with one JSON line; exits 1 when a bar is missed.

    python bench/quantize.py [--mnist-run runs/mnist --lm-run runs/bench/lm_quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from distill.evaluate import lm_forward_seconds, lm_perplexity
from distill.models.causal_lm import load_causal_lm
from distill.tasks import export_run, load_recipe
from distill.tasks.causal_lm import run as run_lm
from distill.tasks.causal_lm import setup
from distill.tasks.classifier import run

NOT_MEASURED = "not measured: llama-cpp-python not installed"


def batch1_latency_ms(model, ids: torch.Tensor) -> float:
    """One forward pass over one block (batch 1), 1 CPU thread, median of 10 after a warm-up."""
    return 1000 * lm_forward_seconds(model, ids, threads=1, runs=10)


def run_recipe(run_dir: Path, default: str):
    """The run's own resolved recipe when it exists (so a finished run is resumed, not retrained)."""
    saved = run_dir / "recipe.yaml"
    return load_recipe(saved if saved.exists() else default)


def mnist(run_dir: Path) -> dict:
    models = run(run_recipe(run_dir, "recipes/mnist.yaml"), run_dir, resume=True)["models"]
    fp32, int8 = models["student"], models["student_int8"]
    figures = {
        "fp32_bytes": fp32["file_bytes"],
        "int8_bytes": int8["file_bytes"],
        "size_ratio": round(int8["file_bytes"] / fp32["file_bytes"], 4),
        "fp32_accuracy": fp32["test_accuracy"],
        "int8_accuracy": int8["test_accuracy"],
        "accuracy_drop_points": round(100 * (fp32["test_accuracy"] - int8["test_accuracy"]), 3),
        "latency_speedup_batch1": round(fp32["latency_ms_batch1"] / int8["latency_ms_batch1"], 3),
    }
    figures["pass"] = figures["size_ratio"] <= 0.3 and figures["accuracy_drop_points"] <= 0.5
    return figures


def lm(run_dir: Path) -> dict:
    recipe = run_recipe(run_dir, "recipes/smollm2-shakespeare.yaml")
    metrics = run_lm(recipe, run_dir, resume=True)
    models = metrics["models"]
    s = setup(recipe)
    student = load_causal_lm(run_dir / "student")[0]
    from distill.export.quantize import load_int8

    int8 = load_int8(run_dir / "exports" / "int8")
    block = torch.from_numpy(s.heldout.input_ids[:1]).long()
    latency = {"fp32": batch1_latency_ms(student, block), "int8": batch1_latency_ms(int8, block)}
    gguf = export_run(run_dir, "gguf-q8_0", force=True)
    with tempfile.TemporaryDirectory() as cache:
        q8 = load_causal_lm(Path(gguf["path"]) / "model.gguf", cache_dir=Path(cache))[0]
        q8_perplexity = lm_perplexity(q8, s.heldout, vocab_size=s.vocab_size)
    q8_llama_cpp = llama_cpp_figures(Path(gguf["path"]) / "model.gguf", student, s.heldout.input_ids[:8])
    if q8_llama_cpp:
        latency["gguf_q8_0_llama_cpp"] = q8_llama_cpp.pop("batch1_latency_ms")
    fp32_ppl, int8_ppl = models["student"]["perplexity"], models["student_int8"]["perplexity"]
    figures = {
        "fp32_bytes": models["student"]["file_bytes"],
        "int8_bytes": models["student_int8"]["file_bytes"],
        "gguf_q8_0_bytes": gguf["file_bytes"],
        "perplexity": {"fp32": round(fp32_ppl, 3), "int8": round(int8_ppl, 3), "gguf_q8_0": round(q8_perplexity, 3)},
        "perplexity_increase": {
            "int8": round(int8_ppl / fp32_ppl - 1, 4),
            "gguf_q8_0": round(q8_perplexity / fp32_ppl - 1, 4),
        },
        "batch1_latency_ms_1thread": {k: round(v, 1) for k, v in latency.items()},
        "int8_speedup_batch1": round(latency["fp32"] / latency["int8"], 3),
        "int8_smoothquant_alpha": smoothquant_alpha(run_dir / "exports" / "int8"),
        # None (JSON null) when llama.cpp could not time the file: not measured, and so not a pass.
        "gguf_q8_0_speedup_batch1": round(latency["fp32"] / latency["gguf_q8_0_llama_cpp"], 3)
        if q8_llama_cpp
        else None,
        "gguf_q8_0_in_llama_cpp": q8_llama_cpp or NOT_MEASURED,
        "gguf_q8_0_smaller_than_teacher": round(models["teacher"]["file_bytes"] / gguf["file_bytes"], 2),
        "chain": chain(models),
    }
    speedups = {"int8": figures["int8_speedup_batch1"], "gguf_q8_0": figures["gguf_q8_0_speedup_batch1"]}
    figures["pass"] = max(figures["perplexity_increase"].values()) <= 0.02 and all(
        v is not None and v >= 1.3 for v in speedups.values()
    )
    for name, value in speedups.items():
        shown = f"{value:.2f}× faster" if value is not None else "not measured (llama-cpp-python not installed)"
        verdict = "PASS" if value is not None and value >= 1.3 else "FAIL"
        print(f"LM {name} batch-1 speed-up over fp32: {shown} (bar ≥ 1.3×): {verdict}", flush=True)
    return figures


def smoothquant_alpha(int8_dir: Path) -> float | None:
    """The SmoothQuant alpha the int8 export chose (its int8.json records it); None when it recorded none."""
    meta = int8_dir / "int8.json"
    return json.loads(meta.read_text()).get("smoothquant_alpha") if meta.exists() else None


def llama_cpp_figures(path: Path, student, blocks) -> dict | None:
    """The q8_0 file in llama.cpp itself: batch-1 latency (1 thread, same block as the others) and top-1 agreement
    with the fp32 student on held-out blocks; None without llama-cpp-python."""
    from distill.testing import llama_cpp

    if not llama_cpp.available():
        return None
    model = llama_cpp.load(path, threads=1)
    agree = total = 0
    for ids in blocks.tolist():
        got = llama_cpp.logits(model, ids)
        with torch.inference_mode():
            expected = student(input_ids=torch.tensor([ids])).logits[0].numpy()
        vocab = min(got.shape[1], expected.shape[1])
        agree += int((got[:, :vocab].argmax(-1) == expected[:, :vocab].argmax(-1)).sum())
        total += len(ids)
    return {
        "batch1_latency_ms": round(1000 * llama_cpp.forward_seconds(model, blocks[0].tolist()), 1),
        "top1_agreement_with_fp32": round(agree / total, 4),
    }


def chain(models: dict) -> list[dict]:
    """Teacher → distilled student → int8 student: size, speed and quality relative to the teacher."""
    t = models["teacher"]
    return [
        {
            "model": name,
            "bytes": models[name]["file_bytes"],
            "smaller_than_teacher": round(t["file_bytes"] / models[name]["file_bytes"], 2),
            "faster_than_teacher": round(models[name]["tokens_per_s"] / t["tokens_per_s"], 2),
            "perplexity": round(models[name]["perplexity"], 3),
            "agreement_with_teacher": models[name]["agreement_with_teacher"],
        }
        for name in ("teacher", "student", "student_int8")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-run", type=Path, default=Path("runs/mnist"))
    parser.add_argument("--lm-run", type=Path, default=Path("runs/bench/lm_quality_a05"))
    parser.add_argument("--skip-lm", action="store_true")
    args = parser.parse_args()
    results = {"bench": "quantize", "mnist": mnist(args.mnist_run)}
    print("MNIST:", json.dumps(results["mnist"]))
    if not args.skip_lm:
        results["lm"] = lm(args.lm_run)
        for row in results["lm"]["chain"]:
            print(row)
        print("LM:", json.dumps({k: v for k, v in results["lm"].items() if k != "chain"}))
    else:
        results["not_run"] = ["lm"]  # --skip-lm: the LM bars are not checked, and the JSON says so
    results["pass"] = all(part["pass"] for part in results.values() if isinstance(part, dict))
    print(json.dumps(results))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
