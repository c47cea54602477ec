"""A small language model as a file, at a quality the user chooses (issue 35, deliverable 5): Shakespeare, SmolLM2-135M
adapted to it, a ¾-size student pruned by depth importance and distilled, then trained through GGUF q4_0's rounding
(QAD) beside the same student rounded after training; and `distill frontier --keep 0.90` on what time is left.

Protocol, all through the library (recipes/smollm2-shakespeare.yaml, cut as below):
1. the teacher adapted once (`distill cache`: `teacher.train`, kept only where it beats itself as it came) and its
   cache built; every later run names the adapted folder as its teacher and reads one shared cache;
2. the ¾ run: `student.prune: {params: 0.75, axes: [depth]}`, distilled (sampled cache, α 0.5), then
   `student.quantize: {type: q4_0}` (the stage `quantized`: `--qad-steps` steps at lr 1e-4, a fifth of the
   student's, learning from the teacher live and dense: the default `target`);
   the report's rows give the float student, the QAD student and the same student rounded to nearest into q4_0
   (what llama.cpp's quantize does for q4_0 without an importance matrix), same file size; its f16 perplexity is
   the float student's weights rounded to float16 (as a GGUF f16 holds them);
3. `distill frontier` with `--keep 0.90`, shares 0.75 / 0.5 / 0.35 / 0.25, types f16 / q8_0 / q4_0, on the budget
   that is left.

Bars (issue 35):
- the ¾ student: held-out perplexity ≤ 1.10× the adapted teacher's, ≥ 1.25× its tokens/s (float forward, 2 threads);
- its QAD q4_0 GGUF: perplexity within 3 % of its own f16, and closes ≥ 50 % of the gap rounding after training opens;
- the file the frontier chooses at --keep 0.90: ≥ 4× smaller than the teacher's f16 GGUF (its ratio to the teacher's
  float32 weights is printed too);
- llama.cpp (opt-in, where llama-cpp-python is installed: `make llama-cpp`): the QAD q4_0 file, as `distill export`
  writes it, read by llama.cpp on the held-out blocks, its top-1 next token agreeing with our float32 forward of the
  same weights at ≥ 0.95 of the positions; tokens/s in llama.cpp (2 threads; prompt: a block in one batch, decode:
  greedy tokens one at a time) of the teacher's f16 GGUF, the q4_0 file and the frontier's chosen file, reported
  beside each other (no bar on them). "not measured" when it is not installed, or when llama.cpp crashed on our
  files with its weight repacking on and off (it runs in a child process; a crash with repacking on is retried once
  with it off, and the figures say which).
A figure that was not measured fails its bar. Cuts (≤ 60 min on 2 cores): block 128 tokens, `--blocks` training
blocks, `--epochs` for the students and `--teacher-epochs` for the teacher, 16 held-out blocks, training in the
recipe's precision (`auto`: bf16 on a CPU with native bf16), evaluation in float32. Ends with one JSON line; exits 1
on a miss.

    python bench/lm_frontier.py [--out runs/bench/lm_frontier] [--blocks 512] [--epochs 2] [--teacher-epochs 2]
                                [--qad-steps 256] [--budget-minutes 58] [--scale cpu|tiny|gpu]

`--scale tiny` runs every step on a handful of blocks (minutes, for trying the bench); `--scale gpu` trains on every
block of the corpus for 20 epochs (≈ 400× the cpu scale's tokens: Shakespeare holds no more) and adds issue 19's two
open bars, measured on a ½-size student (depth importance) trained with cross-entropy and with distillation from the
same init: held-out perplexity ≤ 1.10× the adapted teacher's, and distillation reaching cross-entropy's final
validation perplexity in ≤ 0.5× its steps (also at `--scale tiny`, to try it; not at cpu, whose 60 minutes
`bench/lm_students.py` spent on them).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from lm_students import curve, steps_to_reach

from distill.evaluate import lm_validation
from distill.frontier import search
from distill.models.causal_lm import load_causal_lm
from distill.models.gguf_grid import rounded
from distill.tasks import load_recipe, run_recipe
from distill.tasks.causal_lm import build_cache, setup

RECIPE = Path("recipes/smollm2-shakespeare.yaml")
SCALES = {  # blocks, epochs, teacher epochs, QAD steps, budget minutes
    "tiny": {"blocks": 24, "epochs": 1, "teacher_epochs": 1, "qad_steps": 2, "budget_minutes": 20},
    # stop 41 (BENCHMARKS.md): 40.8 min from the adapted, cached teacher; adapting and caching it was not timed quiet
    "cpu": {"blocks": 512, "epochs": 2, "teacher_epochs": 2, "qad_steps": 256, "budget_minutes": 58},
    # every block of the corpus (~10,000 of 128 tokens: Shakespeare holds no more) × 20 epochs ≈ 400× the cpu tokens
    "gpu": {"blocks": 1_000_000, "epochs": 20, "teacher_epochs": 2, "qad_steps": 2048, "budget_minutes": 600},
}
BARS = {
    "ppl_over_teacher": 1.10,
    "speedup": 1.25,
    "qad_over_f16": 1.03,
    "gap_closed": 0.5,
    "smaller": 4.0,
    "llama_agreement": 0.95,
}


def half_size(out: Path, adapted: list[str]) -> dict:
    """Issue 19's open bars on a ½-size student (depth importance): cross-entropy and distillation from one init,
    validated every few steps; the distilled one's held-out perplexity over the teacher's, and the share of the
    cross-entropy student's steps distillation needs to reach its final validation perplexity."""
    recipe = load_recipe(RECIPE, [*adapted, "baseline=true", "student.prune={params: 0.5, axes: [depth]}",
                                  "student.train.eval_every=4", "name=half"])  # fmt: skip
    metrics = run_recipe(recipe, out / "half", resume=(out / "half").exists())
    ce, kd = curve(out / "half", "baseline"), curve(out / "half", "student")
    reach = steps_to_reach(kd, ce[-1][1]) if ce and kd else None
    models = metrics["models"]
    return {
        "perplexity": {name: models[name]["perplexity"] for name in ("teacher", "baseline", "student")},
        "over_teacher": models["student"]["perplexity"] / models["teacher"]["perplexity"],
        "kd_steps_to_ce_final": reach,
        "kd_over_ce_steps": None if reach is None else reach / ce[-1][0],
        "curve": {"ce": ce, "kd": kd},
    }


LLAMA_THREADS = 2  # the machine's cores, as our own speed figures use
DECODE_TOKENS = 32  # greedy tokens generated one at a time after each block's first half, for the decode speed


def llama_cpp(out: Path, heldout, chosen_file: Path | None) -> dict | str:
    """llama.cpp (llama-cpp-python) on the files we write: the ¾ student's QAD q4_0 GGUF (exported from the trained
    grid) read on the held-out blocks, its top-1 next token at every position against our own float32 forward of the
    same weights; and the speed of the adapted teacher's f16 GGUF, the q4_0 file and the frontier's chosen file
    (prompt: a whole block in one batch; decode: ``DECODE_TOKENS`` greedy tokens one at a time), ``LLAMA_THREADS``
    threads. llama.cpp runs in a child process, so a crash is a figure ("not measured: …"), not the bench's end; when
    it crashes with its weight repacking on (extra buffer types: seen on a CPU with AMX), it is run once more with
    them off, and the figures say so. A string ("not measured …") where llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "not measured (llama-cpp-python is not installed: pip install llama-cpp-python, it builds llama.cpp)"
    import torch

    from distill.export.gguf import export_gguf

    folder = out / "llama_cpp"
    folder.mkdir(exist_ok=True)
    qad, tokenizer = load_causal_lm(out / "three-quarters" / "quantized")
    files = {"three_quarters_q4_0": export_gguf(qad, tokenizer, folder / "three-quarters-qad-q4_0.gguf", "q4_0")}
    teacher, teacher_tokenizer = load_causal_lm(out / "adapt" / "teacher")
    files["teacher_f16"] = export_gguf(teacher, teacher_tokenizer, folder / "teacher-f16.gguf", "f16")
    del teacher
    if chosen_file is not None:
        files["chosen"] = chosen_file
    rows = zip(heldout.input_ids, heldout.attention_mask, strict=True)
    blocks = [row[mask.astype(bool)].tolist() for row, mask in rows]
    with torch.no_grad():
        ours = [qad(torch.tensor([block])).logits[0].argmax(-1).numpy() for block in blocks]
    figures = None
    for repacking in (True, False):
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                runs = {name: pool.submit(_llama_run, path, blocks, name == "three_quarters_q4_0", repacking)
                        for name, path in files.items()}  # fmt: skip
                figures = {name: run.result() for name, run in runs.items()}
            break
        except BrokenProcessPool:
            print(f"llama.cpp crashed (weight repacking {'on' if repacking else 'off'})", flush=True)
    if figures is None:
        return "not measured (llama.cpp crashed on our files, with its weight repacking on and off)"
    theirs = figures["three_quarters_q4_0"].pop("top1")
    same = sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True))
    return {"agreement_with_ours": same / sum(map(len, blocks)), "tokens": sum(map(len, blocks)),
            "weight_repacking": repacking, **figures}  # fmt: skip


def _llama_run(path: Path, blocks: list[list[int]], logits: bool, repacking: bool) -> dict:
    """One GGUF file in llama.cpp: prompt and decode tokens/s over ``blocks`` (see ``llama_cpp``), and with
    ``logits`` the top-1 next token at every position of each block."""
    import llama_cpp
    import numpy as np

    longest = max(map(len, blocks))
    defaults = llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = repacking
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params  # the one switch Llama() does not take
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest + DECODE_TOKENS, n_batch=longest, logits_all=logits,
                          n_threads=LLAMA_THREADS, n_threads_batch=LLAMA_THREADS, verbose=False)  # fmt: skip
    top1, prompt_s, decode_s = [], 0.0, 0.0
    for block in blocks:
        llm.reset()
        started = time.perf_counter()
        llm.eval(block)
        prompt_s += time.perf_counter() - started
        if logits:
            top1.append(np.asarray(llm.scores[: len(block)]).argmax(-1))
        llm.reset()  # decode: greedy tokens one at a time after the block's first half (the first one timed apart)
        tokens = llm.generate(block[: len(block) // 2], top_k=1)
        next(tokens)
        started = time.perf_counter()
        for _ in itertools.islice(tokens, DECODE_TOKENS):
            pass
        decode_s += time.perf_counter() - started
    figures = {
        "prompt_tokens_per_s": sum(map(len, blocks)) / prompt_s,
        "decode_tokens_per_s": DECODE_TOKENS * len(blocks) / decode_s,
        "file_bytes": Path(path).stat().st_size,
    }
    return figures | ({"top1": top1} if logits else {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lm_frontier"))
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    for key in SCALES["cpu"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args()
    settings = SCALES[args.scale] | {k: v for k, v in vars(args).items() if k in SCALES["cpu"] and v is not None}
    started = time.perf_counter()
    out = args.out.resolve()
    cut = [
        f"data.limit_train_blocks={settings['blocks']}",
        "data.limit_heldout_blocks=16",
        f"student.train.epochs={settings['epochs']}",
        f"distill.cache_dir={out / 'cache'}",
        "eval.generations=2",
    ]
    teacher_train = (
        f"teacher.train={{epochs: {settings['teacher_epochs']}, batch_size: 8, optimizer: adamw, lr: 1.0e-4}}"
    )
    build_cache(load_recipe(RECIPE, [*cut, teacher_train]), out / "adapt")
    teacher = out / "adapt" / "teacher"
    adapted = [*cut, f"teacher.path={teacher}", "teacher.train=null", "baseline=false"]
    print(f"teacher adapted and cached: {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    # 2. the ¾ student, distilled, then trained through q4_0's rounding, beside rounding after training
    qad_train = f"{{max_steps: {settings['qad_steps']}, batch_size: 8, optimizer: adamw, lr: 1.0e-4}}"
    qad = f"student.quantize={{type: q4_0, train: {qad_train}}}"
    recipe = load_recipe(RECIPE, [*adapted, "student.prune={params: 0.75, axes: [depth]}", qad, "name=three-quarters"])
    metrics = run_recipe(recipe, out / "three-quarters", resume=(out / "three-quarters").exists())
    models = metrics["models"]
    s = setup(recipe)
    student = load_causal_lm(out / "three-quarters" / "student")[0].eval()
    size = {"vocab_size": s.vocab_size, "batch_size": recipe.eval.batch_size}
    f16 = math.exp(lm_validation(rounded(student, "f16"), None, s.heldout, **size)["loss"])
    quarter = {
        "teacher_perplexity": models["teacher"]["perplexity"],
        "teacher_before": (metrics.get("teacher_adaptation") or {}).get("start_perplexity"),
        "perplexity": models["student"]["perplexity"],
        "f16_perplexity": f16,
        "qad_q4_0_perplexity": models["student_qad"]["perplexity"],
        "rtn_q4_0_perplexity": models["student_rtn"]["perplexity"],
        "q4_0_bytes": models["student_qad"]["file_bytes"],
        "tokens_per_s": models["student"]["tokens_per_s"],
        "teacher_tokens_per_s": models["teacher"]["tokens_per_s"],
        "agreement_with_teacher": {
            n: models[n]["agreement_with_teacher"] for n in ("student", "student_qad", "student_rtn")
        },
        "parameters": models["student"]["parameters"],
        "teacher_parameters": models["teacher"]["parameters"],
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    gap = quarter["rtn_q4_0_perplexity"] - f16
    quarter["gap_closed"] = (quarter["rtn_q4_0_perplexity"] - quarter["qad_q4_0_perplexity"]) / gap if gap > 0 else None
    print(json.dumps({"three_quarters": quarter}), flush=True)

    half = half_size(out, adapted) if args.scale != "cpu" else None

    # 3. the frontier on what is left of the budget
    left = settings["budget_minutes"] * 60 - (time.perf_counter() - started)
    frontier, chosen, chosen_export = None, None, None
    try:
        found = search(load_recipe(RECIPE, adapted), out / "frontier", keep=0.90, budget=left,
                       shares=(0.75, 0.5, 0.35, 0.25), types=("f16", "q8_0", "q4_0"))  # fmt: skip
        frontier = {
            "candidates": [vars(c) for c in found.candidates],
            "teacher": found.teacher,
            "stopped": found.stopped,
            "seconds": found.seconds,
        }
        chosen, chosen_export = found.chosen, found.export
    except Exception as exc:  # noqa: BLE001 — a search that could not run leaves its bar unmeasured, failed
        print(f"frontier: not measured ({exc})")
    smaller = f32_smaller = None
    if chosen is not None:
        smaller = frontier["teacher"]["f16_bytes"] / chosen.file_bytes
        f32_smaller = frontier["teacher"]["f32_bytes"] / chosen.file_bytes
    llama = llama_cpp(out, s.heldout, Path(chosen_export["path"]) / "model.gguf" if chosen_export else None)
    if isinstance(llama, dict):
        print(json.dumps({"llama_cpp": llama}), flush=True)

    ratio = quarter["perplexity"] / quarter["teacher_perplexity"]
    speedup = quarter["tokens_per_s"] / quarter["teacher_tokens_per_s"]
    qad_over_f16 = quarter["qad_q4_0_perplexity"] / f16
    bars = {
        "three_quarters_within_1.10x_teacher": ratio <= BARS["ppl_over_teacher"],
        "three_quarters_1.25x_tokens_per_s": speedup >= BARS["speedup"],
        "qad_q4_0_within_3pct_of_f16": qad_over_f16 <= BARS["qad_over_f16"],
        "qad_closes_half_the_rounding_gap": quarter["gap_closed"] is not None and quarter["gap_closed"] >= 0.5,
        "chosen_at_keep_0.90_4x_smaller_than_teacher_f16": smaller is not None and smaller >= BARS["smaller"],
        "llama_cpp_agreement_and_speed": llama
        if isinstance(llama, str)
        else (llama["agreement_with_ours"] >= BARS["llama_agreement"]),  # fmt: skip
    }
    if half is not None:
        bars["half_within_1.10x_teacher"] = half["over_teacher"] <= BARS["ppl_over_teacher"]
        bars["kd_reaches_ce_in_half_the_steps"] = (
            half["kd_over_ce_steps"] is not None and half["kd_over_ce_steps"] <= 0.5
        )
    minutes = round((time.perf_counter() - started) / 60, 1)
    print(f"¾ student: held-out perplexity {quarter['perplexity']:.2f} vs adapted teacher "
          f"{quarter['teacher_perplexity']:.2f} ({ratio:.3f}×), {speedup:.2f}× its tokens/s")  # fmt: skip
    print(f"q4_0: QAD {quarter['qad_q4_0_perplexity']:.2f}, rounded after training "
          f"{quarter['rtn_q4_0_perplexity']:.2f}, f16 {f16:.2f} (QAD / f16 {qad_over_f16:.4f}; gap closed "
          f"{quarter['gap_closed']})")  # fmt: skip
    if chosen is not None:
        print(f"frontier at keep 0.90: share {chosen.share:g} {chosen.type}, {chosen.file_bytes / 2**20:.1f} MiB: "
              f"{smaller:.2f}× smaller than the teacher's f16 GGUF, {f32_smaller:.2f}× than its float32 "
              "weights")  # fmt: skip
    else:
        print("frontier at keep 0.90: no candidate kept the quality (or it did not run)")
    if isinstance(llama, dict):
        speeds = ", ".join(f"{name} {f['prompt_tokens_per_s']:.0f} / {f['decode_tokens_per_s']:.1f}"
                           for name, f in llama.items() if isinstance(f, dict))  # fmt: skip
        print(f"llama.cpp: q4_0 file's top-1 agrees with our forward on {llama['agreement_with_ours']:.4f} of "
              f"{llama['tokens']} tokens; tokens/s prompt / decode, {LLAMA_THREADS} threads: {speeds}")  # fmt: skip
    for bar, met in bars.items():
        print(f"bar {bar}: {'pass' if met is True else 'FAIL' if met is False else met}")
    figures = {
        "bench": "lm_frontier",
        "scale": args.scale,
        "settings": settings,
        "minutes": minutes,
        "three_quarters": quarter,
        "half": half,
        "frontier": frontier,
        "chosen": None if chosen is None else vars(chosen),
        "llama_cpp": llama,
        "chosen_smaller_than_teacher_f16": smaller,
        "chosen_smaller_than_teacher_f32": f32_smaller,
        "bars": bars,
        "pass": all(met is True for met in bars.values()),
    }
    print(json.dumps(figures))
    return 0 if figures["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
