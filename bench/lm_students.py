"""Language-model students worth shipping (issue 19, deliverable 6): Shakespeare, an adapted SmolLM2-135M teacher,
students at ½ and ¼ of its transformer-block parameters built three ways, each trained with cross-entropy and with
distillation from the cache — same init, same steps — and their validation perplexity against steps.

Protocol, all through the library (recipes/smollm2-shakespeare.yaml, cut as below):
1. the teacher adapted first (`teacher.train`: next-token cross-entropy on the training blocks) and its cache built,
   once (`distill cache`, which trains no student); every student run then names the adapted folder as its teacher
   and reads that one cache;
2. for each size (½, ¼) and init — (a) `even`: evenly spaced layers (`from_teacher.keep`), (b) `depth`: importance
   depth (`prune.axes: [depth]`), (c) `width`: importance width (`prune.axes: [width]`) — one run trains the
   cross-entropy student (`baseline`) and the distilled one (`student`, sampled cache, α 0.5), same init, same
   steps, validated every `--eval-every` steps (the perplexity curves are exp of the logged validation loss,
   plotted in `OUT/curves.png`);
3. the ½ distilled student of the best init exported to GGUF q8_0 and its held-out perplexity measured.

Bars (issue 19):
- distillation reaches the cross-entropy student's final validation perplexity in ≤ 0.5× its steps (each size,
  each init);
- the best importance-pruned init reaches the evenly-spaced init's final distilled perplexity in ≤ 0.5× its steps
  (each size);
- the ½ distilled student: held-out perplexity ≤ 1.10× the adapted teacher's, ≥ 1.5× its tokens/s (2 threads),
  and its q8_0 GGUF within 1 % of its perplexity.
A figure that was not measured fails its bar. Cuts (≤ 60 min on 2 cores): block 128 tokens, `--blocks` training
blocks, `--epochs` for the students and `--teacher-epochs` for the teacher, 16 held-out blocks, training in
`--mixed-precision` (bf16 autocast; evaluation stays float32). Ends with one JSON line; exits 1 on a miss.

    python bench/lm_students.py [--out runs/bench/lm_students] [--blocks 256] [--epochs 2] [--teacher-epochs 2]
                                [--eval-every 4] [--mixed-precision bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from distill.evaluate import lm_perplexity
from distill.models.causal_lm import load_causal_lm
from distill.tasks import export_run, load_recipe, run_recipe
from distill.tasks.causal_lm import build_cache, setup

RECIPE = Path("recipes/smollm2-shakespeare.yaml")
SIZES = {"half": 0.5, "quarter": 0.25}
INITS = ("even", "depth", "width")
TEACHER_LAYERS = 30  # SmolLM2-135M


def student_overrides(init: str, share: float) -> list[str]:
    if init == "even":
        return ["student.prune=null", f"student.from_teacher={{keep: {round(TEACHER_LAYERS * share)}}}"]
    return ["student.from_teacher=null", f"student.prune={{params: {share}, axes: [{init}]}}"]


def curve(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    """(step, validation perplexity) of a stage, from its log."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [
        (e["step"], math.exp(e["validation"]["loss"])) for e in lines if e.get("stage") == stage and "validation" in e
    ]


def steps_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first logged step whose perplexity is at or below ``target``; None if it never gets there."""
    return next((step for step, ppl in points if ppl <= target), None)


def adapt_teacher(recipe, out: Path) -> tuple[Path, float]:
    """The adapted teacher's folder (``distill cache``: the teacher stage, then its cache; no student) and the held-out
    perplexity of the teacher before adaptation."""
    s = setup(recipe)
    before = lm_perplexity(s.teacher, s.heldout, vocab_size=s.vocab_size)
    del s
    build_cache(recipe, out)
    return (out / "teacher").resolve(), before


def plot(rows: dict, out: Path) -> Path:
    """Validation perplexity against steps, one panel per size: cross-entropy dashed, distilled solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIZES), figsize=(6 * len(SIZES), 4.2), squeeze=False)
    for ax, size in zip(axes[0], SIZES, strict=True):
        for colour, init in zip(("tab:grey", "tab:blue", "tab:orange"), INITS, strict=True):
            row = rows.get(f"{size}-{init}")
            for loss, style in (("ce", "--"), ("kd", "-")):
                if row and row["curve"][loss]:
                    steps, ppl = zip(*row["curve"][loss], strict=True)
                    ax.plot(steps, ppl, style, color=colour, marker=".", label=f"{init} {loss.upper()}")
        ax.set(title=f"{size} of the block parameters", xlabel="optimizer step", ylabel="validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def q8_0_perplexity(run_dir: Path) -> float | None:
    """The held-out perplexity of the run's student exported to GGUF q8_0 and read back; None if it failed."""
    try:
        gguf = export_run(run_dir, "gguf-q8_0", force=True)
        s = setup(load_recipe(run_dir / "recipe.yaml"))
        with tempfile.TemporaryDirectory() as cache:
            model = load_causal_lm(Path(gguf["path"]) / "model.gguf", cache_dir=Path(cache))[0]
            return lm_perplexity(model, s.heldout, vocab_size=s.vocab_size)
    except Exception as exc:  # noqa: BLE001 — an export that fails leaves the figure unmeasured, and its bar failed
        print(f"q8_0 GGUF: not measured ({exc})")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lm_students"))
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    args = parser.parse_args()
    started = time.perf_counter()
    cut = [
        f"data.limit_train_blocks={args.blocks}",
        "data.limit_heldout_blocks=16",
        f"student.train.epochs={args.epochs}",
        f"student.train.eval_every={args.eval_every}",
        f"distill.cache_dir={args.out / 'cache'}",
        "eval.generations=2",
        f"mixed_precision='{args.mixed_precision}'",  # quoted: YAML reads a bare no as false
    ]
    teacher_train = f"teacher.train={{epochs: {args.teacher_epochs}, batch_size: 8, optimizer: adamw, lr: 1.0e-4}}"
    teacher_folder, before = adapt_teacher(load_recipe(RECIPE, [*cut, teacher_train]), args.out / "adapt")
    print(f"teacher adapted: {time.perf_counter() - started:.0f} s")

    rows = {}
    for size, share in SIZES.items():
        for init in INITS:
            name = f"{size}-{init}"
            recipe = load_recipe(RECIPE, [*cut, f"teacher.path={teacher_folder}", "teacher.train=null", f"name={name}",
                                          *student_overrides(init, share)])  # fmt: skip
            metrics = run_recipe(recipe, args.out / name, resume=True)
            ce, kd = curve(args.out / name, "baseline"), curve(args.out / name, "student")
            reach = steps_to_reach(kd, ce[-1][1]) if ce and kd else None
            models = metrics["models"]
            rows[name] = {
                "size": size,
                "init": init,
                "parameters": models["student"]["parameters"],
                "kept": metrics.get("pruning", {}).get("kept"),
                "perplexity": {k: models[k]["perplexity"] for k in ("student_init", "baseline", "student")},
                "tokens_per_s": models["student"]["tokens_per_s"],
                "teacher": {k: models["teacher"][k] for k in ("perplexity", "tokens_per_s")},
                "curve": {"ce": ce, "kd": kd},
                "kd_steps_to_ce_final": reach,
                "kd_over_ce_steps": None if reach is None else round(reach / ce[-1][0], 3),
                "minutes": round((time.perf_counter() - started) / 60, 1),
            }
            row = rows[name]
            ppl = row["perplexity"]
            print(f"{name:14s} params {row['parameters']:>11,}  ppl init {ppl['student_init']:9.2f}  CE "
                  f"{ppl['baseline']:8.2f}  KD {ppl['student']:8.2f}  KD reaches CE's final at "
                  f"{row['kd_over_ce_steps']}× its steps  ({row['minutes']} min)")  # fmt: skip
    curves = plot(rows, args.out)

    bars = {}
    for size in SIZES:
        for init in INITS:
            ratio = rows[f"{size}-{init}"]["kd_over_ce_steps"]
            bars[f"kd_half_steps_{size}_{init}"] = ratio is not None and ratio <= 0.5
        even = rows[f"{size}-even"]["curve"]["kd"]
        best = None
        for init in ("depth", "width"):
            reach = steps_to_reach(rows[f"{size}-{init}"]["curve"]["kd"], even[-1][1]) if even else None
            ratio = None if reach is None else round(reach / even[-1][0], 3)
            rows[f"{size}-{init}"]["steps_to_even_final"] = ratio
            best = ratio if best is None or (ratio is not None and ratio < best) else best
        bars[f"importance_half_steps_{size}"] = best is not None and best <= 0.5

    half = min((rows[f"half-{init}"] for init in INITS), key=lambda r: r["perplexity"]["student"])
    teacher = half["teacher"]
    q8 = q8_0_perplexity(args.out / f"half-{half['init']}")
    kd_ppl = half["perplexity"]["student"]
    figures = {
        "half_over_teacher_perplexity": round(kd_ppl / teacher["perplexity"], 4),
        "half_speedup_tokens_per_s": round(half["tokens_per_s"] / teacher["tokens_per_s"], 3),
        "q8_0_perplexity": q8,
        "q8_0_change": None if q8 is None else round(q8 / kd_ppl - 1, 4),
    }
    bars["half_perplexity_within_1.10x"] = figures["half_over_teacher_perplexity"] <= 1.10
    bars["half_speed_1.5x"] = figures["half_speedup_tokens_per_s"] >= 1.5
    bars["q8_0_within_1pct"] = figures["q8_0_change"] is not None and abs(figures["q8_0_change"]) <= 0.01
    minutes = round((time.perf_counter() - started) / 60, 1)
    bars["budget_60_min"] = minutes <= 60
    for bar, ok in bars.items():
        print(f"{bar:34s} {'pass' if ok else 'FAIL'}")
    print(f"½ student ({half['init']}): perplexity {kd_ppl:.2f} = {figures['half_over_teacher_perplexity']}× the "
          f"adapted teacher's {teacher['perplexity']:.2f}; {figures['half_speedup_tokens_per_s']}× its tokens/s; "
          f"q8_0 {'not measured' if q8 is None else f'{q8:.2f}'}; curves in {curves}")  # fmt: skip
    result = {
        "bench": "lm_students",
        "blocks": args.blocks,
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "eval_every": args.eval_every,
        "mixed_precision": args.mixed_precision,
        "minutes": minutes,
        "teacher": {"before": before, "adapted": teacher["perplexity"], "tokens_per_s": teacher["tokens_per_s"]},
        "students": rows,
        "half": {"init": half["init"], **figures},
        "bars": bars,
        "pass": all(bars.values()),
    }
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
