"""What training through a GGUF grid costs (issue 35, quantization-aware distillation): rounding a student's weights
to its grid on every forward, and a whole QAD step against a float step.

One run, side by side, on SmolLM2-135M's shape cut to ``--layers`` blocks (22: the ¾ student of
bench/lm_frontier.py; random weights, only the shapes set the cost):
- `project`: ``gguf_grid.project`` of every weight QAD rounds (block linears to ``--type``, the tied embedding to
  q8_0, once each) — ours, against gguf-py's own numpy ``dequantize(quantize(w))`` (the reference it equals bit for
  bit, checked here on the first matrix) and against ours on one chunk the size of the tensor (in place, but
  streaming each step through memory: what the chunking saves);
- `step`: forward, next-token cross-entropy, backward and AdamW over one batch (8 × 128 tokens) of the float student
  and of the same student under ``gguf_grid.attach`` (what the ``quantized`` stage trains), in the precision a run
  picks here (``mixed_precision: auto``: bf16 autocast on a CPU with native bf16 matmul), interleaved. The ratio is
  what the grid adds to a step; the stage's own step also runs its target's forward (the teacher, live) and a dense
  KL, which this does not time.
Median seconds over ``--repeats`` after a warm-up. No bar is named by the issue: it reports, and exits 1 only when a
figure could not be measured. Ends with one JSON line.

    python bench/qad_step.py [--layers 22] [--type q4_0] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM

from distill.models import gguf_grid
from distill.train import resolve_precision

SMOLLM2 = {  # SmolLM2-135M's shapes (its config.json)
    "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
}  # fmt: skip


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_weights(model, qtype: str) -> list[tuple[torch.Tensor, str]]:
    params = dict(model.named_parameters())
    return [(params[name].detach(), gtype) for name, gtype in gguf_grid.grid_types(model, qtype).items()]


def project_all(weights, chunk_blocks: int | None = None) -> None:
    saved = gguf_grid.CHUNK_BLOCKS
    if chunk_blocks is not None:
        gguf_grid.CHUNK_BLOCKS = chunk_blocks
    try:
        for weight, gtype in weights:
            gguf_grid.project(weight, gtype)
    finally:
        gguf_grid.CHUNK_BLOCKS = saved


def gguf_py_all(weights) -> None:
    for weight, gtype in weights:
        kind = gguf.GGMLQuantizationType[gtype.upper()]
        dequantize(quantize(weight.numpy(), kind), kind)


def step_fn(model, batch: torch.Tensor, autocast: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--type", default="q4_0", choices=gguf_grid.QTYPES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2, num_hidden_layers=args.layers)
    student = LlamaForCausalLM(config).float()
    weights = grid_weights(student, args.type)
    values = sum(w.numel() for w, _ in weights)

    first, first_type = weights[1]  # a block linear (the first is the embedding)
    kind = gguf.GGMLQuantizationType[first_type.upper()]
    equal = np.array_equal(
        gguf_grid.project(first, first_type).numpy().view(np.uint32),
        dequantize(quantize(first.numpy(), kind), kind).astype(np.float32).view(np.uint32),
    )
    largest = max(w.numel() for w, _ in weights) // gguf_grid.BLOCK
    project_s = {
        "ours": median_seconds(lambda: project_all(weights), args.repeats),
        "ours_one_chunk": median_seconds(lambda: project_all(weights, largest), args.repeats),
        "gguf_py": median_seconds(lambda: gguf_py_all(weights), max(1, args.repeats // 2)),
    }

    precision, why = resolve_precision("auto", gpu=False)
    autocast = precision == "bf16"
    batch = torch.randint(0, config.vocab_size, (8, 128))
    qad = gguf_grid.attach(copy.deepcopy(student), args.type)  # the same weights, as the originals it rounds
    steps = {"float": [], "qad": []}
    runs = {"float": step_fn(student, batch, autocast), "qad": step_fn(qad, batch, autocast)}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved: a load that comes and goes hits both
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            steps[name].append(time.perf_counter() - start)
    step_s = {name: statistics.median(times) for name, times in steps.items()}

    print(f"{args.layers} blocks, {values / 1e6:.1f} M values on the grid ({args.type}, embedding q8_0), "
          f"{args.threads} threads; gguf-py equals ours bit for bit on {tuple(first.shape)}: {equal}")  # fmt: skip
    print(f"project per forward: ours {project_s['ours']:.3f} s, one chunk per tensor "
          f"{project_s['ours_one_chunk']:.3f} s ({project_s['ours_one_chunk'] / project_s['ours']:.2f}x), gguf-py "
          f"{project_s['gguf_py']:.3f} s ({project_s['gguf_py'] / project_s['ours']:.1f}x)")  # fmt: skip
    print(f"step ({precision}: {why}): float {step_s['float']:.3f} s, QAD {step_s['qad']:.3f} s "
          f"({step_s['qad'] / step_s['float']:.2f}x)")  # fmt: skip
    figures = {
        "bench": "qad_step", "layers": args.layers, "type": args.type, "threads": args.threads,
        "grid_values": values, "bit_exact": bool(equal), "precision": precision,
        "project_seconds": project_s, "step_seconds": step_s, "qad_over_float_step": step_s["qad"] / step_s["float"],
    }  # fmt: skip
    print(json.dumps(figures))
    return 0 if equal and all(np.isfinite(list(step_s.values()))) else 1


if __name__ == "__main__":
    sys.exit(main())
