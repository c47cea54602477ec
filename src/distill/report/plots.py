"""The report's figures, each written twice: a PNG beside REPORT.md, and an SVG whose text stays text (so the page
scales it, and a browser test can check that no two labels overlap)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from distill.io import atomic_path

MODEL_STYLE = {  # one colour and marker per model, the same in every figure
    "teacher_base": ("#8c8c8c", "s"),
    "teacher": ("#4c72b0", "s"),
    "student_init": ("#b0b0b0", "v"),
    "baseline": ("#dd8452", "^"),
    "student": ("#55a868", "o"),
    "student_int8": ("#c44e52", "D"),
    "student_qad": ("#8172b3", "P"),
    "student_rtn": ("#937860", "X"),
}
NOT_TERMS = {"stage", "step", "epoch", "lr", "examples_per_s", "validation", "best", "stopped"}


@dataclass(frozen=True)
class Figure:
    title: str
    png: Path
    svg: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text as <text>, not paths
    plt.rcParams["font.family"] = "DejaVu Sans"
    return plt


def plain(text) -> str:
    """A label drawn as written: matplotlib reads text between two $ as mathtext, which garbles a run named
    "cost$5-$10" and raises on one it cannot parse ("$\\foo$")."""
    return str(text).replace("$", r"\$")


def save(fig, run_dir: Path, stem: str, title: str) -> Figure:
    plt = _pyplot()
    target = run_dir / f"{stem}.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")
    plt.close(fig)
    text = svg.getvalue()
    return Figure(title, target, text[text.index("<svg") :])  # the <svg> element alone, to inline in HTML


def plain_log_axis(axis) -> None:
    """Log scale with ticks written as plain numbers (1, 2, 5, 10, …), never 2×10⁰."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.4g}"))
    axis.set_minor_formatter(NullFormatter())


def _wide(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and max(positive) / min(positive) > 20


def models_figure(run_dir: Path, models: dict, quality, labels: dict) -> Figure:
    """Quality against size on disk and against speed, one marker per model (named in a legend, so no two labels
    collide), with the path teacher → distilled student → int8 drawn as arrows."""
    plt = _pyplot()
    names = [n for n in models if models[n].get(quality.key) is not None]
    teacher = models.get("teacher", {})
    speed_key, speed_title = (
        ("latency_ms_batch1", "latency per example, batch 1 (ms)")
        if teacher.get("latency_ms_batch1")
        else ("tokens_per_s", "tokens per second (CPU)")
    )
    axes_spec = [("file_bytes", "weights on disk (MB)", 2**-20), (speed_key, speed_title, 1.0)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (key, xlabel, scale) in zip(axes, axes_spec, strict=True):
        shown = [n for n in names if models[n].get(key)]
        xs = {n: models[n][key] * scale for n in shown}
        ys = {n: models[n][quality.key] for n in shown}
        for name in shown:
            colour, marker = MODEL_STYLE.get(name, ("#333333", "o"))
            label = plain(labels.get(name, name))
            ax.scatter(xs[name], ys[name], color=colour, marker=marker, s=60, label=label, zorder=3)
        path = [n for n in ("teacher", "student", "student_int8") if n in xs]
        for start, end in zip(path, path[1:], strict=False):
            ax.annotate("", xy=(xs[end], ys[end]), xytext=(xs[start], ys[start]),
                        arrowprops={"arrowstyle": "->", "color": "#999999", "shrinkA": 6, "shrinkB": 6})  # fmt: skip
        ax.set(xlabel=xlabel, ylabel=quality.title)
        if xs and _wide(list(xs.values())):
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
        if quality.log_scale and ys and _wide(list(ys.values())):
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    handles, legend_labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=min(3, max(1, len(handles))), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(handles) / 3) + 0.04, 1, 1))
    return save(fig, run_dir, "models", "Size, speed and quality")


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled toward zero)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def curves_figure(run_dir: Path, entries: list[dict], stages: list[str], labels: dict) -> Figure | None:
    """Per stage: every training loss term (raw faint, smoothed strong) and the validation loss (and KL to the
    teacher where it was measured) at each validation."""
    plt = _pyplot()
    stages = [s for s in stages if any(e.get("stage") == s for e in entries)]
    if not stages:
        return None
    columns = min(3, len(stages))
    rows = math.ceil(len(stages) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stage in zip(axes.flat, stages, strict=False):
        train = [e for e in entries if e.get("stage") == stage and "validation" not in e]
        checks = [e for e in entries if e.get("stage") == stage and "validation" in e]
        terms = [k for k in dict.fromkeys(k for e in train for k in e) if k not in NOT_TERMS]
        for colour, term in zip(colours, terms, strict=False):
            points = [(e["step"], e[term]) for e in train if isinstance(e.get(term), int | float)]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(list(values)), color=colour, linewidth=2, label=f"train {term}")
        for marker, key in (("o", "loss"), ("s", "kl")):
            points = [(e["step"], e["validation"][key]) for e in checks if key in e["validation"]]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color="black", marker=marker, markersize=4, linestyle="--", linewidth=1,
                        label=f"validation {key}")  # fmt: skip
        ax.set(title=plain(labels.get(stage, stage)), xlabel="optimizer step")
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(stages) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return save(fig, run_dir, "training_curves", "Training and validation curves")


def reliability_figure(run_dir: Path, calibration: dict, labels: dict) -> Figure:
    """Accuracy against confidence per model (a calibrated model lies on the diagonal); ECE in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", label="perfectly calibrated")
    for name, entry in calibration.items():
        colour, marker = MODEL_STYLE.get(name, ("#333333", "o"))
        confidence, accuracy = [b[0] for b in entry["bins"]], [b[1] for b in entry["bins"]]
        ax.plot(confidence, accuracy, color=colour, marker=marker, markersize=4,
                label=plain(f"{labels.get(name, name)} (ECE {entry['ece']:.3f})"))  # fmt: skip
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_yticks([0.2, 0.4, 0.6, 0.8, 1.0])  # no 0 on this axis: the two zeros would meet in the corner
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save(fig, run_dir, "calibration", "Calibration (reliability diagram)")


def thumbnail_png(pixels: list[list[int]]) -> bytes:
    """A grey image (0–255 rows) as PNG bytes, enlarged so a 28×28 digit is readable."""
    plt = _pyplot()
    import numpy as np

    image = np.asarray(pixels, dtype=np.uint8)
    scale = max(1, 84 // max(image.shape))
    buffer = io.BytesIO()
    plt.imsave(buffer, np.kron(image, np.ones((scale, scale), dtype=np.uint8)), cmap="gray", format="png")
    return buffer.getvalue()


def compare_figure(out: Path, points: dict[tuple[str, str], dict], quality, labels: dict) -> Figure:
    """Quality against weights on disk for every model of every run: one colour per run, one marker per model.
    ``points``: (run, model key) → that model's metrics."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = list(dict.fromkeys(run for run, _ in points))
    xs = []
    for (run, model), values in points.items():
        if values.get(quality.key) is None or not values.get("file_bytes"):
            continue
        label = plain(f"{run}: {labels.get(model, model)}")
        marker = MODEL_STYLE.get(model, ("", "o"))[1]
        x = values["file_bytes"] / 2**20
        xs.append(x)
        ax.scatter(x, values[quality.key], color=colours[runs.index(run) % len(colours)], marker=marker, s=55,
                   label=label, zorder=3)  # fmt: skip
    ax.set(xlabel="weights on disk (MB)", ylabel=quality.title)
    if xs and _wide(xs):
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return save(fig, out, "compare", "Quality against size, every run")
