"""Run folder → REPORT.md with a comparison table, a headline computed from the numbers, and plots."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_path

LABELS = {
    "teacher": "teacher",
    "student_init": "student before training",
    "baseline": "student, hard labels only",
    "student": "student, distilled",
    "student_int8": "student, distilled, int8",
}
COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("file_bytes", "file", None),
    ("test_accuracy", "accuracy", "{:.2%}"),
    ("test_errors", "test errors", "{}"),
    ("agreement_with_teacher", "agrees w/ teacher", "{:.2%}"),
    ("kl_to_teacher", "KL to teacher", "{:.4f}"),
    ("latency_ms_batch1", "latency/example (batch 1)", "{:.3f} ms"),
    ("throughput_per_s_batch1024", "throughput (batch 1024)", "{:,.0f}/s"),
]

LM_COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("file_bytes", "weights", None),
    ("perplexity", "held-out perplexity", "{:.2f}"),
    ("agreement_with_teacher", "top-1 agrees w/ teacher", "{:.2%}"),
    ("kl_to_teacher", "held-out KL to teacher", "{:.4f}"),
    ("tokens_per_s", "tokens/s (CPU forward)", "{:,.0f}"),
]

TEXT_COLUMNS = [  # the classifier columns; latency and throughput measured on texts, tokenization included
    *COLUMNS[:6],
    ("latency_ms_batch1", "latency/text (batch 1)", "{:.1f} ms"),
    ("texts_per_s", "texts/s (batched)", "{:,.1f}"),
]


def embedding_columns(models: dict) -> list:
    probes = [key for key in next(iter(models.values())) if key.startswith("probe_")]
    return [
        ("parameters", "params", "{:,}"),
        ("file_bytes", "file", None),
        ("cosine_to_teacher", "held-out cosine to teacher", "{:.4f}"),
        *[(key, f"probe accuracy: {key.removeprefix('probe_')}", "{:.2%}") for key in probes],
        ("latency_ms_batch1", "latency/text (batch 1)", "{:.2f} ms"),
        ("texts_per_s", "texts/s (batched)", "{:,.1f}"),
    ]


def embedding_headline(models: dict) -> str:
    t, s = models["teacher"], models["student"]
    kept = [
        f"{100 * s[key] / t[key]:.1f}% of its {key.removeprefix('probe_')} probe accuracy "
        f"({s[key]:.1%} vs {t[key]:.1%})"
        for key in t
        if key.startswith("probe_")
    ]
    return (
        f"The distilled student is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), embeds "
        f"{s['texts_per_s'] / t['texts_per_s']:.1f}× as many texts per second, "
        + (
            f"reaches a held-out cosine of {s['cosine_to_teacher']:.3f} to the teacher's embeddings "
            if s.get("cosine_to_teacher") is not None
            else ""
        )
        + "and keeps "
        + " and ".join(kept)
        + "."
    )


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def headline(models: dict) -> str:
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


def lm_headline(models: dict) -> str:
    """Size, speed and quality of the distilled LM against the teacher and the cross-entropy student."""
    t, s = models["teacher"], models["student"]
    text = (
        f"The distilled student is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), "
        f"{s['tokens_per_s'] / t['tokens_per_s']:.1f}× faster (tokens/s), with held-out perplexity "
        f"{s['perplexity']:.2f} against the teacher's {t['perplexity']:.2f} and agrees with the teacher's top "
        f"token {s['agreement_with_teacher']:.1%} of the time"
    )
    if "baseline" in models:
        b = models["baseline"]
        gap = b["perplexity"] - t["perplexity"]
        closed = 100 * (b["perplexity"] - s["perplexity"]) / gap if gap > 0 else float("nan")
        text += (
            f"; the same student trained with plain cross-entropy reaches {b['perplexity']:.2f} "
            f"(agreement {b['agreement_with_teacher']:.1%}): distillation closes {closed:.0f}% of its perplexity "
            "gap to the teacher"
        )
    text += "."
    if "student_int8" in models:
        q = models["student_int8"]
        text += (
            f" Quantized to int8 it is a {human_bytes(q['file_bytes'])} file ({t['file_bytes'] / q['file_bytes']:.1f}× "
            f"smaller than the teacher), {q['tokens_per_s'] / t['tokens_per_s']:.1f}× faster, with perplexity "
            f"{q['perplexity']:.2f}."
        )
    return text


def table(models: dict, columns: list = COLUMNS) -> str:
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
        for key in ("loss", "kd", "ce"):
            if key in entry:
                series.setdefault((entry["stage"], key), []).append((entry["step"], entry[key]))
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


def plot_models(run_dir: Path, models: dict, lm: bool) -> Path:
    """Quality per model, and size vs quality (the trade a user is buying)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, title = ("perplexity", "held-out perplexity (lower is better)") if lm else ("test_errors", "test errors")
    probes = [k for k in next(iter(models.values())) if k.startswith("probe_")]
    if probes:  # embedding runs: the first probe's accuracy
        key, title = probes[0], f"{probes[0].removeprefix('probe_')} probe accuracy (higher is better)"
    names = [n for n in models if models[n].get(key) is not None]
    labels = [LABELS.get(n, n) for n in names]
    values = [models[n][key] for n in names]
    sizes = [models[n]["file_bytes"] / 2**20 for n in names]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 3.8))
    bars.barh(labels, values, color="#4c72b0")
    bars.set(title=title, xscale="log" if lm else "linear")
    bars.invert_yaxis()
    scatter.scatter(sizes, values, color="#dd8452")
    for x, y, label in zip(sizes, values, labels, strict=True):
        scatter.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    scatter.set(
        title="size vs quality",
        xlabel="weights on disk (MB)",
        ylabel=key,
        xscale="log",
        yscale="log" if lm else "linear",
    )
    fig.tight_layout()
    target = run_dir / "models.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def write_report(run_dir: Path) -> Path:
    """REPORT.md and a self-contained report.html (images embedded) from metrics.json and log.jsonl."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise DistillError(f"{run_dir} has no metrics.json: the run has not finished; rerun it with --resume") from None
    models = metrics["models"]
    machine = metrics.get("machine", {})
    lm = metrics.get("task") == "causal_lm"
    if lm:
        data = metrics.get("data", {})
        note = (
            f"Held-out: {data.get('heldout_blocks', '?')} blocks of {data.get('block_size', '?')} tokens "
            f"({next(iter(models.values())).get('heldout_tokens', '?')} predicted tokens); training: "
            f"{data.get('train_blocks', '?')} blocks. Weights: float32 bytes of the unique parameters "
            f"(the saved files for trained students). Tokens/s: median forward pass, "
            f"{machine.get('cpu_threads', '?')} CPU thread(s), torch {machine.get('torch', '?')}."
        )
    else:
        note = (
            f"Latency: median of repeated batch-1 forward passes after warm-up, "
            f"{machine.get('cpu_threads_for_latency', '?')} CPU thread(s), torch {machine.get('torch', '?')}, "
            f"{machine.get('platform', '?')}. File size: the weights file on disk."
        )
    task = metrics.get("task", "classification")
    if task == "text_classification":
        speed, data = machine.get("speed", {}), metrics.get("data", {})
        note = (
            f"{data.get('test_texts', '?')} test texts, {data.get('train_texts', '?')} training texts of which "
            f"{data.get('labeled_train_texts', '?')} labeled; at most {data.get('max_length', '?')} tokens per text. "
            f"Latency and texts/s include tokenization, {speed.get('threads', '?')} CPU thread(s), batches of "
            f"{speed.get('batch_size', '?')}, torch {machine.get('torch', '?')}. File size: the weights on disk."
        )
    if task == "embedding":
        speed = machine.get("speed", {})
        sizes = ", ".join(
            f"{k}: {v['train_texts']} training / {v['test_texts']} held-out texts"
            for k, v in metrics.get("data", {}).items()
        )
        note = (
            f"{sizes}. Probes: logistic regression on the training texts' embeddings, accuracy on the held-out "
            f"texts. Texts/s and latency include tokenization, {speed.get('threads', '?')} CPU thread(s), batches "
            f"of {speed.get('batch_size', '?')}, torch {machine.get('torch', '?')}."
        )
    title = f"Distillation report: {metrics.get('recipe', run_dir.name)}"
    summarize = {"causal_lm": lm_headline, "embedding": embedding_headline}.get(task, headline)
    summary = summarize(models)
    columns = {"causal_lm": LM_COLUMNS, "text_classification": TEXT_COLUMNS}.get(task, COLUMNS)
    if task == "embedding":
        columns = embedding_columns(models)
    distill = f"Distillation: `{json.dumps(metrics.get('distill', {}))}`"
    plots = [("Quality and size per model", plot_models(run_dir, models, lm))]
    curves = plot_curves(run_dir)
    if curves:
        plots.append(("Training curves (every loss term)", curves))
    parts = [f"# {title}", "", summary, "", table(models, columns), "", note, "", distill]
    for heading, image in plots:
        parts += ["", f"## {heading}", "", f"![{heading}]({image.name})"]
    target = run_dir / "REPORT.md"
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    with atomic_path(run_dir / "report.html") as tmp:
        tmp.write_text(html_report(title, summary, models, columns, [note, distill], plots))
    return target


def html_report(title: str, summary: str, models: dict, columns: list, notes: list[str], plots: list) -> str:
    """One file, no external resources: the images are embedded as data: URIs."""
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
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}.headline{font-size:1.15em}.note{color:#555;font-size:.9em}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=headline>{esc(summary)}</p>"
        f"<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        f"{notes_html}{figures}</body></html>\n"
    )


def _cell(value, fmt) -> str:
    return "—" if value is None else human_bytes(value) if fmt is None else fmt.format(value)
