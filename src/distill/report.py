"""Run folder → REPORT.md with a comparison table, a headline computed from the numbers, and plots.

Task-agnostic: each task gives a ``ReportView`` (its headline, columns, note and quality axis) and the
report lays them out the same way for every task."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_path


@dataclass(frozen=True)
class Quality:
    """The figure the size-vs-quality plot shows: a metric key, its title, and whether a log scale suits it."""

    key: str
    title: str
    log_scale: bool = False


@dataclass(frozen=True)
class ReportView:
    """How a task summarises its metrics: headline sentence, table columns, the measurement note, and the
    quality axis of the plot (each a function of the models' metrics, or of the whole metrics.json for the
    note)."""

    headline: Callable[[dict], str]
    columns: Callable[[dict], list]
    note: Callable[[dict], str]
    quality: Callable[[dict], Quality]


LABELS = {
    "teacher_base": "teacher before adaptation",
    "teacher": "teacher",
    "student_init": "student before training",
    "baseline": "student, hard labels only",
    "student": "student, distilled",
    "student_int8": "student, distilled, int8",
}


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


ACCURACY_COLUMNS = [  # classifiers of images and of texts
    ("parameters", "params", "{:,}"),
    ("file_bytes", "file", None),
    ("test_accuracy", "accuracy", "{:.2%}"),
    ("test_errors", "test errors", "{}"),
    ("agreement_with_teacher", "agrees w/ teacher", "{:.2%}"),
    ("kl_to_teacher", "KL to teacher", "{:.4f}"),
    ("latency_ms_batch1", "latency/example (batch 1)", "{:.3f} ms"),
    ("throughput_per_s_batch1024", "throughput (batch 1024)", "{:,.0f}/s"),
]


def accuracy_headline(models: dict) -> str:
    """Size, speed and accuracy of the distilled classifier against the teacher and the hard-label student."""
    t, s = models["teacher"], models["student"]
    text = (
        f"The distilled student is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), "
        f"{t['latency_ms_batch1'] / s['latency_ms_batch1']:.1f}× faster per example, and keeps "
        f"{100 * s['test_accuracy'] / t['test_accuracy']:.1f}% of the teacher's accuracy "
        f"({s['test_errors']} test errors vs the teacher's {t['test_errors']}"
    )
    if "baseline" in models:
        b = models["baseline"]
        removed = 100 * (1 - s["test_errors"] / b["test_errors"]) if b["test_errors"] else 0.0
        effect = f"removes {removed:.0f}% of them" if removed >= 0 else f"makes {-removed:.0f}% more"
        text += f"; the same student trained without the teacher makes {b['test_errors']}: distillation {effect}"
    text += ")."
    if "student_int8" in models:
        q = models["student_int8"]
        text += (
            f" Quantized to int8 it is a {human_bytes(q['file_bytes'])} file ({t['file_bytes'] / q['file_bytes']:.1f}× "
            f"smaller than the teacher), {t['latency_ms_batch1'] / q['latency_ms_batch1']:.1f}× faster per example "
            f"and keeps {100 * q['test_accuracy'] / t['test_accuracy']:.1f}% of its accuracy "
            f"({q['test_errors']} errors)."
        )
    return text


def accuracy_view(columns: list, note: Callable[[dict], str]) -> ReportView:
    """The report of a classifier (of images or of texts): the accuracy headline, test errors on the plot."""
    return ReportView(
        accuracy_headline, lambda models: columns, note, lambda models: Quality("test_errors", "test errors")
    )


def table(models: dict, columns: list) -> str:
    header = "| model | " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, values in models.items():
        cells = []
        for key, _, fmt in columns:
            cells.append(_cell(values.get(key), fmt))
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(run_dir: Path) -> Path | None:
    log = run_dir / "log.jsonl"
    if not log.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("stage") not in LABELS:  # the auto sweep's short runs are summed up in their own table
            continue
        for key in ("loss", "kd", "ce"):
            if key in entry:
                series.setdefault((entry["stage"], key), []).append((entry["step"], entry[key]))
        if "validation" in entry:
            series.setdefault((entry["stage"], "validation loss"), []).append(
                (entry["step"], entry["validation"]["loss"])
            )
    stages = sorted({stage for stage, _ in series}, key=list(LABELS).index)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for (name, key), points in series.items():
            if name == stage:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=key)
        ax.set(title=LABELS.get(stage, stage), xlabel="step", yscale="log")
        ax.legend()
    fig.tight_layout()
    target = run_dir / "training_curves.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def plot_models(run_dir: Path, models: dict, quality: Quality) -> Path:
    """Quality per model, and size vs quality (the trade a user is buying)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, title, log = quality.key, quality.title, quality.log_scale
    names = [n for n in models if models[n].get(key) is not None]
    labels = [LABELS.get(n, n) for n in names]
    values = [models[n][key] for n in names]
    sizes = [models[n]["file_bytes"] / 2**20 for n in names]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 3.8))
    bars.barh(labels, values, color="#4c72b0")
    bars.set(title=title, xscale="log" if log else "linear")
    bars.invert_yaxis()
    scatter.scatter(sizes, values, color="#dd8452")
    for x, y, label in zip(sizes, values, labels, strict=True):
        scatter.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    scatter.set(
        title="size vs quality",
        xlabel="weights on disk (MB)",
        ylabel=key,
        xscale="log",
        yscale="log" if log else "linear",
    )
    fig.tight_layout()
    target = run_dir / "models.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def write_report(run_dir: Path, view: ReportView) -> Path:
    """REPORT.md and a self-contained report.html (images embedded) from metrics.json and log.jsonl; ``view``
    is the task's way of summarising its numbers."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise DistillError(f"{run_dir} has no metrics.json: the run has not finished; rerun it with --resume") from None
    models = metrics["models"]
    note = view.note(metrics)
    title = f"Distillation report: {metrics.get('recipe', run_dir.name)}"
    summary = view.headline(models)
    columns = view.columns(models)
    distill = f"Distillation: `{json.dumps(metrics.get('distill', {}))}`"
    auto_note, auto_rows = auto_section(metrics.get("auto"))
    plots = [("Quality and size per model", plot_models(run_dir, models, view.quality(models)))]
    curves = plot_curves(run_dir)
    if curves:
        plots.append(("Training curves (every loss term)", curves))
    warnings = [f"**Warning:** {line}" for line in metrics.get("warnings", [])]  # what went wrong comes first
    gens = metrics.get("generations")  # language models: continuations of held-out prompts, side by side
    parts = [
        f"# {title}",
        "",
        *[w + "\n" for w in warnings],
        summary,
        "",
        table(models, columns),
        "",
        note,
        "",
        distill,
        *(["", "## Automatic settings", "", auto_note, "", auto_rows] if auto_note else []),
        *(["", "## Generations on held-out prompts", "", generations_markdown(gens)] if gens else []),
    ]
    for heading, image in plots:
        parts += ["", f"## {heading}", "", f"![{heading}]({image.name})"]
    target = run_dir / "REPORT.md"
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    with atomic_path(run_dir / "report.html") as tmp:
        notes = [note, distill, *([auto_note] if auto_note else [])]
        sections = [("Generations on held-out prompts", generations_html(gens))] if gens else []
        tmp.write_text(html_report(title, " ".join([*warnings, summary]), models, columns, notes, plots, sections))
    return target


GENERATION_NOTE = (
    "Each model continues the same held-out prompts: greedy, and sampled at temperature 1 with the same seed for "
    "every model; *reference* is the text that really follows."
)


def _generation_rows(entry: dict) -> list[tuple[str, str, str]]:
    """(model, greedy, sampled) rows of one prompt, the reference first."""
    rows = [("reference", entry["reference"], "")]
    return rows + [(LABELS.get(name, name), out["greedy"], out["sampled"]) for name, out in entry.items()
                   if isinstance(out, dict)]  # fmt: skip


def generations_markdown(generations: list[dict]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()

    parts = [GENERATION_NOTE]
    for number, entry in enumerate(generations, 1):
        parts += [
            "",
            f"**Prompt {number}:** {cell(entry['prompt'])}",
            "",
            "| model | greedy | sampled |",
            "|---|---|---|",
        ]
        parts += [
            f"| {model} | {cell(greedy)} | {cell(sampled)} |" for model, greedy, sampled in _generation_rows(entry)
        ]
    return "\n".join(parts)


def generations_html(generations: list[dict]) -> str:
    esc = html.escape
    parts = [f"<p class=note>{esc(GENERATION_NOTE)}</p>"]
    for number, entry in enumerate(generations, 1):
        rows = "".join(
            f"<tr><td>{esc(model)}</td><td style=text-align:left>{esc(greedy)}</td>"
            f"<td style=text-align:left>{esc(sampled)}</td></tr>"
            for model, greedy, sampled in _generation_rows(entry)
        )
        parts.append(
            f"<p><b>Prompt {number}:</b> {esc(entry['prompt'])}</p><table><thead><tr><th>model</th><th>greedy</th>"
            f"<th>sampled</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(parts)


AUTO_COLUMNS = ("temperature", "alpha", "lr", "loss", "accuracy", "agreement", "kl", "seconds")


def auto_section(auto: dict | None) -> tuple[str, str]:
    """The sentence and the Markdown table of an auto sweep (metrics.json ``auto``); empty strings without one."""
    if not auto:
        return "", ""
    chosen = ", ".join(f"{key} {value:g}" for key, value in auto["choice"].items())
    sentence = (
        f"Chosen on the validation split: {chosen} — the best validation {auto['select_by']} of "
        f"{auto['candidates']} short student runs ({_budget(auto['budget_each'])} each, {auto['seconds']:.0f} s in "
        "all, on the teacher outputs the run already had)."
    )
    tables = [_auto_table(auto["table"])]
    if baseline := auto.get("baseline"):
        sentence += (
            f" The student trained alone had its own sweep of the learning rate on hard labels (chose "
            f"{baseline['choice']['lr']:g}, {baseline['candidates']} runs, {baseline['seconds']:.0f} s), so the "
            "comparison stays fair; its table comes second."
        )
        tables.append(_auto_table(baseline["table"]))
    return sentence, "\n\n".join(tables)


def _auto_table(rows: list[dict]) -> str:
    keys = [key for key in AUTO_COLUMNS if key in rows[0]]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{row[key]:.4g}" for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def _budget(budget: dict) -> str:
    return ", ".join(f"{value} {unit if value != 1 else unit[:-1]}" for unit, value in budget.items())


def html_report(
    title: str, summary: str, models: dict, columns: list, notes: list[str], plots: list, sections: list = ()
) -> str:
    """One file, no external resources: the images are embedded as data: URIs. ``sections``: (heading, HTML) pairs
    a task adds after the plots."""
    esc = html.escape
    head = "".join(f"<th>{esc(t)}</th>" for _, t, _ in columns)
    rows = "".join(
        f"<tr><td>{esc(LABELS.get(name, name))}</td>"
        + "".join(f"<td>{esc(_cell(values.get(key), fmt))}</td>" for key, _, fmt in columns)
        + "</tr>"
        for name, values in models.items()
    )
    figures = "".join(
        f'<h2>{esc(heading)}</h2><img alt="{esc(heading)}" src="data:image/png;base64,'
        f'{base64.b64encode(image.read_bytes()).decode()}">'
        for heading, image in plots
    )
    notes_html = "".join(f"<p class=note>{esc(n)}</p>" for n in notes)
    extra = "".join(f"<h2>{esc(heading)}</h2>{body}" for heading, body in sections)
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}.headline{font-size:1.15em}.note{color:#555;font-size:.9em}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=headline>{esc(summary)}</p>"
        f"<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        f"{notes_html}{figures}{extra}</body></html>\n"
    )


def _cell(value, fmt) -> str:
    return "—" if value is None else human_bytes(value) if fmt is None else fmt.format(value)
