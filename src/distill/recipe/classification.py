"""The recipe schema of task: classification (a teacher and a student classifier on arrays: MNIST, digits, npy, csv)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from distill.recipe.common import (
    LOG_WITH_HELP,
    DistillSpec,
    LogWith,
    MixedPrecision,
    Seed,
    Strict,
    StudentTrainSpec,
    TrainSpec,
    auto_needs_validation,
    patience_needs_validation,
)


class DataSpec(Strict):
    source: Literal["mnist", "digits", "npy", "csv"] = "mnist"
    path: str | None = Field(
        default=None,
        description="mnist: folder of idx files (default ~/.cache/distill/mnist); "
        "npy: folder with {train,test}_{x,y}.npy; csv: folder with train.csv and test.csv",
    )
    label_column: str = "label"
    labeled_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    unlabeled_path: str | None = Field(default=None, description=".npy of extra unlabeled training inputs")
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="labeled training examples held out (seeded, stratified) to validate every stage; 0: none",
    )


class ModelSpec(Strict):
    arch: Literal["mlp", "cnn", "python"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [800, 800])
    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32, 64])
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    input_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    factory: str | None = Field(default=None, description="'module:function' returning an nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _factory_for_python(self) -> ModelSpec:
        if self.arch == "python" and not self.factory:
            raise ValueError("arch 'python' needs factory: 'package.module:function'")
        return self


class TeacherSpec(Strict):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(hidden=[1200, 1200], dropout=0.5))
    checkpoint: str | None = Field(default=None, description="safetensors of a trained teacher; else train one")
    train: TrainSpec = Field(default_factory=TrainSpec)


class StudentSpec(Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: StudentTrainSpec = Field(default_factory=StudentTrainSpec)


class EvalSpec(Strict):
    threads: int = Field(default=1, gt=0, description="CPU threads for latency measurements")
    latency_runs: int = Field(default=200, gt=0)


class Recipe(Strict):
    task: Literal["classification"] = "classification"
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    mixed_precision: MixedPrecision = "no"
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    baseline: bool = Field(default=True, description="also train the student on hard labels only")
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _validation_settings_have_a_split(self) -> Recipe:
        auto_needs_validation(self.distill, self.student.train, self.data.validation_fraction)
        if self.teacher.train.select_by in ("kl", "agreement"):
            raise ValueError(
                f"teacher.train.select_by {self.teacher.train.select_by!r} compares with a teacher; the teacher "
                "itself is selected by loss or accuracy"
            )
        for name, train in (("teacher", self.teacher.train), ("student", self.student.train)):
            patience_needs_validation(name, train, self.data.validation_fraction > 0)
        return self
