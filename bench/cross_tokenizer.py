"""Any teacher, any student (issue 21, deliverable 4): the adapted SmolLM2-135M teacher (49,152-token BPE) teaches a
small student with a tokenizer of its own — a byte-level BPE trained on the training text — with plain cross-entropy,
``distill.cross_tokenizer: uld`` and ``align``: same init, same steps, the same teacher cache for both methods.
Quality in bits per character on held-out text, the one unit fair across tokenizers: every model reads the same
characters with its own tokenizer (eos, then the chunk) and is scored on all of them.

Protocol:
1. Shakespeare (``distill fetch shakespeare``): the last 4 % of each play is held out; the rest is the training text.
2. Teacher: SmolLM2-135M adapted on ``--adapt-blocks`` blocks of the training text (next-token cross-entropy, one
   epoch, AdamW 1e-4: ``teacher.train``), once (kept under ``--out``).
3. Student tokenizer: byte-level BPE of ``--student-vocab`` tokens trained on the training text only; the student a
   Llama of ``--layers`` blocks of width 256 (tied embeddings), one random init shared by the three runs.
4. The teacher cache over the student's ``--blocks`` training blocks (the teacher's top ``--k`` per paired position,
   its carried-over top ``--k`` and the span log-probabilities), built once and timed; both methods read it.
5. Three students, ``--epochs`` over those blocks, batch 8, AdamW 3e-3 with 10 warm-up steps: cross-entropy alone,
   ``uld`` and ``align`` (α 0.5: half next-token cross-entropy, half the cross-tokenizer term, T 1).
6. Bits per character on ``--chunks`` held-out chunks of 400 characters spread over the held-out text.

Bar: the best cross-tokenizer student has lower bits per character than the cross-entropy student. Also reported:
median seconds per training step, the peak resident memory each stage adds to the process, the cache's build time
and bytes per student token. Cuts (≤ 20 min on 2 shared cores, where the teacher's forward over 8 blocks takes
~10 s): the teacher adapted on 32 blocks (4 steps, not the whole text), 128 training blocks of 128 student tokens
for 4 epochs (64 steps), a 4-block student of 4.3 M parameters, 32 held-out chunks (12,800 characters), no
validation split. Ends with one JSON line; exits 1 when the bar is missed.

    python bench/cross_tokenizer.py [--out runs/bench/cross_tokenizer] [--blocks 128] [--epochs 4] [--k 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from accelerate import Accelerator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill.data.fetch import fetch_shakespeare
from distill.data.token_blocks import read_text_files
from distill.evaluate import bits_per_char
from distill.models.causal_lm import save_causal_lm
from distill.tasks import load_recipe
from distill.tasks.causal_lm import LMBatches, adapt_teacher, setup
from distill.teachers.cross_tokenizer import CrossTokenizerSignal
from distill.teachers.lm_choice import open_cache
from distill.train import train_loop

EOS = "<|endoftext|>"
CHUNK_CHARS = 400


def split_text(out: Path) -> list[str]:
    """The training text as files under ``out/train`` (one per play); returns the held-out tails."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    heldout = []
    for number, text in enumerate(read_text_files(fetch_shakespeare())):
        cut = int(len(text) * 0.96)
        (out / "train" / f"{number:03d}.txt").write_text(text[:cut])
        heldout.append(text[cut:])
    return heldout


def heldout_chunks(tails: list[str], count: int) -> list[str]:
    """``count`` chunks of CHUNK_CHARS characters spread evenly over the held-out text."""
    text = "\n".join(tails)
    starts = np.linspace(0, len(text) - CHUNK_CHARS, count).astype(int)
    return [text[s : s + CHUNK_CHARS] for s in starts]


def student_tokenizer(out: Path, vocab: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(read_text_files(out / "train"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)


def student_folder(out: Path, tokenizer, layers: int) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return save_causal_lm(LlamaForCausalLM(config), tokenizer, out / "student_init")


def write_recipe(path: Path, raw: dict):
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


@torch.inference_mode()
class PeakMemory:
    """The peak resident memory of the process while the block runs, above what it held when it began."""

    def __enter__(self):
        self.process, self.base, self.peak, self.running = psutil.Process(), 0, 0, True
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *_):
        self.running = False
        self.thread.join()
        self.added_mb = round((self.peak - self.base) / 2**20, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cross_tokenizer"))
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--adapt-blocks", type=int, default=32)
    parser.add_argument("--student-vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=32)
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out.resolve()
    torch.set_num_threads(2)
    chunks = heldout_chunks(split_text(out), args.chunks)

    train_text = {
        "source": "text",
        "path": str(out / "train"),
        "block_size": 128,
        "heldout_fraction": 0.01,
        "validation_fraction": 0,
    }
    adapt = write_recipe(
        out / "adapt.yaml",
        {
            "task": "causal_lm",
            "name": "adapt",
            "data": {**train_text, "limit_train_blocks": args.adapt_blocks},
            "teacher": {
                "path": "smollm2",
                "train": {
                    "epochs": 1,
                    "batch_size": 8,
                    "optimizer": "adamw",
                    "lr": 1e-4,
                    "warmup_steps": 2,
                    "log_every": 2,
                    "checkpoint_every": 1000,
                },
            },
            "student": {"from_teacher": {"keep": 1}},
            "baseline": False,
        },
    )
    accelerator = Accelerator(cpu=True)
    base = setup(adapt)
    base_bpc = bits_per_char(base.teacher, base.tokenizer, chunks)
    adapted = adapt_teacher(base, adapt, out / "adapt", accelerator, resume=True, on_step=None)
    teacher_bpc = bits_per_char(adapted.teacher, adapted.tokenizer, chunks)
    del base, adapted
    minutes_teacher = (time.perf_counter() - started) / 60
    print(f"teacher: {base_bpc:.3f} → {teacher_bpc:.3f} bits/char after adapting ({minutes_teacher:.1f} min so far)")

    tokenizer = student_tokenizer(out, args.student_vocab)
    folder = student_folder(out, tokenizer, args.layers)
    train = {
        "epochs": args.epochs,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 3e-3,
        "warmup_steps": 10,
        "max_grad_norm": 1.0,
        "log_every": 8,
        "checkpoint_every": 10_000,
    }
    recipe = write_recipe(
        out / "cross.yaml",
        {
            "task": "causal_lm",
            "name": "cross",
            "data": {**train_text, "limit_train_blocks": args.blocks},
            "teacher": {"path": str(out / "adapt" / "teacher")},
            "student": {"path": str(folder), "train": train},
            "distill": {
                "signal": "cache",
                "cross_tokenizer": "align",
                "cache_k": args.k,
                "alpha": 0.5,
                "temperature": 1.0,
                "cache_dir": str(out / "cache"),
            },
            "baseline": False,
        },
    )
    s = setup(recipe)
    pairs = sum(len(a.pair_s) for a in s.teacher_view.alignments)
    exact = sum(int(a.exact.sum()) for a in s.teacher_view.alignments)
    positions = len(s.train) * (s.train.input_ids.shape[1] - 1)
    tick = time.perf_counter()
    with PeakMemory() as cache_memory:
        cache = open_cache(recipe, out, s, "cpu")
    cache_seconds = time.perf_counter() - tick
    print(
        f"student tokenizer: {len(tokenizer)} tokens; {len(s.train)} blocks; {pairs / positions:.1%} of positions "
        f"paired, {exact / positions:.1%} coinciding; cache {cache_seconds:.0f} s, {cache.bytes_per_token} B/token"
    )

    rows = {}
    for name in ("ce", "uld", "align"):
        if name == "ce":
            batches = LMBatches(s.train, s.vocab_size, recipe.distill.chunk_size)
        else:
            signal = CrossTokenizerSignal(name, s.teacher_view, recipe.distill.temperature, cache=cache)
            batches = LMBatches(s.train, s.vocab_size, recipe.distill.chunk_size, distill=recipe.distill, signal=signal)
        model = copy.deepcopy(s.student_init)
        torch.manual_seed(recipe.seed + 1)
        stamps = [time.perf_counter()]
        with PeakMemory() as memory:
            model = train_loop(
                name,
                model,
                recipe.student.train,
                batches,
                out / "runs",
                accelerator,
                seed=recipe.seed,
                on_step=lambda step, stamps=stamps: stamps.append(time.perf_counter()),
            )
        steps = np.diff(stamps)
        rows[name] = {
            "bits_per_char": round(bits_per_char(model, tokenizer, chunks), 4),
            "steps": len(steps),
            "s_per_step": round(statistics.median(steps), 3),
            "added_memory_mb": memory.added_mb,
        }
        print(
            f"{name:6s} {rows[name]['bits_per_char']:.4f} bits/char  {rows[name]['s_per_step']:.3f} s/step  "
            f"+{memory.added_mb:.0f} MB"
        )

    ce = rows["ce"]["bits_per_char"]
    best = min(("uld", "align"), key=lambda m: rows[m]["bits_per_char"])
    print(f"{'':6s} {'bits/char':>9s} {'vs CE':>7s} {'s/step':>7s} {'vs CE':>7s}")
    for name, row in rows.items():
        print(
            f"{name:6s} {row['bits_per_char']:9.4f} {row['bits_per_char'] / ce:7.3f} {row['s_per_step']:7.3f} "
            f"{row['s_per_step'] / rows['ce']['s_per_step']:7.2f}"
        )
    minutes = round((time.perf_counter() - started) / 60, 1)
    bars = {"cross_tokenizer_beats_ce": rows[best]["bits_per_char"] < ce, "budget_20_min": minutes <= 20}
    for bar, ok in bars.items():
        print(f"{bar:26s} {'pass' if ok else 'FAIL'}")
    result = {
        "bench": "cross_tokenizer",
        "minutes": minutes,
        "teacher": {
            "bits_per_char_before": round(base_bpc, 4),
            "bits_per_char": round(teacher_bpc, 4),
            "vocab": s.teacher_view.teacher_vocab,
        },
        "student_vocab": len(tokenizer),
        "student_parameters": sum(p.numel() for p in s.student_init.parameters()),
        "blocks": len(s.train),
        "paired": round(pairs / positions, 4),
        "coinciding": round(exact / positions, 4),
        "cache": {
            "seconds": round(cache_seconds, 1),
            "bytes_per_token": cache.bytes_per_token,
            "k": args.k,
            "added_memory_mb": cache_memory.added_mb,
        },
        "students": rows,
        "best": best,
        "best_over_ce": round(rows[best]["bits_per_char"] / ce, 4),
        "bars": bars,
        "pass": all(bars.values()),
    }
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
