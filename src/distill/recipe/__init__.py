"""Recipes: a YAML file validated by pydantic before any work starts.

Unknown keys and bad values fail with one line naming the key, the value and what is allowed.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are checked too.

``common`` holds what several tasks share, one module per task its schema (``classification``, ``causal_lm``,
``generate``, ``text`` for text_classification and embedding), ``parse`` the reading, overrides and one-line errors.
Every name is re-exported here: import from ``distill.recipe``.
"""

from distill.recipe.causal_lm import (
    LMDataSpec,
    LMDistillSpec,
    LMEndpointSpec,
    LMEvalSpec,
    LMRecipe,
    LMStudentSpec,
    LMTeacherSpec,
    OnPolicySpec,
    PruneSpec,
)
from distill.recipe.classification import DataSpec, EvalSpec, ModelSpec, Recipe, StudentSpec, TeacherSpec
from distill.recipe.common import (
    LOG_WITH_HELP,
    MAX_LR,
    Auto,
    DistillSpec,
    EndpointSpec,
    FromTeacher,
    LogWith,
    PositiveOrAuto,
    Seed,
    Strict,
    StudentTrainSpec,
    Tracker,
    TrainSpec,
    auto_needs_validation,
    auto_settings,
    exactly_one_of,
    number_or_auto,
    patience_needs_validation,
    positive_or_auto,
    trackers_installed,
)
from distill.recipe.generate import GenerateRecipe, GenTeacherSpec, PromptsSpec, SamplingSpec, VerifySpec
from distill.recipe.parse import (
    AnyRecipe,
    UniqueKeyLoader,
    apply_overrides,
    load_recipe_as,
    parse_recipe,
    read_recipe,
    recipe_to_yaml,
    validate,
)
from distill.recipe.text import (
    EmbeddingRecipe,
    EmbedDistillSpec,
    EncoderStudentSpec,
    EncoderTeacherSpec,
    StaticSpec,
    TextClassificationRecipe,
    TextDataSpec,
    TextEvalSpec,
)

__all__ = [
    # common
    "Strict",
    "Seed",
    "MAX_LR",
    "exactly_one_of",
    "TrainSpec",
    "Auto",
    "number_or_auto",
    "positive_or_auto",
    "PositiveOrAuto",
    "Tracker",
    "trackers_installed",
    "LogWith",
    "LOG_WITH_HELP",
    "StudentTrainSpec",
    "DistillSpec",
    "auto_settings",
    "patience_needs_validation",
    "auto_needs_validation",
    "FromTeacher",
    "EndpointSpec",
    # task: classification
    "DataSpec",
    "ModelSpec",
    "TeacherSpec",
    "StudentSpec",
    "EvalSpec",
    "Recipe",
    # task: causal_lm
    "LMDataSpec",
    "LMEndpointSpec",
    "LMTeacherSpec",
    "PruneSpec",
    "LMStudentSpec",
    "OnPolicySpec",
    "LMDistillSpec",
    "LMEvalSpec",
    "LMRecipe",
    # task: generate
    "PromptsSpec",
    "GenTeacherSpec",
    "SamplingSpec",
    "VerifySpec",
    "GenerateRecipe",
    # tasks: text_classification, embedding
    "TextDataSpec",
    "EncoderTeacherSpec",
    "StaticSpec",
    "EncoderStudentSpec",
    "TextEvalSpec",
    "TextClassificationRecipe",
    "EmbedDistillSpec",
    "EmbeddingRecipe",
    # reading a recipe
    "AnyRecipe",
    "UniqueKeyLoader",
    "apply_overrides",
    "validate",
    "parse_recipe",
    "read_recipe",
    "load_recipe_as",
    "recipe_to_yaml",
]
