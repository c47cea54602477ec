"""Token-level targets recorded with the traces: the teacher's top log-probabilities for every token it wrote,
kept by ``distill generate`` (``sampling.logprobs``) from a local model or an OpenAI-compatible server.

A trace is trained on as the teacher wrote it: its response is the recorded token sequence (not the text
tokenized again), so position ``t`` of a row carries the teacher's distribution of the token at ``t + 1``:
its top-k log-probabilities, the written token's own log-probability (a server may list it outside the top
k), and the mass of every other token as one tail bucket (``distill.losses.sparse``, top-k mode). A local teacher
records token ids; a server returns text pieces, mapped back to ids through the tokenizer (each id decoded
alone; a piece that several ids decode to is ambiguous and left to the tail). A trace whose written tokens do
not all map is trained on its text alone (sequence level), and counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.data.lm import need_path
from distill.data.token_blocks import TokenData, padded_token_data, prompt_response_rows, prompt_token_ids, read_jsonl
from distill.devices import to_numpy
from distill.errors import DistillError
from distill.losses.sparse import SparseTargets


@dataclass(frozen=True)
class RecordedTargets:
    ids: np.ndarray  # int64 [N, S, k]: at position t, candidates for the token at t + 1
    logp: np.ndarray  # float32 [N, S, k]: their log-probabilities; -inf pads short lists (id: one of the list's)
    tail: np.ndarray  # float32 [N, S]: log of the teacher's probability of every other token
    scored: np.ndarray  # bool [N, S]: position t has the teacher's distribution of the token at t + 1

    def subset(self, idx: np.ndarray) -> RecordedTargets:
        return RecordedTargets(self.ids[idx], self.logp[idx], self.tail[idx], self.scored[idx])

    def __getitem__(self, rows: torch.Tensor) -> tuple[SparseTargets, torch.Tensor]:
        """Sparse targets of ``rows`` (positions whose next token is trained) and the mask of scored ones."""
        idx = to_numpy(rows)
        targets = SparseTargets(
            ids=torch.from_numpy(self.ids[idx]),
            logp=torch.from_numpy(self.logp[idx]),
            tail=torch.from_numpy(self.tail[idx]),
        )
        return targets, torch.from_numpy(self.scored[idx])


def piece_ids(tokenizer) -> dict[str, int]:
    """Text piece → id for every id that decodes alone to a piece no other id decodes to."""
    pieces: dict[str, int] = {}
    ambiguous: set[str] = set()
    for token_id in range(len(tokenizer)):
        piece = tokenizer.decode([token_id])
        if piece in pieces:
            ambiguous.add(piece)
        pieces[piece] = token_id
    return {piece: token_id for piece, token_id in pieces.items() if piece not in ambiguous}


def read_recorded(path: str | Path, prompt_field: str = "prompt") -> list[dict]:
    """Trace records (``traces.kept.jsonl``) that carry per-token log-probabilities; one clear line otherwise."""
    records = []
    for number, record in read_jsonl(path, "trace file"):
        if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
            raise DistillError(f"{path} line {number} needs a JSON object with a string {prompt_field!r}")
        steps = record.get("logprobs")
        if not isinstance(steps, list) or not steps:
            raise DistillError(
                f"{path} line {number} has no per-token log-probabilities: distill.signal 'recorded' trains on "
                "traces generated with sampling.logprobs > 0 (or use signal 'live' / 'cache' with a local teacher)"
            )
        records.append(record)
    if not records:
        raise DistillError(f"trace file {path} has no records")
    return records


def encode_recorded(records: list[dict], tokenizer, max_length: int, *, chat_template: bool = False) -> TokenData:
    """Rows of prompt + the recorded response tokens (+ eos), labels on the response, and the recorded
    teacher distributions at the positions that predict response tokens."""
    vocab = len(tokenizer)
    pieces: dict[str, int] | None = None

    def to_id(token, local: bool) -> int | None:
        nonlocal pieces
        if local:  # ids; JSON turned the keys of "top" into strings
            token_id = int(token)
            if not 0 <= token_id < vocab:
                raise DistillError(
                    f"recorded token id {token_id} is outside the tokenizer's {vocab} ids: the traces were "
                    "written by a model with another vocabulary"
                )
            return token_id
        if pieces is None:
            pieces = piece_ids(tokenizer)
        return pieces.get(token)

    prompts = prompt_token_ids(tokenizer, [r["prompt"] for r in records], chat_template)
    responses, tops, unmapped = [], [], 0
    for record in records:
        local = "tokens" in record  # a local teacher records ids; a server, text pieces
        steps = record["logprobs"]
        written = [to_id(step["token"], local) for step in steps]
        if None in written:
            unmapped += 1
            responses.append(tokenizer(record.get("response", ""), add_special_tokens=False)["input_ids"])
            tops.append(None)
            continue
        responses.append(written)
        row_tops = []
        for token_id, step in zip(written, steps, strict=True):
            top = {to_id(t, local): float(lp) for t, lp in step.get("top", {}).items()}
            top.pop(None, None)  # an ambiguous piece: its mass stays in the tail
            top[token_id] = float(step["logprob"])
            row_tops.append(top)
        tops.append(row_tops)
    if unmapped:
        warnings.warn(
            f"{unmapped} of {len(records)} traces have tokens the tokenizer cannot map back: trained on their "
            "text only (no token-level targets)",
            stacklevel=2,
        )
    rows, kept = prompt_response_rows(prompts, responses, tokenizer, max_length)
    data = padded_token_data(rows, tokenizer, len(records), max_length)
    k = max((len(top) for i in kept if tops[i] for top in tops[i]), default=1)
    n, width = data.input_ids.shape
    ids = np.zeros((n, width, k), dtype=np.int64)
    logp = np.full((n, width, k), -np.inf, dtype=np.float32)
    scored = np.zeros((n, width), dtype=bool)
    for row, index in enumerate(kept):
        start = len(prompts[index]) - 1  # the last prompt position predicts the first response token
        fits = len(rows[row][0]) - len(prompts[index])  # response tokens left after cutting to max_length
        for j, top in enumerate((tops[index] or [])[:fits]):
            # Pad short lists with a candidate already in the list (log-prob -inf: no teacher mass). Any other id
            # would count as a candidate and be left out of the student's tail, so its gradient would be wrong.
            ids[row, start + j] = next(iter(top))
            ids[row, start + j, : len(top)] = list(top)
            logp[row, start + j, : len(top)] = list(top.values())
            scored[row, start + j] = True
    with np.errstate(divide="ignore"):  # the top k may hold all the mass: tail log 0 = -inf, which the loss skips
        mass = np.exp(logp.astype(np.float64)).sum(-1)
        tail = np.where(scored, np.log1p(-np.minimum(mass, 1.0)), -np.inf).astype(np.float32)
    recorded = RecordedTargets(ids, logp, tail, scored)
    return TokenData(data.input_ids, data.labels, data.attention_mask, dropped=data.dropped, recorded=recorded)


def load_recorded(spec, tokenizer) -> TokenData:
    """Every trace of ``spec.path`` (``data.source: jsonl``) as token rows carrying their recorded targets."""
    records = read_recorded(need_path(spec), spec.prompt_field)
    return encode_recorded(records, tokenizer, spec.block_size, chat_template=spec.chat_template)
