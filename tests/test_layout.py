"""The layout is a contract: no import cycles anywhere in the package (import-linter checks the layers), and
every task of the table is complete."""

from __future__ import annotations

from pathlib import Path

import grimp

from distill.export.run_export import FORMATS
from distill.recipe import AnyRecipe
from distill.tasks import TASKS


def test_no_import_cycles():
    graph = grimp.build_graph("distill")
    modules = sorted(graph.modules)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                cycle = path[path.index(imported) :] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])


def test_every_recipe_schema_has_one_task_row():
    schemas = [task.schema for task in TASKS.values()]
    assert len(set(schemas)) == len(schemas)
    assert set(schemas) == set(AnyRecipe.__args__)


def test_every_trained_task_reports_and_exports():
    for name, task in TASKS.items():
        if task.run is None:
            continue
        assert task.report is not None and task.load_student is not None, name
        formats = task.export_formats(Path("no-such-student"))
        assert "safetensors" in formats and set(formats) <= set(FORMATS), name
