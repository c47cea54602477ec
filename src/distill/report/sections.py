"""The report's sections, each built from metrics.json (and the run folder's files) for any task: what a section
needs is there or the section is left out."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from distill.report import plots
from distill.report.blocks import LABELS, Html, Link, Section, Table, cell, human_bytes

esc = html.escape


def warnings_section(warnings: list[str]) -> Section:
    """What went wrong comes first."""
    boxes = [Html(f"<div class=warning><b>Warning:</b> {esc(w)}</div>", f"**Warning:** {w}") for w in warnings]
    return Section("", boxes)


def card_tiles(models: dict, quality) -> list[tuple[str, str]]:
    """(figure, caption) tiles: size ×, speed ×, quality kept, gain over the baseline, the int8 file."""
    t, s = models.get("teacher"), models.get("student")
    if not t or not s:
        return []
    tiles = []
    if t.get("parameters") and s.get("parameters"):
        tiles.append((f"{t['parameters'] / s['parameters']:.1f}× smaller",
                      f"{s['parameters']:,} parameters vs {t['parameters']:,}"))  # fmt: skip
    if t.get("latency_ms_batch1") and s.get("latency_ms_batch1"):
        tiles.append((f"{t['latency_ms_batch1'] / s['latency_ms_batch1']:.1f}× faster", "per example, batch 1"))
    elif t.get("tokens_per_s") and s.get("tokens_per_s"):
        tiles.append((f"{s['tokens_per_s'] / t['tokens_per_s']:.1f}× faster", "tokens per second"))
    if t.get("test_accuracy") and s.get("test_accuracy") is not None:
        tiles.append((f"{100 * s['test_accuracy'] / t['test_accuracy']:.1f}%", "of the teacher's test accuracy"))
    elif t.get(quality.key) and s.get(quality.key) is not None:
        ratio = s[quality.key] / t[quality.key]
        tiles.append(
            (f"{100 * ratio:.1f}%", f"of the teacher's {quality.title}")
            if quality.higher_is_better
            else (f"{ratio:.2f}×", f"the teacher's {quality.title}")
        )
    b = models.get("baseline")
    if b and b.get(quality.key) and s.get(quality.key) is not None:
        change = (s[quality.key] - b[quality.key]) / b[quality.key]
        gained = change > 0 if quality.higher_is_better else change < 0
        word = "better" if gained else "worse" if change else "no change"
        caption = f"{quality.title}: {b[quality.key]:,.4g} trained alone → {s[quality.key]:,.4g} distilled"
        tiles.append((f"{abs(100 * change):.0f}% {word}" if change else word, caption))
    q = models.get("student_int8")
    if q and q.get("file_bytes") and t.get("file_bytes"):
        caption = f"int8: {human_bytes(q['file_bytes'])} vs the teacher's {human_bytes(t['file_bytes'])}"
        tiles.append((f"{t['file_bytes'] / q['file_bytes']:.1f}× smaller file", caption))
    return tiles


def card_section(models: dict, quality, headline: str) -> Section:
    tiles = card_tiles(models, quality)
    page = "".join(f"<div class=tile><b>{esc(value)}</b><span>{esc(caption)}</span></div>" for value, caption in tiles)
    text = "\n".join(f"- **{value}** — {caption}" for value, caption in tiles)
    return Section("", [Html(f"<div class=card>{page}</div>", text), headline])


def models_section(models: dict, columns: list, note: str, figure) -> Section:
    rows = [[LABELS.get(name, name), *[cell(values.get(key), fmt) for key, _, fmt in columns]]
            for name, values in models.items()]  # fmt: skip
    table = Table(["model", *[title for _, title, _ in columns]], rows)
    return Section("Models side by side", [table, Html(f"<p class=note>{esc(note)}</p>", note), figure])


def read_log(run_dir: Path) -> list[dict]:
    entries = []
    log = run_dir / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the rest of the log still counts
            continue
    return entries


def curves_section(run_dir: Path) -> Section | None:
    # The auto sweep's short runs are summed up in their own table, not drawn.
    figure = plots.curves_figure(run_dir, read_log(run_dir), list(LABELS), LABELS)
    if figure is None:
        return None
    return Section(figure.title, [
        "Every loss term per stage: the raw values faint, an exponential moving average strong; the dashed black "
        "line is the validation split, measured at each validation.",
        figure,
    ])  # fmt: skip


def _probabilities(pairs: list, classes: list[str]) -> str:
    return ", ".join(f"{classes[c] if c < len(classes) else c} {p:.0%}" for c, p in pairs)


def _thumbnail(pixels) -> str:
    data = base64.b64encode(plots.thumbnail_png(pixels)).decode()
    return f'<img alt="test example" src="data:image/png;base64,{data}">'


def disagreement_section(where: dict) -> Section:
    classes = where.get("classes", [])

    def name(c: int) -> str:
        return classes[c] if c < len(classes) else str(c)

    share = where["count"] / max(where["of"], 1)
    blocks = [
        f"The distilled student's top-1 answer differs from the teacher's on {where['count']:,} of {where['of']:,} "
        f"test examples ({share:.1%}). The pairs it confuses most, then the examples where the two distributions "
        "differ most (total variation), with both models' three most likely classes."
    ]
    if where["pairs"]:
        blocks.append(Table(["teacher says", "student says", "examples"],
                            [[name(a), name(b), str(n)] for a, b, n in where["pairs"]]))  # fmt: skip
    cards, lines = [], []
    for e in where["examples"]:
        shown = _thumbnail(e["image"]) if "image" in e else f"<div>{esc(e.get('text', ''))}</div>"
        teacher, student = _probabilities(e["teacher"], classes), _probabilities(e["student"], classes)
        cards.append(
            f"<div class=example>{shown}<div><b>label</b> {esc(name(e['label']))}</div>"
            f"<div><b>teacher</b> {esc(teacher)}</div><div><b>student</b> {esc(student)}</div></div>"
        )
        what = f"“{e['text'][:120]}”" if "text" in e else f"test example {e['index']}"
        lines.append(f"- {what} — label {name(e['label'])}; teacher {teacher}; student {student}")
    if cards:
        blocks.append(Html(f"<div class=examples>{''.join(cards)}</div>", "\n".join(lines)))
    return Section("Where the student disagrees with the teacher", blocks)


def token_kl_section(passage: dict) -> Section:
    """A held-out passage, each token shaded by the student's KL to the teacher where it is predicted."""
    values = sorted(passage["kl"])
    top = values[int(0.95 * (len(values) - 1))] if values else 1.0  # the 95th percentile is full colour
    spans = "".join(
        f'<span title="KL {kl:.3f}" style="background:rgba(196,78,82,{min(1.0, kl / (top or 1.0)):.2f})">'
        f"{esc(piece)}</span>"
        for piece, kl in zip(passage["pieces"], passage["kl"], strict=True)
    )
    mean = sum(values) / max(len(values), 1)
    worst = sorted(zip(passage["kl"], passage["pieces"], strict=True), reverse=True)[:8]
    # quoted, not code spans: REPORT.md escapes <, > and &, which a code span would show as &lt;eos&gt;
    text = (
        f"Mean KL over this passage {mean:.3f} nats; the tokens the student gets most unlike the teacher: "
        + ", ".join(f"“{piece.strip() or repr(piece)}” ({kl:.2f})" for kl, piece in worst)
    )
    note = (
        "A held-out passage; each token is shaded by the student's forward KL to the teacher at the position that "
        "predicts it (darker = further from the teacher; hover for the value)."
    )
    return Section("Where the student differs from the teacher", [
        note,
        Html(f"<div class=passage>{esc(passage.get('context', ''))}{spans}</div>", text),
        text,
    ])  # fmt: skip


def calibration_section(run_dir: Path, calibration: dict) -> Section:
    figure = plots.reliability_figure(run_dir, calibration, LABELS)
    rows = [[LABELS.get(name, name), f"{entry['ece']:.4f}"] for name, entry in calibration.items()]
    return Section("Calibration", [
        "Expected calibration error (ECE) of each model's top-1 confidence on the test split, 10 equal-width bins: "
        "how far its confidence is from its accuracy on average. Soft labels usually carry the teacher's "
        "calibration to the student.",
        Table(["model", "ECE"], rows),
        figure,
    ])  # fmt: skip


AUTO_COLUMNS = ("temperature", "alpha", "lr", "loss", "accuracy", "agreement", "kl", "seconds")


def auto_section(auto: dict) -> Section:
    chosen = ", ".join(f"{key} {value:g}" for key, value in auto["choice"].items())
    sentence = (
        f"Chosen on the validation split: {chosen} — the best validation {auto['select_by']} of "
        f"{auto['candidates']} short student runs ({_budget(auto['budget_each'])} each, {auto['seconds']:.0f} s in "
        "all, on the teacher outputs the run already had)."
    )
    blocks = [sentence, _auto_table(auto["table"])]
    if baseline := auto.get("baseline"):
        blocks.append(
            f"The student trained alone had its own sweep of the learning rate on hard labels (chose "
            f"{baseline['choice']['lr']:g}, {baseline['candidates']} runs, {baseline['seconds']:.0f} s), so the "
            "comparison stays fair:"
        )
        blocks.append(_auto_table(baseline["table"]))
    return Section("Automatic settings", blocks)


def _auto_table(rows: list[dict]) -> Table:
    keys = [key for key in AUTO_COLUMNS if key in rows[0]]
    return Table(keys, [[f"{row[key]:.4g}" for key in keys] for row in rows], align="r" * len(keys))


def _budget(budget: dict) -> str:
    return ", ".join(f"{value} {unit if value != 1 else unit[:-1]}" for unit, value in budget.items())


def flatten(tree, prefix: str = "") -> list[list[str]]:
    """A nested mapping as [dotted key, value] rows (lists of scalars kept on one row)."""
    if isinstance(tree, dict) and tree:
        return [row for key, value in tree.items() for row in flatten(value, f"{prefix}{key}.")]
    if isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        return [row for i, value in enumerate(tree) for row in flatten(value, f"{prefix}{i}.")]
    value = ", ".join(map(str, tree)) if isinstance(tree, list) else "—" if tree is None else str(tree)
    return [[prefix.rstrip("."), value]]


def settings_section(run_dir: Path, metrics: dict) -> Section:
    blocks = []
    if metrics.get("distill"):
        blocks += ["The distillation settings as run (after any automatic choice):",
                   Table(["setting", "value"], flatten(metrics["distill"]))]  # fmt: skip
    recipe = run_dir / "recipe.yaml"
    if recipe.exists():
        blocks += ["The recipe, resolved (every default written out; `distill run` reads it back as it is):",
                   Table(["key", "value"], flatten(yaml.safe_load(recipe.read_text()) or {}))]  # fmt: skip
    if metrics.get("machine"):
        blocks += ["Where and with what it ran:", Table(["", ""], flatten(metrics["machine"]))]
    return Section("Recipe, settings and machine", blocks)


def exports_section(run_dir: Path) -> Section | None:
    """Every exported file, linked, with its size and the check its reload passed."""
    records = sorted((run_dir / "exports").glob("*.json"))
    rows = []
    for record in records:
        result = json.loads(record.read_text())
        folder = Path(result["path"])
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        check = (
            f"max |logit diff| {result['max_abs_logit_diff']:.2e}, top-1 agreement {result['top1_agreement']:.2%} "
            f"on {result['compared']} held-out {result['compared_unit']}"
        )
        for f in files:
            where = _relative(f, run_dir)
            rows.append([result["format"], Link(where, where), human_bytes(f.stat().st_size), check])
    if not rows:
        return None
    table = Table(["format", "file", "size", "round-trip check (reloaded vs the student)"], rows, align="llrl")
    return Section("Exported files", [
        "Each export was reloaded and compared with the student before it was kept (`distill export RUN --format "
        "F` adds more).",
        table,
    ])  # fmt: skip


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()


GENERATION_NOTE = (
    "Each model continues the same held-out prompts: greedy, and sampled at temperature 1 with the same seed for "
    "every model; *reference* is the text that really follows."
)


def generations_section(generations: list[dict]) -> Section:
    blocks = [GENERATION_NOTE]
    for number, entry in enumerate(generations, 1):
        rows = [["reference", entry["reference"], ""]]
        rows += [[LABELS.get(name, name), out["greedy"], out["sampled"]] for name, out in entry.items()
                 if isinstance(out, dict)]  # fmt: skip
        blocks += [f"**Prompt {number}:** {entry['prompt'].strip()}"]
        blocks += [Table(["model", "greedy", "sampled"], rows, align="lll")]
    return Section("Generations on held-out prompts", blocks)


def pruning_section(pruning: dict) -> Section:
    return Section("Pruning", [
        "The student was pruned from the teacher by importance; `RUN/prune.json` records every removed part and "
        "its score.",
        Table(["", ""], flatten(pruning)),
    ])  # fmt: skip
