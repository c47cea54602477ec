"""``distill generate``: the teacher answers prompts with step-by-step solutions, record by record.

Every finished (prompt id, sample) is appended to the output JSONL as one line, flushed and fsynced, so a
killed run loses at most the record being written; a restart skips what is done (a cut-short last line is
cut off first). At the end the verified traces go to ``<out>.kept.jsonl`` (prompt/response pairs, the
format ``data.source: jsonl`` trains on) and the counts to ``<out>.summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState

from distill.data.token_blocks import read_jsonl
from distill.errors import DistillError
from distill.io import atomic_path, write_json
from distill.models.causal_lm import load_causal_lm, resolve_model_path
from distill.recipe import GenerateRecipe, SamplingSpec
from distill.tasks.verify import make_scorer, verdict


@dataclass(frozen=True)
class Job:
    """One completion to write: a prompt record and which of its samples."""

    id: str
    sample: int
    record: dict


def read_prompts(recipe: GenerateRecipe) -> list[dict]:
    """The prompt records, each with 'id', 'prompt' and (when present) 'answer'; a bad line stops the run before
    any generation, naming the line."""
    spec = recipe.prompts
    path = Path(spec.path).expanduser()
    records, seen = [], set()
    for number, raw in read_jsonl(path, "prompts file"):
        if not isinstance(raw, dict) or not isinstance(raw.get(spec.prompt_field), str):
            raise DistillError(f"{path} line {number} needs a JSON object with a string field {spec.prompt_field!r}")
        rid = str(raw[spec.id_field]) if spec.id_field and spec.id_field in raw else str(number)
        if rid in seen:
            raise DistillError(f"{path} line {number}: id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
        answer = raw.get(spec.answer_field)
        records.append({**raw, "id": rid, "prompt": raw[spec.prompt_field], "answer": answer})
    if not records:
        raise DistillError(f"prompts file {path} has no records")
    return records


def finished(out: Path) -> set[tuple[str, int]]:
    """(id, sample) of the records already in ``out``; a cut-short last line (a killed write) is removed."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    done = set()
    for number, line in enumerate(data[:keep].splitlines(), start=1):
        try:
            record = json.loads(line)
            done.add((str(record["id"]), int(record["sample"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DistillError(f"{out} line {number} is not a trace record; move the file away to start over") from None
    if keep < len(data):
        with out.open("r+b") as f:
            f.truncate(keep)
        print(f"{out}: removed a cut-short last record (the run was killed while writing it)")
    return done


def pending_jobs(prompts: list[dict], samples: int, done: set[tuple[str, int]]) -> list[Job]:
    return [Job(r["id"], k, r) for r in prompts for k in range(samples) if (r["id"], k) not in done]


class TraceWriter:
    """Appends one JSON line per trace, durable before the next one starts."""

    def __init__(self, out: Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.file = out.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def render_prompt(tokenizer, prompt: str, recipe: GenerateRecipe) -> str:
    """The text a local teacher is given: the chat template when asked for and the tokenizer has one."""
    if recipe.prompts.chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": recipe.prompts.system}] if recipe.prompts.system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt if recipe.prompts.system is None else f"{recipe.prompts.system}\n\n{prompt}"


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def generate_local(model, tokenizer, texts: list[str], sampling: SamplingSpec, seed: int) -> list[dict]:
    """Completions of ``texts`` in one batched ``generate`` call (left padding, KV cache): text, token ids, and the
    top log-probabilities per generated token when ``sampling.logprobs`` > 0."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = sampling.temperature == 0
    vocab = len(tokenizer)
    padded_rows = list(range(vocab, model.get_output_embeddings().weight.shape[0]))  # not tokens: never written
    torch.manual_seed(seed)
    out = model.generate(
        **batch,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad,
        suppress_tokens=padded_rows or None,
        return_dict_in_generate=True,
        output_logits=sampling.logprobs > 0,
    )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    stop = _stop_ids(model, tokenizer)
    results = []
    for row, ids in enumerate(new.tolist()):
        length = next((end + 1 for end, token in enumerate(ids) if token in stop), len(ids))
        ids = ids[:length]
        result = {
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": ids,
            "finish_reason": "stop" if ids and ids[-1] in stop else "length",
        }
        if sampling.logprobs:
            steps = [step[row, :vocab] for step in out.logits[:length]]
            result["logprobs"] = _top_logprobs(steps, ids, sampling.logprobs)
        results.append(result)
    return results


def _stop_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _top_logprobs(step_logits: list[torch.Tensor], ids: list[int], k: int) -> list[dict]:
    """Per generated token: its log-probability and the teacher's top-k (token id → log-probability)."""
    rows = []
    for logits, token in zip(step_logits, ids, strict=True):
        logp = F.log_softmax(logits.float(), dim=-1)
        top = logp.topk(k)
        rows.append(
            {
                "token": token,
                "logprob": float(logp[token]),
                "top": dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
            }
        )
    return rows


def local_completions(recipe: GenerateRecipe, jobs: list[Job]) -> Iterable[tuple[Job, dict]]:
    model, tokenizer = load_causal_lm(resolve_model_path(recipe.teacher.path), dtype=recipe.teacher.dtype)
    model.to(PartialState().device).eval()  # the accelerator when there is one: generation is the slow part
    for group in batched(jobs, recipe.sampling.batch_size):
        texts = [render_prompt(tokenizer, job.record["prompt"], recipe) for job in group]
        seed = recipe.seed * 1_000_003 + hash_key(group[0])
        for job, text, result in zip(
            group, texts, generate_local(model, tokenizer, texts, recipe.sampling, seed), strict=True
        ):
            yield job, {"prompt": text, **result}


def hash_key(job: Job) -> int:
    """A stable seed per batch (from its first job), so a resumed run samples what the first run would have."""
    import zlib

    return zlib.crc32(f"{job.id}/{job.sample}".encode())


def generate(recipe: GenerateRecipe, out: Path) -> dict:
    """Write every missing trace to ``out``, then the kept traces and the counts; returns the counts."""
    out = Path(out)
    prompts = read_prompts(recipe)
    scorer = make_scorer(recipe.verify)
    jobs = pending_jobs(prompts, recipe.sampling.samples, finished(out))
    print(f"{len(jobs)} of {len(prompts) * recipe.sampling.samples} traces to write ({len(prompts)} prompts)")
    writer = TraceWriter(out)
    failures: list[str] = []
    completions = None
    try:
        if recipe.teacher.endpoint is not None:
            from distill.teachers.served import served_completions

            completions = served_completions(recipe, jobs, failures)
        else:
            completions = local_completions(recipe, jobs)
        for job, result in completions:
            checked = verdict(scorer, result["completion"], job.record, recipe.verify.min_score)
            record = {
                "id": job.id,
                "sample": job.sample,
                "question": job.record["prompt"],
                "answer": job.record["answer"],
            }
            writer.write({**record, **result, **checked})
    finally:
        if completions is not None:  # now, not when the traceback goes: a served teacher's requests are cut here
            completions.close()
        writer.close()
    summary = summarize(out, recipe)
    if failures:
        raise DistillError(
            f"{len(failures)} request(s) failed after {recipe.teacher.endpoint.retries} retries "
            f"(last: {failures[-1]}); "
            f"the {summary['traces']} finished traces are kept in {out}: run the same command again to retry the rest"
        )
    return summary


def summarize(out: Path, recipe: GenerateRecipe) -> dict:
    """Kept traces → ``<out>.kept.jsonl`` (atomically), counts → ``<out>.summary.json``."""
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in records if r.get("correct") is not False]
    errors = [r["verify_error"] for r in records if "verify_error" in r]
    with atomic_path(kept_path(out)) as tmp:
        tmp.write_text(
            "".join(
                json.dumps(
                    {"prompt": r["prompt"], "response": r["completion"], "id": r["id"], "sample": r["sample"]}
                    # the written tokens and their log-probabilities: token-level targets (distill.signal: recorded)
                    | {key: r[key] for key in ("tokens", "logprobs") if key in r},
                    ensure_ascii=False,
                )
                + "\n"
                for r in kept
            ),
            encoding="utf-8",
        )
    summary = {
        "traces": len(records),
        "kept": len(kept),
        "dropped": len(records) - len(kept),
        "verifier_errors": len(errors),
        "first_verifier_error": errors[0] if errors else None,
        "verify": recipe.verify.method,
        "kept_file": str(kept_path(out)),
    }
    write_json(out.with_name(out.name + ".summary.json"), summary)
    return summary


def kept_path(out: Path) -> Path:
    return out.with_name(out.stem + ".kept.jsonl")
