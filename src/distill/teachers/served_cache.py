"""The LM teacher cache from a served teacher: each training block is sent as token ids to an OpenAI-compatible
``/v1/completions`` that returns prompt log-probabilities (vLLM's ``prompt_logprobs``: for every prompt position, the
top-k token ids with their log-probabilities, plus the prompt's own token), and the answer becomes the same top-k +
tail records the local teacher writes.

Tokens are checked, never assumed: the server must answer one entry per token we sent, and each entry must hold
the token we sent at that position; otherwise the build stops naming the block, the position and both tokens.
What a server returns is at temperature 1: the recipe check (``recipe._check_served_teacher``) refuses another
temperature, sampled caches and the chat API before any request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from distill.errors import DistillError
from distill.recipe import EndpointSpec
from distill.teachers.served import MALFORMED, Retryable, as_logprob, with_retries


def request_body(endpoint: EndpointSpec, ids: list[int], k: int) -> dict:
    return {"model": endpoint.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}


def parse_prompt_logprobs(answer: dict, n_tokens: int) -> list:
    """The answer's per-position entries ({id: log-prob}; None at position 0); Retryable when it has none or they
    are malformed, which another try may not repeat."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
        if not isinstance(entries, list):
            raise TypeError
        parsed = [None]
        for entry in entries[1:]:
            parsed.append({int(token): as_logprob(value["logprob"] if isinstance(value, dict) else value)
                           for token, value in entry.items()})  # fmt: skip
    except MALFORMED:
        raise Retryable(f"answer without prompt log-probabilities for {n_tokens} tokens") from None
    return parsed


def block_logprobs(endpoint: EndpointSpec, ids: list[int], k: int) -> list:
    """One block through the server, retried as a generation request is (``served.with_retries``)."""
    def parse(answer: dict) -> list:
        return parse_prompt_logprobs(answer, len(ids))

    try:
        return with_retries(endpoint, parse, request_body(endpoint, ids, k))
    except Retryable as exc:
        raise DistillError(
            f"teacher.endpoint: a block failed {endpoint.retries + 1} times ({exc}); the shards written so far are "
            "kept: rerun `distill cache` to go on"
        ) from None


def check_alignment(entries: list, ids: list[int], block: int, decode: Callable[[list[int]], str]) -> None:
    """Every position must be the token we sent: a server that tokenised the block itself would silently shift
    every target by a token."""
    if len(entries) != len(ids):
        raise DistillError(
            f"served teacher: block {block}: the server answered {len(entries)} positions for the {len(ids)} tokens "
            "sent: it does not read prompts as token ids of the teacher's tokenizer"
        )
    for position in range(1, len(ids)):
        if ids[position] not in entries[position]:
            theirs = max(entries[position], key=entries[position].get, default=None)
            raise DistillError(
                f"served teacher: block {block}, position {position}: we sent token {ids[position]} "
                f"({decode([ids[position]])!r}) but the server's entry lacks it (its most likely there: {theirs} "
                f"({decode([theirs]) if theirs is not None else ''!r})); serve the teacher with the recipe's "
                "tokenizer"
            )


def as_logits(entries: list, vocab_size: int, k: int) -> torch.Tensor:
    """Log-probabilities [S, vocab_size] whose top k are the server's and whose rest share the tail evenly, so that
    the cache's top-k and tail come out as the server gave them. Position t predicts token t + 1 (entry t + 1); the
    last position predicts a token outside the block, which no loss reads (``SparseSignal`` drops it): it is
    uniform."""
    n = len(entries)
    # float64: the tail is spread over ~vocab_size tiny entries, and a float32 softmax summing them drifts by 1e-4.
    out = torch.full((n, vocab_size), -math.log(vocab_size), dtype=torch.float64)
    for t in range(n - 1):
        top = sorted(((v, i) for i, v in entries[t + 1].items() if i < vocab_size), reverse=True)[:k]
        mass = sum(math.exp(v) for v, _ in top)
        rest = math.log(max(1.0 - mass, 1e-30) / max(vocab_size - len(top), 1))
        out[t].fill_(rest)
        out[t, [i for _, i in top]] = torch.tensor([v for v, _ in top], dtype=torch.float64)
    return out


def served_teacher_logits(
    endpoint: EndpointSpec, vocab_size: int, k: int, decode: Callable[[list[int]], str], train_ids: np.ndarray
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``teacher_logits_fn`` for ``build_lm_cache``: a batch of blocks [B, S] asked of the server ``concurrency``
    at a time. ``train_ids``: the training blocks, so that an error names the block by its index."""
    index = {}
    for i, row in enumerate(np.asarray(train_ids, dtype=np.int64)):
        index.setdefault(row.tobytes(), i)

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        rows = [row.tolist() for row in input_ids]
        with ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
            answers = list(pool.map(lambda ids: block_logprobs(endpoint, ids, k), rows))
        for entries, ids in zip(answers, rows, strict=True):
            check_alignment(entries, ids, index.get(np.asarray(ids, dtype=np.int64).tobytes(), -1), decode)
        return torch.stack([as_logits(entries, vocab_size, k) for entries in answers])

    return logits
