"""What every task's recipe schema is built from: the ``Strict`` base, the settings several tasks share (training,
distillation, trackers, a student cut from its teacher, a served endpoint) and the ``auto`` helpers and checks.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from distill.losses.divergences import PER_POSITION


class Strict(BaseModel):
    # No recipe number is meant to be infinite or NaN ("no limit" is null, e.g. max_grad_norm): refused on every
    # float, so `lr: .nan` or `temperature: .inf` fail when the recipe is read, not as a NaN loss hours later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# torch, numpy and Python all take 0..2**32-1 (numpy refuses a negative seed), with room for the offsets we add.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# A learning rate above 10 diverges with any optimizer and data we train on: a typo (1e308 for 1e-3), not a choice.
MAX_LR = 10.0
# YAML 1.1 reads a bare `no` as false: `mixed_precision: no` (and `--set mixed_precision=no`) mean the word.
# `auto`: bf16 on a CPU with native bf16 matmul, float32 elsewhere (train.resolve_precision).
MixedPrecision = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(lambda v: "no" if v is False else v)]


def exactly_one_of(spec: Strict, *keys: str) -> Strict:
    """Validator body: exactly one of ``keys`` is set."""
    given = [k for k in keys if getattr(spec, k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(keys)} (got {', '.join(given) or 'none'})")
    return spec


class TrainSpec(Strict):
    epochs: int = Field(default=3, gt=0)
    max_steps: int | None = Field(
        default=None, gt=0, description="a budget in optimizer steps instead of epochs (as many epochs as it takes)"
    )
    batch_size: int = Field(default=128, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0, le=MAX_LR)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0.0)
    jitter: int = Field(default=0, ge=0, le=8, description="random ±pixels shift of image inputs")
    fsdp: bool = Field(
        default=False,
        description="under several processes, shard parameters, gradients and "
        "optimizer state (FSDP) instead of replicating them (DDP)",
    )
    log_every: int = Field(default=20, gt=0)
    checkpoint_every: int = Field(default=200, gt=0, description="optimizer steps between checkpoints")
    eval_every: int | None = Field(
        default=None, gt=0, description="optimizer steps between validations (default: once per epoch)"
    )
    select_by: Literal["loss", "accuracy", "kl", "agreement"] = Field(
        default="loss", description="validation metric whose best value picks the weights the stage keeps"
    )
    patience: int | None = Field(
        default=None, gt=0, description="stop after this many validations without a better select_by value"
    )

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> TrainSpec:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        return self


Auto = Literal["auto"]


def number_or_auto(value):
    """A number written as a string read as one, as the plain float fields do: PyYAML reads ``1e-3`` (no dot) as a
    string, and ``lr: 1e-3`` would be refused as not a number."""
    if isinstance(value, str) and value != "auto":
        try:
            return float(value)
        except ValueError:
            pass
    return value


def positive_or_auto(value):
    """Validator body: a number > 0, or the word auto (left to a search on the validation data)."""
    value = number_or_auto(value)
    if value != "auto" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0
    ):
        raise ValueError("must be a number > 0, or auto")
    return value


PositiveOrAuto = Annotated[float | Auto, BeforeValidator(positive_or_auto)]


Tracker = Literal["tensorboard", "mlflow", "trackio", "aim"]


def trackers_installed(names: list[str]) -> list[str]:
    """Validator body: every tracker's package imports. Checked when the recipe is read, because accelerate would
    drop a missing tracker with a debug message and the run would train for hours without logging to it."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"{name} needs the {name} package: pip install {name}")
    return names


LogWith = Annotated[list[Tracker], AfterValidator(trackers_installed)]
LOG_WITH_HELP = (
    "experiment trackers the training loop also logs to, through accelerate (files under RUN/trackers/ where the "
    "tracker keeps them locally); log.jsonl stays the record"
)


class StudentTrainSpec(TrainSpec):
    """A student's training settings: its learning rate may be left to the sweep on the validation split."""

    lr: PositiveOrAuto = Field(default=0.1, description="auto: chosen by a sweep on validation (baseline and student)")

    @field_validator("lr")
    @classmethod
    def _sane_lr(cls, value):
        if value != "auto" and value > MAX_LR:
            raise ValueError(f"must be at most {MAX_LR:g} (a learning rate above it diverges), or auto")
        return value


class DistillSpec(Strict):
    loss: str = "forward_kl"
    temperature: PositiveOrAuto = Field(
        default=4.0, description="softening of both distributions; auto: chosen by a sweep on validation"
    )
    alpha: float | Auto = Field(
        default=0.0, description="weight of hard-label cross-entropy; auto: chosen by the sweep"
    )
    auto_epochs: int | None = Field(
        default=None,
        gt=0,
        description="epochs each candidate of the auto sweep trains (default: a quarter of student.train.epochs, "
        "at least 1)",
    )
    t2_scaling: bool = True
    beta: float = Field(default=0.5, ge=0.0, le=1.0, description="jsd only")
    skew: float = Field(default=0.1, ge=0.0, lt=1.0, description="skew_kl only")
    signal: Literal["cache", "live"] = "cache"
    cache_dir: str | None = Field(default=None, description="where the teacher cache lives; default RUN/cache")

    @field_validator("alpha", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        value = number_or_auto(value)
        if value != "auto" and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise ValueError("must be a number, or auto")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha_is_a_weight(cls, value):
        if value != "auto" and not 0 <= value <= 1:
            raise ValueError("must be between 0 and 1, or auto")
        return value

    @model_validator(mode="after")
    def _known_loss(self) -> DistillSpec:
        if self.loss not in PER_POSITION:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(sorted(PER_POSITION))}")
        return self

    def divergence_kwargs(self) -> dict[str, float]:
        return {"jsd": {"beta": self.beta}, "skew_kl": {"alpha": self.skew}}.get(self.loss, {})

    @property
    def auto_keys(self) -> list[str]:
        """The distillation settings left to the sweep on the validation split."""
        return [key for key in ("temperature", "alpha") if getattr(self, key) == "auto"]


def auto_settings(distill: DistillSpec, student: TrainSpec) -> list[str]:
    """Every setting left to the sweep on the validation split, as its recipe key."""
    keys = [f"distill.{key}" for key in distill.auto_keys]
    return keys + (["student.train.lr"] if student.lr == "auto" else [])


def patience_needs_validation(name: str, train: TrainSpec, has_split: bool) -> None:
    """Validator body: early stopping counts validations, so there must be a validation split."""
    if train.patience and not has_split:
        raise ValueError(
            f"{name}.train.patience needs a validation split: set data.validation_fraction > 0 (e.g. 0.1) or drop "
            "patience"
        )


def auto_needs_validation(distill: DistillSpec, student: TrainSpec, validation_fraction: float) -> None:
    """Validator body: ``auto`` settings are chosen on the validation split, so there must be one."""
    if (keys := auto_settings(distill, student)) and validation_fraction == 0:
        raise ValueError(
            f"{keys[0]}: auto is chosen on the validation split: set data.validation_fraction > 0 (e.g. 0.1) or give "
            "a number"
        )


class FromTeacher(Strict):
    layers: list[int] | None = None
    every: int | None = Field(default=None, gt=0)
    keep: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> FromTeacher:
        return exactly_one_of(self, "layers", "every", "keep")


class EndpointSpec(Strict):
    url: str = Field(description="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1")
    model: str = "default"
    api: Literal["chat", "completions"] = "chat"
    concurrency: int = Field(default=4, gt=0, le=256)
    retries: int = Field(default=5, ge=0, description="per request, on connection errors, 429, 5xx, bad JSON")
    backoff: float = Field(default=0.5, gt=0.0, description="seconds before the first retry, doubled each time")
    timeout: float = Field(default=120.0, gt=0.0, le=3600.0, description="seconds per request, the whole of it")
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        # Only a server is asked: file:// (or any other scheme urllib opens) would read a local file.
        parts = urlsplit(value)
        _ = parts.port  # a port that is no number in 0..65535 raises ValueError here
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("give the http:// or https:// address of the server, e.g. http://127.0.0.1:8080/v1")
        if parts.username or parts.password:  # it would be printed in every error line; keys go in api_key_env
            raise ValueError("put no credentials in the URL; name the variable holding the API key in api_key_env")
        return value
