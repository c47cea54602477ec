"""The recipe schema of task: generate (a teacher writes traces for prompts, verified before they are kept)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.recipe.common import EndpointSpec, Seed, Strict


class PromptsSpec(Strict):
    path: str = Field(description="JSONL, one object per line with the prompt (and the expected answer)")
    prompt_field: str = "prompt"
    answer_field: str = Field(default="answer", description="expected final answer; needed by exact verification")
    id_field: str | None = Field(default="id", description="record id; the line number when absent")
    chat_template: bool = Field(default=True, description="local teachers: wrap prompts in the tokenizer's template")
    system: str | None = None


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
