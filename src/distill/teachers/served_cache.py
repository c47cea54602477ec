"""The LM teacher cache from a served teacher: each training block goes to an OpenAI-compatible ``/v1/completions``
that returns the log-probabilities of the prompt's own tokens, and the answer becomes the same top-k + tail records
the local teacher writes. Two formats (``teacher.endpoint.format``):

- ``prompt_logprobs`` (vLLM): the block is sent as token ids; for every position the answer holds the top-k token ids
  with their log-probabilities, plus the prompt's own token.
- ``echo`` (``echo: true, logprobs: k``: llama-cpp-python's server, OpenAI-style legacy completions): the answer
  lists the prompt's tokens as text pieces, each with a ``{piece: log-prob}`` dict of alternatives. Pieces are mapped
  back to our ids through our tokenizer's spelling of every id; a piece that several of our ids spell (llama.cpp
  writes a token's bytes decoded with errors ignored, so a lone byte of a multi-byte character reads as "", or as " "
  after a space; control tokens read as "") cannot be placed: that alternative is dropped, its probability left in
  the tail, and counted (meta.json ``teacher_counts``). The block goes as token ids, or as its text where the server
  refuses ids (llama-cpp-python's server takes only text), which the server tokenises itself.

  Which token an echo dict is for is not taken on trust: before the first block a probe compares the server's echo
  of a few tokens with the distribution it gives for the next token of a plain completion. Servers following the
  OpenAI convention list at position t the distribution that predicts token t; llama-cpp-python (without a BOS)
  lists there the distribution after token t, and null at position 0, so for that layout the distribution of token 1
  is asked separately (a one-token completion). Anything else is refused.

Tokens are checked, never assumed: the server must have read our tokens at every position of every block (ids for
prompt_logprobs; pieces for echo). A block it read differently stops the build naming the block, the position and
both tokens, or with ``on_mismatch: skip`` is skipped: it gets no teacher targets, the cache lists it in meta.json
``skipped_blocks`` and ``LMCache.lookup`` leaves it out of the distillation. What a server returns is at temperature
1: the recipe check (``recipe._check_served_teacher``) refuses another temperature, sampled caches and the chat API
before any request.

Answers are checked before use, and a malformed one is retried like a failed request (``served.with_retries``), then
named: a negative token id (it would index the vocabulary from its end), alternatives whose probabilities add up to
more than 1. Ids past our vocabulary (a server's padded rows) are left in the tail and counted
(``dropped_outside_vocabulary``). Ctrl-C cuts the requests in flight (``served.Stop``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distill.errors import DistillError
from distill.recipe import EndpointSpec
from distill.teachers.lm_cache import TeacherAnswer
from distill.teachers.served import (
    MALFORMED,
    MASS_SLACK,
    Refused,
    Retryable,
    Stop,
    as_logprob,
    post,
    results,
    with_retries,
)

# Two distributions a server computed for the same context differ by its arithmetic only (batching, kernels): the
# probe takes log-probabilities this close as the same distribution, and a shifted one differs by far more.
SAME_DISTRIBUTION = 1e-2
PROBE_TOKENS = 4


def request_body(endpoint: EndpointSpec, ids: list[int], k: int) -> dict:
    return {"model": endpoint.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}


def parse_prompt_logprobs(answer: dict, n_tokens: int) -> list:
    """The answer's per-position entries ({id: log-prob}; None at position 0); Retryable when it has none or they
    are malformed, which another try may not repeat."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
        if not isinstance(entries, list):
            raise TypeError
    except MALFORMED:
        raise Retryable(f"answer without prompt log-probabilities for {n_tokens} tokens") from None
    parsed = [None]
    for t, entry in enumerate(entries[1:], 1):
        try:
            parsed.append({int(token): as_logprob(value["logprob"] if isinstance(value, dict) else value)
                           for token, value in entry.items()})  # fmt: skip
        except MALFORMED:
            raise Retryable(f"malformed prompt log-probabilities at position {t}: {json.dumps(entry)[:80]}") from None
        problem = implausible(parsed[-1])
        if problem:
            raise Retryable(f"malformed prompt log-probabilities at position {t}: {problem}")
    return parsed


def implausible(alternatives: dict) -> str | None:
    """What makes one position's alternatives ({id or piece: log-prob}) no distribution, None if nothing: a negative
    id (it would index the vocabulary from its end), probabilities adding up to more than 1 (past servers' rounding).
    """
    negative = [i for i in alternatives if isinstance(i, int) and i < 0]
    if negative:
        return f"token id {negative[0]} is negative"
    mass = sum(math.exp(v) for v in alternatives.values())
    return f"alternatives whose probabilities add up to {mass:.4g}, more than 1" if mass > 1 + MASS_SLACK else None


def asked(endpoint: EndpointSpec, parse: Callable[[dict], object], body: dict, stop: Stop | None = None):
    """One request through the server, retried as a generation request is (``served.with_retries``)."""
    try:
        return with_retries(endpoint, parse, body, stop=stop)
    except Retryable as exc:
        raise DistillError(
            f"teacher.endpoint: a block failed {endpoint.retries + 1} times ({exc}); the shards written so far are "
            "kept: rerun `distill cache` to go on"
        ) from None


def block_logprobs(endpoint: EndpointSpec, ids: list[int], k: int, stop: Stop | None = None) -> list:
    """One block's prompt log-probabilities (vLLM's ``prompt_logprobs``)."""
    body = request_body(endpoint, ids, k)
    return asked(endpoint, lambda answer: parse_prompt_logprobs(answer, len(ids)), body, stop)


def misaligned(entries: list, ids: list[int], block: int, decode: Callable[[list[int]], str]) -> str | None:
    """Why the server's prompt_logprobs entries are not for our tokens (None when every position holds the token we
    sent): a server that tokenised the block itself would silently shift every target by a token."""
    if len(entries) != len(ids):
        return (
            f"served teacher: block {block}: the server answered {len(entries)} positions for the {len(ids)} tokens "
            "sent: it does not read prompts as token ids of the teacher's tokenizer"
        )
    for position in range(1, len(ids)):
        if ids[position] not in entries[position]:
            theirs = max(entries[position], key=entries[position].get, default=None)
            return (
                f"served teacher: block {block}, position {position}: we sent token {ids[position]} "
                f"({decode([ids[position]])!r}) but the server's entry lacks it (its most likely there: {theirs} "
                f"({decode([theirs]) if theirs is not None else ''!r})); serve the teacher with the recipe's "
                "tokenizer"
            )
    return None


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


# ---- echo + logprobs ----


def _decode(decode: Callable, ids: list[int], **options) -> str:
    """``decode`` with tokenizer options where it takes them (an HF tokenizer's decode), plain otherwise."""
    try:
        return decode(ids, clean_up_tokenization_spaces=False, **options)
    except TypeError:
        return decode(ids)


class Pieces:
    """How a server may write each of our token ids as text, and which ids a piece of text can stand for.

    A token's spellings: its decoded text; that text without U+FFFD (a token holding part of a multi-byte character
    decodes with a replacement character, and llama.cpp decodes its bytes with errors ignored); "" for special tokens
    (llama.cpp writes control tokens as nothing)."""

    def __init__(self, decode: Callable, vocab_size: int):
        self.decode = decode
        self.spellings: list[frozenset[str]] = []
        self.ids_of: dict[str, list[int]] = {}
        for i in range(vocab_size):
            text = _decode(decode, [i])
            spellings = frozenset({text, text.replace("\ufffd", ""), _decode(decode, [i], skip_special_tokens=True)})
            self.spellings.append(spellings)
            for spelling in spellings:
                self.ids_of.setdefault(spelling, []).append(i)

    def spelled(self, i: int) -> str:
        return _decode(self.decode, [i])

    def text(self, ids: list[int]) -> str:
        return _decode(self.decode, ids)

    def misread(self, pieces: list[str], ids: list[int], block: int, offset: int = 0) -> str | None:
        """Why the server's ``pieces`` are not our ``ids`` (None when each piece spells its id); positions are
        reported from ``offset`` (a probe window inside a block)."""
        for t, i in enumerate(ids):
            if t >= len(pieces):
                return (
                    f"served teacher: block {block}: the server read {len(pieces)} tokens where we sent {len(ids)}: "
                    "it tokenised the text otherwise"
                )
            if pieces[t] not in self.spellings[i]:
                return (
                    f"served teacher: block {block}, position {offset + t}: we sent token {i} ({self.spelled(i)!r}) "
                    f"but the server read {pieces[t]!r}; serve the teacher with the recipe's tokenizer"
                )
        return None


@dataclass
class Echo:
    """A completion's ``logprobs``: one text piece per token, its log-prob and its alternatives ({piece: log-prob};
    None where the server gave none), and the prompt's length as the server counted it (None if not said)."""

    pieces: list[str]
    values: list[float | None]
    tops: list[dict[str, float] | None]
    prompt_tokens: int | None


def parse_echo(answer: dict) -> Echo:
    """The first choice's ``logprobs``; Retryable when they are missing or malformed. A -inf alternative carries
    nothing and is dropped (as ``served.top_k`` does)."""
    try:
        logprobs = answer["choices"][0]["logprobs"]
        pieces, values, tops = (logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs"))
        if not (isinstance(pieces, list) and isinstance(values, list) and isinstance(tops, list)):
            raise TypeError
        if not len(pieces) == len(values) == len(tops) or not all(isinstance(p, str) for p in pieces):
            raise ValueError
        values = [None if v is None else as_logprob(v) for v in values]
        tops = [
            None if top is None else {str(piece): as_logprob(v) for piece, v in top.items() if v != -math.inf}
            for top in tops
        ]
        usage = answer.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    except MALFORMED:
        raise Retryable(f"answer without echo log-probabilities: {str(answer)[:80]}") from None
    for t, top in enumerate(tops):
        problem = implausible(top or {})
        if problem:
            raise Retryable(f"malformed echo log-probabilities at position {t}: {problem}")
    return Echo(pieces, values, tops, prompt_tokens if type(prompt_tokens) is int else None)


def distance(a: dict[str, float] | None, b: dict[str, float] | None, leave_out: str) -> float:
    """How far apart two alternatives dicts are: the largest log-prob difference over the pieces both list (less
    ``leave_out``, a piece the server adds for the token listed there); inf when they share too few pieces to say."""
    if not a or not b:
        return math.inf
    common = (a.keys() & b.keys()) - {leave_out}
    if len(common) < max(1, min(len(a), len(b)) // 2):
        return math.inf
    return max(abs(a[p] - b[p]) for p in common)


class EchoClient:
    """Blocks asked with ``echo: true, logprobs: k`` and read back into prompt_logprobs-style entries
    ({id: log-prob} per position, None at position 0)."""

    def __init__(self, endpoint: EndpointSpec, vocab_size: int, k: int, decode: Callable):
        self.endpoint, self.k = endpoint, k
        self.pieces = Pieces(decode, vocab_size)
        self.layout: str | None = None  # "current" (OpenAI: dict t predicts token t) | "next" (after token t)
        self.prompt = "ids"  # or "text", where the server refuses token ids
        self.refused: str | None = None  # what the server answered to token ids ("" when it took them)
        self.lock = threading.Lock()
        self.counts = {"alternatives": 0, "dropped_ambiguous": 0, "dropped_unknown": 0}
        self.stop = Stop()  # one per batch of blocks (``served_teacher_logits``)

    @property
    def notes(self) -> dict:
        return {"format": "echo", "layout": self.layout, "prompt": self.prompt}

    def ask(self, ids: list[int], echo: bool, once: bool = False) -> Echo:
        """The server's answer for ``ids``, retried (``once``: one try, whose failure raises Refused or Retryable)."""
        prompt = ids if self.prompt == "ids" else self.pieces.text(ids)
        body = {"model": self.endpoint.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        body |= {"logprobs": self.k, "echo": True} if echo else {"logprobs": self.k}
        if once:
            return parse_echo(post(self.endpoint, body, self.stop))
        return asked(self.endpoint, parse_echo, body, self.stop)

    def mapped(self, top: dict[str, float] | None, listed: int | None) -> dict[int, float]:
        """A dict of alternatives as {our id: log-prob}. The piece of the token listed there (``listed``) is that
        token: the server puts it in the dict. Any other piece stands for the one id that spells it; a piece
        several ids spell, or none, is dropped and counted."""
        out, ambiguous, unknown = {}, 0, 0
        for piece, value in (top or {}).items():
            if listed is not None and piece in self.pieces.spellings[listed]:
                out[listed] = value
                continue
            ids = self.pieces.ids_of.get(piece, ())
            if len(ids) == 1:
                out[ids[0]] = value
            elif ids:
                ambiguous += 1
            else:
                unknown += 1
        with self.lock:
            self.counts["alternatives"] += len(top or {})
            self.counts["dropped_ambiguous"] += ambiguous
            self.counts["dropped_unknown"] += unknown
        return out

    def take_counts(self) -> dict[str, int]:
        with self.lock:
            counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def settle(self, rows: list[list[int]], blocks: list[int]) -> None:
        """Once, before the first block: whether the server takes token ids, and which token its dicts are for."""
        if self.layout is not None:
            return
        reasons = []
        for ids, block in zip(rows[:4], blocks[:4], strict=False):
            for start in range(0, max(len(ids) - PROBE_TOKENS, 0) + 1, PROBE_TOKENS)[:3]:
                reason = self.probe(ids[start : start + PROBE_TOKENS], block, start)
                if reason is None:
                    sent = "token ids" if self.prompt == "ids" else f"text (token ids: {self.refused})"
                    print(
                        f"served teacher {self.endpoint.url}: echo log-probabilities, blocks sent as {sent}; the "
                        "server lists at each position the distribution "
                        f"{'of that token' if self.layout == 'current' else 'after that token'}",
                        flush=True,
                    )
                    return
                reasons.append(reason)
        raise DistillError(
            "teacher.endpoint (format echo): cannot tell which token the server's log-probabilities are for, or it "
            f"reads other tokens: {reasons[-1] if reasons else 'blocks shorter than 4 tokens'}"
        )

    def probe(self, window: list[int], block: int, start: int) -> str | None:
        """Settle the layout on one window of ``PROBE_TOKENS`` tokens, or say why it cannot: the echo of the window
        holds, at position 3 (OpenAI) or 2 (after token 2: llama-cpp-python), the distribution that a plain
        completion of the window's first 3 tokens gives for the next token."""
        if len(window) < PROBE_TOKENS:
            return f"block {block} has fewer than {PROBE_TOKENS} tokens"
        if self.refused is None:  # the first try: are token ids taken?
            self.refused = ""
            try:
                echo = self.ask(window, echo=True, once=True)
            except (Refused, Retryable) as exc:  # llama-cpp-python's server: "prompt: should be a string" (HTTP 500)
                self.prompt, self.refused = "text", " ".join(str(exc).split())[:100]
                echo = self.ask(window, echo=True)
        else:
            echo = self.ask(window, echo=True)
        problem = self.pieces.misread(echo.pieces, window, block, start)
        if problem:
            return problem
        after = self.ask(window[:-1], echo=False)
        if not after.tops or not after.tops[0]:
            return "the server's completion has no log-probabilities"
        n = PROBE_TOKENS - 1
        current = distance(echo.tops[n], after.tops[0], echo.pieces[n])
        shifted = distance(echo.tops[n - 1], after.tops[0], echo.pieces[n - 1])
        if (current <= SAME_DISTRIBUTION) != (shifted <= SAME_DISTRIBUTION):
            self.layout = "current" if current <= SAME_DISTRIBUTION else "next"
            return None
        return (
            f"on block {block}, tokens {start}-{start + n}, the next-token distribution of a completion matches "
            f"{'both' if current <= SAME_DISTRIBUTION else 'neither'} of the echo's positions {n} (difference "
            f"{current:.3g}) and {n - 1} ({shifted:.3g})"
        )

    def entries(self, ids: list[int], block: int) -> list | str:
        """The block's entries (position t: {id: log-prob} of the distribution that predicts token t), or why the
        server's reading of the block is not ours."""
        echo = self.ask(ids, echo=True)
        problem = self.pieces.misread(echo.pieces, ids, block)
        if problem:
            return problem
        if self.layout == "current":  # dict t predicts token t; the listed token's own value joins it
            entries = [None]
            for t in range(1, len(ids)):
                entry = self.mapped(echo.tops[t], ids[t])
                if ids[t] not in entry and echo.values[t] is not None:
                    entry[ids[t]] = echo.values[t]
                entries.append(entry)
            return entries
        # "next": dict t is the distribution after token t, predicting token t + 1; position 0's is null, so the
        # distribution after token 0 comes from a completion of the one token.
        first = self.ask(ids[:1], echo=False)
        if first.prompt_tokens not in (None, 1) or not first.tops:
            return (
                f"served teacher: block {block}, position 0: the server read our token {ids[0]} "
                f"({self.pieces.spelled(ids[0])!r}) alone as {first.prompt_tokens} tokens"
            )
        entries = [None, self.mapped(first.tops[0], None)]
        entries += [self.mapped(echo.tops[t - 1], ids[t - 1]) for t in range(2, len(ids))]
        return entries


class PromptLogprobsClient:
    """Blocks asked as token ids with vLLM's ``prompt_logprobs: k``."""

    def __init__(self, endpoint: EndpointSpec, vocab_size: int, k: int, decode: Callable):
        self.endpoint, self.vocab_size, self.k, self.decode = endpoint, vocab_size, k, decode
        self.notes = {"format": "prompt_logprobs"}
        self.stop = Stop()
        self.lock = threading.Lock()
        self.outside = 0  # alternatives past our vocabulary: a server's padded rows, left in the tail

    def settle(self, rows: list[list[int]], blocks: list[int]) -> None:
        pass

    def take_counts(self) -> dict[str, int]:
        with self.lock:
            outside, self.outside = self.outside, 0
        return {"dropped_outside_vocabulary": outside} if outside else {}

    def entries(self, ids: list[int], block: int) -> list | str:
        entries = block_logprobs(self.endpoint, ids, self.k, self.stop)
        outside = sum(i >= self.vocab_size for entry in entries[1:] for i in entry)
        with self.lock:
            self.outside += outside
        return misaligned(entries, ids, block, self.decode) or entries


def served_teacher_logits(
    endpoint: EndpointSpec, vocab_size: int, k: int, decode: Callable[[list[int]], str], train_ids: np.ndarray
) -> Callable[[torch.Tensor], TeacherAnswer]:
    """``teacher_logits_fn`` for ``build_lm_cache``: a batch of blocks [B, S] asked of the server ``concurrency``
    at a time, in ``endpoint.format`` (``prompt_logprobs`` unless the endpoint says ``echo``). ``train_ids``: the
    training blocks, so that an error names the block by its index. A block the server read differently stops the
    build, or under ``endpoint.on_mismatch: skip`` is returned as skipped."""
    index = {}
    for i, row in enumerate(np.asarray(train_ids, dtype=np.int64)):
        index.setdefault(row.tobytes(), i)
    if getattr(endpoint, "format", "prompt_logprobs") == "echo":
        client = EchoClient(endpoint, vocab_size, k, decode)
    else:
        client = PromptLogprobsClient(endpoint, vocab_size, k, decode)
    skip = getattr(endpoint, "on_mismatch", "stop") == "skip"

    def logits(input_ids: torch.Tensor) -> TeacherAnswer:
        rows = [row.tolist() for row in input_ids]
        blocks = [index.get(np.asarray(ids, dtype=np.int64).tobytes(), -1) for ids in rows]
        client.stop = stop = Stop()
        pool = ThreadPoolExecutor(max_workers=endpoint.concurrency)
        try:
            client.settle(rows, blocks)
            answers = results([pool.submit(client.entries, r, b) for r, b in zip(rows, blocks, strict=True)])
        finally:  # Ctrl-C or an error: cut the requests in flight and wait for none of them
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        out, skipped, notes = [], [], dict(client.notes)
        for row, (answer, ids) in enumerate(zip(answers, rows, strict=True)):
            if isinstance(answer, str):
                if not skip:
                    raise DistillError(answer + " (teacher.endpoint.on_mismatch: skip leaves such blocks out)")
                skipped.append(row)
                notes.setdefault("first_skipped", answer)
                answer = [None] + [{}] * (len(ids) - 1)  # uniform: written, but never read as targets
            out.append(as_logits(answer, vocab_size, k))
        return TeacherAnswer(torch.stack(out), skipped, client.take_counts(), notes)

    return logits
