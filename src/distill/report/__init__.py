"""Run folder → REPORT.md and report.html: a headline card, the models side by side, curves, where the student
still differs from the teacher, calibration, the settings, the exported files.

Task-agnostic: each task gives a ``ReportView`` (its headline, columns, note and quality axis) and puts what the
report shows beyond the table into metrics.json (``disagreements``, ``calibration``, ``token_kl``,
``generations``, ``auto``); ``sections.py`` turns each into a section, ``blocks.py`` renders them twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.report import sections as build
from distill.report.blocks import LABELS, human_bytes, write_pages
from distill.report.plots import models_figure


@dataclass(frozen=True)
class Quality:
    """The figure the size-vs-quality plot shows: a metric key, its title, and whether a log scale suits it."""

    key: str
    title: str
    log_scale: bool = False
    higher_is_better: bool = False


@dataclass(frozen=True)
class ReportView:
    """How a task summarises its metrics: headline sentence, table columns, the measurement note, and the
    quality axis of the plot (each a function of the models' metrics, or of the whole metrics.json for the
    note)."""

    headline: Callable[[dict], str]
    columns: Callable[[dict], list]
    note: Callable[[dict], str]
    quality: Callable[[dict], Quality]


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


def read_metrics(run_dir: Path) -> dict:
    """A finished run's metrics.json; one line when the run has not finished or the file is damaged."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except FileNotFoundError:
        raise DistillError(f"{run_dir} has no metrics.json: the run has not finished; rerun it with --resume") from None
    except json.JSONDecodeError as exc:
        problem = f"{run_dir}/metrics.json is damaged ({exc.msg})"
        raise DistillError(f"{problem}; delete it and finish the run with --resume") from None


def write_report(run_dir: Path, view: ReportView) -> Path:
    """REPORT.md and a self-contained report.html from metrics.json, log.jsonl and the run folder's exports;
    ``view`` is the task's way of summarising its numbers. Both renderings come from one list of sections."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    models = metrics["models"]
    quality = view.quality(models)
    figure = models_figure(run_dir, models, quality, LABELS)
    sections = [
        build.warnings_section(metrics.get("warnings", [])),
        build.card_section(models, quality, view.headline(models)),
        build.models_section(models, view.columns(models), view.note(metrics), figure),
        build.curves_section(run_dir),
        metrics.get("disagreements") and build.disagreement_section(metrics["disagreements"]),
        metrics.get("token_kl") and build.token_kl_section(metrics["token_kl"]),
        metrics.get("generations") and build.generations_section(metrics["generations"]),
        metrics.get("calibration") and build.calibration_section(run_dir, metrics["calibration"]),
        metrics.get("auto") and build.auto_section(metrics["auto"]),
        metrics.get("pruning") and build.pruning_section(metrics["pruning"]),
        build.exports_section(run_dir),
        build.settings_section(run_dir, metrics),
    ]
    sections = [section for section in sections if section]
    title = f"Distillation report: {metrics.get('recipe', run_dir.name)}"
    return write_pages(run_dir / "REPORT.md", run_dir / "report.html", title, sections)
