"""Peak memory and time of a token-level distillation loss from hidden states: chunked vs plain.

Loss forward + backward from random hidden states and LM heads (4096 tokens; vocab 49152 / hidden 576
and vocab 151936 / hidden 896), forward KL, all positions distilled. "plain" materialises the [N, V]
logits (`full_logits_distillation_loss`); "chunked" is `chunked_distillation_loss`; Liger-Kernel's
`LigerFusedLinearJSDLoss` (beta=0) runs too if it is installed. Each method runs in a fresh process
so that peak memory is its own: peak RSS on CPU (float32), `torch.cuda.max_memory_allocated` on CUDA
(bfloat16), also reported above what the inputs take. Time: median of 3 runs after 1 warm-up.
Bar: chunked memory above inputs ≤ 1/4 of plain's, chunked time ≤ 1.2× plain, values equal to 1e-4
relative (--quick: no memory bar, the sizes are too small for it). Ends with one JSON line; exits 1
when the bar is missed.

    python bench/lm_memory.py [--quick] [--device cpu|cuda] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from distill.losses.chunked import DEFAULT_CHUNK_SIZE, chunked_distillation_loss, full_logits_distillation_loss

CONFIGS = {"smol": (49152, 576), "qwen": (151936, 896)}  # name: (vocab, hidden), as SmolLM-135M / Qwen2-0.5B
GIB = 2**30


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(method: str, config: str, tokens: int, device: str, chunk_size: int) -> dict:
    """Runs in its own process: build inputs, then time loss + backward and measure the peak."""
    vocab, hidden = CONFIGS[config]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(shape, device=device, dtype=dtype) * scale).requires_grad_(grad)

    # Head scale chosen so logits have a std of about 2, like a trained LM's.
    h_s, w_s = rand(4, tokens // 4, hidden, grad=True), rand(vocab, hidden, scale=2 / hidden**0.5, grad=True)
    h_t, w_t = rand(4, tokens // 4, hidden), rand(vocab, hidden, scale=2 / hidden**0.5)

    if method == "plain":
        loss_fn = lambda: full_logits_distillation_loss(h_s, w_s, h_t, w_t)  # noqa: E731
    elif method == "chunked":
        loss_fn = lambda: chunked_distillation_loss(h_s, w_s, h_t, w_t, chunk_size=chunk_size)  # noqa: E731
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=device == "cuda")
        labels = torch.zeros(tokens, dtype=torch.long, device=device)
        flat_s, flat_t = h_s.view(tokens, hidden), h_t.view(tokens, hidden)
        loss_fn = lambda: liger(flat_s, w_s, flat_t, w_t, labels, None, None)  # noqa: E731

    def step() -> float:
        h_s.grad = w_s.grad = None
        loss = loss_fn()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    value = step()  # warm-up; its memory counts in the peak too
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "value": value,
        "seconds": statistics.median(times),
        "peak_gib": peak / GIB,
        "above_inputs_gib": (peak - base) / GIB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens, small config only, no memory bar")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--chunk-size", type=int, default=None, help=f"default {DEFAULT_CHUNK_SIZE} (128 with --quick)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (512 if args.quick else 4096)
    chunk_size = args.chunk_size or (128 if args.quick else DEFAULT_CHUNK_SIZE)
    if args.one:
        print(json.dumps(one(*args.one, tokens, args.device, chunk_size)))
        return 0

    methods = ["plain", "chunked"]
    try:
        import liger_kernel  # noqa: F401

        methods.append("liger")
    except ImportError:
        print("note: liger_kernel is not installed, so LigerFusedLinearJSDLoss is skipped")
    runs: dict[str, dict[str, dict]] = {}
    for config in ["smol"] if args.quick else list(CONFIGS):
        for method in methods:
            cmd = [sys.executable, __file__, "--one", method, config, "--tokens", str(tokens)]
            cmd += ["--device", args.device, "--chunk-size", str(chunk_size)]
            child = subprocess.run(cmd, capture_output=True, text=True)
            if child.returncode == 0:
                runs.setdefault(config, {})[method] = json.loads(child.stdout.strip().splitlines()[-1])
            else:  # e.g. killed for memory: -9
                print(f"{method} {config} failed (exit {child.returncode}): {child.stderr.strip()[-1000:]}")
                runs.setdefault(config, {})[method] = {"error": child.returncode}

    print(f"\n{tokens} tokens, {args.device}, forward KL, chunk_size {chunk_size}")
    print(f"{'config':<6} {'method':<8} {'loss':>10} {'time s':>8} {'peak GiB':>9} {'above inputs GiB':>17}")
    for config, by_method in runs.items():
        for method, r in by_method.items():
            if "error" in r:
                print(f"{config:<6} {method:<8} {'failed':>10}")
            else:
                print(
                    f"{config:<6} {method:<8} {r['value']:>10.6f} {r['seconds']:>8.2f} "
                    f"{r['peak_gib']:>9.3f} {r['above_inputs_gib']:>17.3f}"
                )
    ok, ratios = True, {}
    for config, by_method in runs.items():
        plain, chunked = by_method["plain"], by_method["chunked"]
        if "error" in plain or "error" in chunked:
            ok = False
            continue
        r = ratios[config] = {
            "memory": chunked["above_inputs_gib"] / plain["above_inputs_gib"],
            "time": chunked["seconds"] / plain["seconds"],
            "value_rel_diff": abs(chunked["value"] - plain["value"]) / abs(plain["value"]),
        }
        # At --quick sizes the [V, H] head gradient, which both keep, outweighs the logits: no memory bar. The JSON
        # says so (memory_bar null, not true): a bar that was not checked is not reported as passed.
        r["memory_bar"] = None if args.quick else r["memory"] <= 0.25
        r["pass"] = (args.quick or r["memory_bar"]) and r["time"] <= 1.2 and r["value_rel_diff"] <= 1e-4
        ok &= r["pass"]
        vocab, hidden = CONFIGS[config]
        print(
            f"{config} (V={vocab}, H={hidden}) chunked/plain: memory above inputs {r['memory']:.3f} "
            f"({'not checked' if args.quick else 'bar 0.25'}), time {r['time']:.2f}x (bar 1.2), "
            f"value rel diff {r['value_rel_diff']:.1e} (bar 1e-4): {'PASS' if r['pass'] else 'FAIL'}"
        )
    summary = {"tokens": tokens, "device": args.device, "chunk_size": chunk_size, "pass": ok}
    if args.quick:
        summary["quick"] = "a check of the script: the memory bar is not applied, so pass covers time and value only"
    print(json.dumps({**summary, "runs": runs, "ratios": ratios}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
