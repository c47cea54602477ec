"""``distill compare RUN...``: finished runs side by side — one table of every model of every run, the settings
that differ between the runs, their exported files, and one plot of quality against size."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.report import plots
from distill.report.blocks import LABELS, Section, Table, cell, human_bytes, write_pages
from distill.report.sections import flatten


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [d.name for d in run_dirs]
    return [d.name if names.count(d.name) == 1 else str(d) for d in run_dirs]


def differing_settings(run_dirs: list[Path], names: list[str]) -> Table | None:
    """The recipe keys whose values are not the same in every run (what a sweep varied)."""
    recipes = []
    for run_dir in run_dirs:
        path = run_dir / "recipe.yaml"
        recipes.append(dict(flatten(yaml.safe_load(path.read_text()) or {})) if path.exists() else {})
    keys = sorted({key for recipe in recipes for key in recipe})
    differ = [key for key in keys if len({recipe.get(key, "—") for recipe in recipes}) > 1]
    if not differ:
        return None
    rows = [[name, *[recipe.get(key, "—") for key in differ]] for name, recipe in zip(names, recipes, strict=True)]
    return Table(["run", *differ], rows)


def exports_table(run_dirs: list[Path], names: list[str]) -> Table | None:
    rows = []
    for name, run_dir in zip(names, run_dirs, strict=True):
        for record in sorted((run_dir / "exports").glob("*.json")):
            r = json.loads(record.read_text())
            rows.append([name, r["format"], human_bytes(r["file_bytes"]), f"{r['max_abs_logit_diff']:.2e}",
                         f"{r['top1_agreement']:.2%}"])  # fmt: skip
    header = ["run", "format", "file", "max |logit diff|", "top-1 agreement with the student"]
    return Table(header, rows) if rows else None


def compare(runs: list[tuple[Path, dict, object]], out: Path) -> Path:
    """``runs``: (run folder, metrics.json, the task's ReportView) per run. Writes COMPARE.md, compare.html and
    compare.png into ``out``; the columns and the plot's quality are those of the first run's task."""
    if len({metrics.get("task") for _, metrics, _ in runs}) > 1:
        tasks = ", ".join(sorted({str(metrics.get("task")) for _, metrics, _ in runs}))
        raise DistillError(f"these runs are of different tasks ({tasks}): compare runs of one task at a time")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    view = runs[0][2]
    first_models = runs[0][1]["models"]
    columns = view.columns(first_models)
    quality = view.quality(first_models)
    run_dirs = [Path(run_dir) for run_dir, _, _ in runs]
    names = run_names(run_dirs)
    rows, points = [], {}
    for name, (_, metrics, _) in zip(names, runs, strict=True):
        for model, values in metrics["models"].items():
            rows.append([name, LABELS.get(model, model), *[cell(values.get(key), fmt) for key, _, fmt in columns]])
            points[(name, model)] = values
    table = Table(["run", "model", *[title for _, title, _ in columns]], rows)
    figure = plots.compare_figure(out, points, quality, LABELS)
    blocks = [f"**Warning ({name}):** {warning}" for name, (_, metrics, _) in zip(names, runs, strict=True)
              for warning in metrics.get("warnings", [])]  # fmt: skip
    sections = [Section("Models", [*blocks, f"{len(runs)} runs, {len(rows)} models.", table, figure])]
    if settings := differing_settings(run_dirs, names):
        sections.append(Section("Settings that differ", [settings]))
    if exports := exports_table(run_dirs, names):
        sections.append(Section("Exported files", [exports]))
    title = "Runs compared: " + ", ".join(names)
    return write_pages(out / "COMPARE.md", out / "compare.html", title, sections)
