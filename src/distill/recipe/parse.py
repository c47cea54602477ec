"""Reading a recipe: YAML (UTF-8, no duplicate keys), ``--set`` overrides, validation by a task's schema with the
first problem as one line, and the dump of a validated recipe back to YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill.errors import DistillError
from distill.recipe.causal_lm import LMRecipe
from distill.recipe.classification import Recipe
from distill.recipe.generate import GenerateRecipe
from distill.recipe.text import EmbeddingRecipe, TextClassificationRecipe

AnyRecipe = Recipe | LMRecipe | GenerateRecipe | TextClassificationRecipe | EmbeddingRecipe


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a second
    ``distill:`` section would replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # scalar keys only: a list as a key is refused by SafeLoader itself, a merge (<<) may repeat a key
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r}; keep one of them", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong, on one line whatever the error kind (reader errors have no ``problem``)."""
    return " ".join(str(getattr(exc, "problem", None) or exc).split())


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DistillError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DistillError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[leaf] = yaml.load(value, UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise DistillError(f"--set {item!r}: the value is not valid YAML: {_yaml_problem(exc)}") from None
    return raw


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(recipe)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}{shown}: {message}"


def _allowed_keys(error: dict[str, Any], model: type[BaseModel]) -> str:
    for part in error["loc"][:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def validate(schema: type[BaseModel], raw: Any, source: str = "recipe"):
    """``raw`` validated by ``schema``; the first problem as one line (with the allowed keys for a typo)."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        line = _describe(first)
        if first["type"] == "extra_forbidden":
            line += _allowed_keys(first, schema)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise DistillError(f"{source}: {line}{more}") from None


def parse_recipe(raw: Any, schemas: dict[str, type[BaseModel]], source: str = "recipe"):
    """A recipe of any task: ``raw['task']`` (default classification) picks its schema in ``schemas`` (the
    ``distill.tasks.TASKS`` table's)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DistillError(f"{source}: expected a mapping of sections at the top, got {type(raw).__name__}")
    task = raw.get("task", "classification")
    if not isinstance(task, str) or task not in schemas:
        raise DistillError(f"{source}: task = {task!r}: choose {', '.join(schemas)}")
    return validate(schemas[task], raw, source)


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The YAML of a recipe file with ``--set`` overrides applied, not yet validated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # YAML is UTF-8 whatever the locale says
    except FileNotFoundError:
        raise DistillError(f"recipe {path} does not exist; pass the path of a YAML recipe") from None
    except OSError as exc:
        raise DistillError(f"recipe {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DistillError(
            f"recipe {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it "
            "as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DistillError(
            f"recipe {path}: invalid YAML{' at' + where if where else ''}: {_yaml_problem(exc)}"
        ) from None
    if raw is None:  # an empty file would silently run every default: the MNIST demo
        raise DistillError(f"recipe {path} is empty; start from one in recipes/ (e.g. recipes/mnist.yaml)")
    if isinstance(raw, dict):
        apply_overrides(raw, overrides or [])
    return raw


def load_recipe_as(schema: type[BaseModel], path: str | Path):
    """A recipe file whose task is known (a run folder's own ``recipe.yaml``)."""
    return validate(schema, read_recipe(path), str(path))


def recipe_to_yaml(recipe: AnyRecipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
