"""``distill frontier``: compression to a target. Students pruned from the teacher to several shares of its block
weights are each healed briefly by distillation (the recipe's own training settings), then read on the validation
split in every file type (their weights rounded into the GGUF type, as llama.cpp's quantize does without an importance
matrix); the Pareto front of file size against validation perplexity is written as a table and a plot, and the
smallest file that keeps ``keep`` of the teacher's quality is chosen and exported.

Quality is perplexity: a candidate keeps ``keep`` when the teacher's validation perplexity over its own is at least
``keep`` (0.95: at most 1/0.95 = 1.053× the teacher's). Choices are made on the validation split; held-out figures are
reported beside them, never used. The largest share goes first (the likeliest to keep the quality); a share whose every
type misses the target ends the search (smaller ones only lose more), as does the budget: a candidate starts only when
the time it is expected to take (the last one's, or the plan's for the first) still fits.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.evaluate import lm_validation, side_by_side
from distill.io import write_json
from distill.models import gguf_grid
from distill.models.causal_lm import load_causal_lm
from distill.recipe import LMRecipe
from distill.recipe.causal_lm import PruneSpec

SHARES = (0.75, 0.5, 0.35, 0.25)  # of the teacher's transformer-block weights
TYPES = ("f16", "q8_0", "q4_0")
UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass
class Candidate:
    share: float
    type: str
    run: str
    parameters: int
    file_bytes: int
    tokens_per_s: float | None  # the float forward of the run's student (llama.cpp's speed per type is not measured)
    validation_perplexity: float
    agreement_with_teacher: float
    heldout_perplexity: float
    keeps: float  # the teacher's validation perplexity over the candidate's
    pareto: bool = False


@dataclass
class Frontier:
    keep: float
    budget_seconds: float
    teacher: dict
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    planned_seconds: float | None = None
    seconds: float = 0.0
    stopped: str = ""  # why the search ended before the last share
    export: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_budget(text: str) -> float:
    """Seconds of ``60m``, ``1.5h``, ``90s`` or ``3600`` (seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise DistillError(f"--budget {text!r} is not a duration: give e.g. 60m, 1.5h, 90s or 3600 (seconds)")
    return float(match[1]) * UNITS[match[2] or "s"]


def check_request(recipe, keep: float, types: tuple[str, ...], shares: tuple[float, ...]) -> None:
    if not isinstance(recipe, LMRecipe):
        raise DistillError(f"distill frontier searches causal_lm students; this recipe is task: {recipe.task}")
    if not 0 < keep <= 1:
        raise DistillError(f"--keep {keep} must be in (0, 1]: the share of the teacher's quality to keep, e.g. 0.95")
    unknown = [t for t in types if t != "f16" and t not in gguf_grid.QTYPES]
    if unknown or not types:
        raise DistillError(f"unknown file type {unknown or types!r}: use f16 or {', '.join(gguf_grid.QTYPES)}")
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise DistillError(f"shares {list(shares)} must each be in (0, 1]")


def candidate_recipe(recipe: LMRecipe, share: float, out: Path, teacher: Path | None) -> LMRecipe:
    """The run of one share: pruned by the recipe's axes (depth by default), no baseline, the shared teacher cache,
    and the teacher adapted once (``teacher``: its folder) rather than by every candidate."""
    axes = recipe.student.prune.axes if recipe.student.prune is not None else ["depth"]
    prune = PruneSpec(params=share, axes=axes)
    student = recipe.student.model_copy(update={"from_teacher": None, "path": None, "quantize": None, "prune": prune})
    update = {
        "student": student,
        "baseline": False,
        "name": f"{recipe.name}-frontier-{share:g}",
        "distill": recipe.distill.model_copy(update={"cache_dir": str(out / "cache")}),
    }
    if teacher is not None:
        update["teacher"] = recipe.teacher.model_copy(update={"path": str(teacher), "train": None})
    return recipe.model_copy(update=update)


def pareto(candidates: list[Candidate]) -> None:
    """Mark the candidates no other beats on both file size and validation perplexity."""
    for c in candidates:
        c.pareto = not any(
            o.file_bytes <= c.file_bytes
            and o.validation_perplexity <= c.validation_perplexity
            and (o.file_bytes, o.validation_perplexity) != (c.file_bytes, c.validation_perplexity)
            for o in candidates
        )


def search(
    recipe: LMRecipe,
    out: Path,
    *,
    keep: float,
    budget: float,
    shares: tuple[float, ...] = SHARES,
    types: tuple[str, ...] = TYPES,
    plan_only: bool = False,
) -> Frontier:
    """The whole search (module docstring); writes ``out``: frontier.json, FRONTIER.md, frontier.png, candidates'
    runs, and the chosen file in ``out/chosen``. A rerun goes on from the finished candidate runs."""
    from distill.plan import make_plan
    from distill.tasks import export_run, run_recipe
    from distill.tasks.causal_lm import build_cache, setup

    check_request(recipe, keep, types, shares)
    shares = tuple(sorted(set(shares), reverse=True))
    out = Path(out)
    first = candidate_recipe(recipe, shares[0], out, None)
    first = first.model_copy(update={"teacher": recipe.teacher})  # planned with the teacher's own adaptation
    planned = make_plan(first, steps=1, out=out / "plan").seconds
    if planned > budget:
        raise DistillError(
            f"--budget {budget / 60:.1f} min is less than one candidate needs: the plan gives {planned / 60:.1f} min "
            f"for the first (share {shares[0]:g}); give --budget {math.ceil(planned / 60) + 1}m or more, or fewer "
            "training steps (--set student.train.max_steps=N)"
        )
    frontier = Frontier(keep, budget, {}, planned_seconds=planned)
    if plan_only:
        return frontier
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    teacher_folder = None
    if recipe.teacher.train is not None:  # adapted once, kept only where it helps (teacher.adapt), shared by all
        build_cache(recipe.model_copy(update={"distill": recipe.distill.model_copy(
            update={"cache_dir": str(out / "cache")})}), out / "teacher")  # fmt: skip
        teacher_folder = out / "teacher" / "teacher"
    s = setup(candidate_recipe(recipe, shares[0], out, teacher_folder))
    if s.validation is None:
        raise DistillError("distill frontier chooses on the validation split: set data.validation_fraction above 0")
    size = {"vocab_size": s.vocab_size, "batch_size": recipe.eval.batch_size}
    teacher_scores = lm_validation(s.teacher, None, s.validation, **size)
    teacher_ppl = math.exp(teacher_scores["loss"])
    frontier.teacher = {
        "validation_perplexity": teacher_ppl,
        "heldout_perplexity": math.exp(lm_validation(s.teacher, None, s.heldout, **size)["loss"]),
        "f16_bytes": gguf_grid.file_bytes(s.teacher, "f16"),
        "f32_bytes": sum(p.numel() for p in s.teacher.parameters()) * 4,
    }
    prompts = {"prompts": min(3, recipe.eval.generations or 3), "new_tokens": recipe.eval.generation_tokens,
               "seed": recipe.seed}  # fmt: skip
    # each candidate's continuations are made as it is read, so no rounded copy outlives its own reading
    continuations = {"teacher": side_by_side({"teacher": s.teacher}, s.heldout, s.tokenizer, **prompts)}
    expected = planned
    for share in shares:
        spent = time.perf_counter() - started
        if spent + expected > budget:
            frontier.stopped = (
                f"budget: {spent / 60:.1f} of {budget / 60:.1f} min spent, the next share ({share:g}) needs about "
                f"{expected / 60:.1f}"
            )
            break
        began = time.perf_counter()
        run_dir = out / f"share-{share:g}"
        metrics = run_recipe(candidate_recipe(recipe, share, out, teacher_folder), run_dir, resume=run_dir.exists())
        student = load_causal_lm(run_dir / "student")[0].eval()
        row, student_row = [], metrics["models"]["student"]
        for qtype in types:
            model = gguf_grid.rounded(student, qtype)
            scores = lm_validation(model, s.teacher, s.validation, **size)
            ppl = math.exp(scores["loss"])
            row.append(Candidate(
                share, qtype, str(run_dir), student_row["parameters"], gguf_grid.file_bytes(model, qtype),
                student_row.get("tokens_per_s"), ppl, scores.get("agreement", float("nan")),
                math.exp(lm_validation(model, None, s.heldout, **size)["loss"]), teacher_ppl / ppl,
            ))  # fmt: skip
            name = f"{share:g}/{qtype}"
            continuations[name] = side_by_side({name: model}, s.heldout, s.tokenizer, **prompts)
            del model
        frontier.candidates += row
        expected = time.perf_counter() - began
        if all(c.keeps < keep for c in row):
            frontier.stopped = f"share {share:g} keeps less than {keep:g} in every type; smaller shares would keep less"
            break
    frontier.seconds = time.perf_counter() - started
    pareto(frontier.candidates)
    keeping = [c for c in frontier.candidates if c.keeps >= keep]
    frontier.chosen = min(keeping, key=lambda c: c.file_bytes) if keeping else None
    if frontier.chosen is not None:
        c = frontier.chosen
        frontier.export = export_run(Path(c.run), f"gguf-{c.type}", out / "chosen", force=(out / "chosen").exists())
    shown = ["teacher"] + [f"{c.share:g}/{c.type}" for c in frontier.candidates if c.pareto]
    generations = [  # one entry per prompt: the prompt, the reference, and each shown model's continuations
        {**rows[0], **{name: continuations[name][i][name] for name in shown}}
        for i, rows in enumerate(zip(*(continuations[name] for name in shown), strict=True))
    ]
    write_frontier(out, frontier, generations)
    return frontier


def write_frontier(out: Path, frontier: Frontier, generations: list[dict]) -> None:
    """frontier.json, FRONTIER.md (the table, the choice, the generations of every candidate on the front) and
    frontier.png (file size against validation perplexity, the front drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.report import human_bytes

    write_json(out / "frontier.json", frontier.as_dict() | {"generations": generations})
    t = frontier.teacher
    lines = [
        "# Compression frontier",
        "",
        f"Target: keep {frontier.keep:g} of the teacher's quality (validation perplexity at most "
        f"{t['validation_perplexity'] / frontier.keep:.2f}; the teacher's is {t['validation_perplexity']:.2f}). "
        f"Teacher files: {human_bytes(t['f16_bytes'])} as GGUF f16, {human_bytes(t['f32_bytes'])} of float32 weights. "
        f"Searched in {frontier.seconds / 60:.1f} min of a {frontier.budget_seconds / 60:.0f} min budget (planned "
        f"{(frontier.planned_seconds or 0) / 60:.1f} min for the first candidate)."
        + (f" Stopped: {frontier.stopped}." if frontier.stopped else ""),
        "",
        "| share | type | params | file | × smaller than teacher f16 | tokens/s (float forward) | validation ppl "
        "| keeps | held-out ppl | top-1 agrees w/ teacher | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in frontier.candidates:
        mark = "**chosen**" if c is frontier.chosen else ("yes" if c.pareto else "")
        lines.append(
            f"| {c.share:g} | {c.type} | {c.parameters:,} | {human_bytes(c.file_bytes)} | "
            f"{t['f16_bytes'] / c.file_bytes:.2f}× | {c.tokens_per_s or 0:,.0f} | {c.validation_perplexity:.2f} | "
            f"{c.keeps:.3f} | {c.heldout_perplexity:.2f} | {c.agreement_with_teacher:.2%} | {mark} |"
        )
    lines.append("")
    if frontier.chosen is None:
        best = max(frontier.candidates, key=lambda c: c.keeps, default=None)
        lines.append(f"No candidate keeps {frontier.keep:g}" + (f"; the best keeps {best.keeps:.3f}." if best else "."))
    else:
        c = frontier.chosen
        lines.append(
            f"Chosen: share {c.share:g} in {c.type}, {human_bytes(c.file_bytes)} — "
            f"{t['f16_bytes'] / c.file_bytes:.2f}× smaller than the teacher's f16 GGUF, "
            f"{t['f32_bytes'] / c.file_bytes:.2f}× smaller than its float32 weights — exported to "
            f"{(frontier.export or {}).get('path', '?')}."
        )
    lines += ["", "## Generations of the candidates on the front", ""]
    for number, entry in enumerate(generations, 1):
        lines += [f"### Prompt {number}", "", f"> {entry['prompt']!r}", "", f"reference: {entry['reference']!r}", ""]
        for name, texts in entry.items():
            if isinstance(texts, dict):
                lines.append(f"- **{name}** greedy: {texts['greedy']!r}")
        lines.append("")
    (out / "FRONTIER.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in frontier.candidates:
        ax.scatter(c.file_bytes / 2**20, c.validation_perplexity, color="#55a868" if c.pareto else "#b0b0b0")
        ax.annotate(f"{c.share:g} {c.type}", (c.file_bytes / 2**20, c.validation_perplexity), fontsize=7)
    front = sorted((c for c in frontier.candidates if c.pareto), key=lambda c: c.file_bytes)
    ax.plot([c.file_bytes / 2**20 for c in front], [c.validation_perplexity for c in front], color="#55a868")
    ax.scatter(t["f16_bytes"] / 2**20, t["validation_perplexity"], color="#4c72b0", marker="s", label="teacher f16")
    ax.axhline(
        t["validation_perplexity"] / frontier.keep, color="#c44e52", linestyle="--", label=f"keep {frontier.keep:g}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("GGUF file, MiB")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
