"""A local model served as an OpenAI-compatible ``/v1/completions`` that returns the prompt's log-probabilities: what
the served-teacher cache is tested and measured against when no vLLM or llama.cpp server is at hand. Loopback only,
one model. It answers

- vLLM's ``prompt_logprobs: k`` (the prompt as token ids; entries keyed by id);
- ``echo: true, logprobs: k`` as OpenAI-style legacy completions do (``layout = "current"``: the dict at position t
  is the distribution of token t; the greedy next token is listed after the prompt) or as llama-cpp-python's server
  does (``layout = "next"``: the dict at position t is the distribution *after* token t, null at position 0, no
  generated token listed), with pieces written as llama.cpp writes them (a token's bytes decoded with errors
  ignored, control tokens as "") and dicts built as it builds them (a piece listed twice keeps the later value; the
  listed token's piece is added last);
- a plain completion with ``logprobs: k``: the greedy next token and its alternatives.

``text_only = True`` refuses a prompt of token ids as llama-cpp-python's server does (its request schema takes a
string; its error handler answers the validation error with HTTP 500), and tokenises a text prompt with the served
tokenizer.

A request it cannot answer (not JSON, no prompt, token ids outside the vocabulary) gets HTTP 400 with a JSON error
body, as vLLM answers it, rather than a dropped connection.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def prompt_logprobs(model, ids: list[int], vocab_size: int, k: int) -> list:
    """vLLM's ``prompt_logprobs`` for ``ids``: None at position 0, then per position the top-k ids (as strings) with
    log-prob and rank, plus the prompt's own token at that position."""
    logp = log_probs(model, ids, vocab_size)
    entries = [None]
    for t in range(1, len(ids)):
        values, top = logp[t - 1].topk(k)
        entry = {str(i): {"logprob": v, "rank": r + 1}
                 for r, (v, i) in enumerate(zip(values.tolist(), top.tolist(), strict=True))}  # fmt: skip
        actual = ids[t]
        rank = int((logp[t - 1] > logp[t - 1, actual]).sum()) + 1
        entry[str(actual)] = {"logprob": logp[t - 1, actual].item(), "rank": rank}
        entries.append(entry)
    return entries


def log_probs(model, ids: list[int], vocab_size: int) -> torch.Tensor:
    """[len(ids), vocab_size] float32 log-probabilities of the next token after each position."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :, :vocab_size]
        return torch.log_softmax(logits.float(), -1).cpu()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: each of its 256 characters to the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def llama_pieces(tokenizer, vocab_size: int) -> list[str]:
    """Each id written as llama.cpp's server writes it: the token's bytes decoded as UTF-8 with errors ignored (byte-
    level BPE vocabularies; others through the tokenizer's own decoding), special tokens as nothing."""
    decoder, special = _byte_decoder(), set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pieces = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        if i in special or token is None:
            pieces.append("")
        elif all(c in decoder for c in token):
            pieces.append(bytes(decoder[c] for c in token).decode("utf-8", "ignore"))
        else:
            pieces.append(tokenizer.decode([i]).replace("\ufffd", ""))
    return pieces


class Unprocessable(Exception):
    """A request the server refuses (with HTTP 500, as llama-cpp-python's server answers a validation error)."""

    status = 500


class BadRequest(Unprocessable):
    """A request no server could answer (HTTP 400)."""

    status = 400


class PromptLogprobHandler(BaseHTTPRequestHandler):
    model = None
    vocab_size = 0
    tokenizer = None  # needed for echo (pieces) and text prompts
    layout = "current"  # echo: "current" (OpenAI-style) or "next" (llama-cpp-python's)
    text_only = False
    lock = threading.Lock()  # one forward at a time: the model is not ours to run from several threads at once
    _pieces: list[str] | None = None

    def log_message(self, *args):
        pass

    def pieces(self) -> list[str]:
        if type(self)._pieces is None:
            type(self)._pieces = llama_pieces(self.tokenizer, self.vocab_size)
        return type(self)._pieces

    def prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, str) and prompt:
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.text_only:
            raise Unprocessable("('body', 'prompt', 'str'): Input should be a valid string")
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt: give a string or a non-empty list of token ids")
        bad = [i for i in prompt if type(i) is not int or not 0 <= i < self.vocab_size]
        if bad:
            raise BadRequest(f"prompt: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        return prompt

    def top_count(self, body: dict, key: str) -> int:
        k = body.get(key) or 0
        if type(k) is not int or not 0 <= k <= self.vocab_size:
            raise BadRequest(f"{key}: give a number of alternatives in [0, {self.vocab_size}], not {k!r}")
        return k

    def answer(self, body: dict) -> bytes:
        """The answer to one request (Unprocessable: refused)."""
        ids = self.prompt_ids(body)
        with self.lock:
            if "prompt_logprobs" in body:
                entries = prompt_logprobs(self.model, ids, self.vocab_size, self.top_count(body, "prompt_logprobs"))
                return json.dumps({"choices": [{"text": "", "prompt_logprobs": entries}]}).encode()
            logp = log_probs(self.model, ids, self.vocab_size)
        k, pieces = self.top_count(body, "logprobs"), self.pieces()
        following = int(logp[-1].argmax())

        def alternatives(row: torch.Tensor, listed: int) -> dict[str, float]:
            values, top = row.topk(k)
            top = {pieces[i]: v for v, i in zip(values.tolist(), top.tolist(), strict=True)}  # later wins, as there
            return top | {pieces[listed]: row[listed].item()}

        if not body.get("echo"):
            logprobs = {"tokens": [pieces[following]], "token_logprobs": [logp[-1, following].item()],
                        "top_logprobs": [alternatives(logp[-1], following)]}  # fmt: skip
        elif self.layout == "next":  # llama-cpp-python: row t is the distribution after token t, listed at t
            logprobs = {
                "tokens": [pieces[i] for i in ids],
                "token_logprobs": [None] + [logp[t, ids[t]].item() for t in range(1, len(ids))],
                "top_logprobs": [None] + [alternatives(logp[t], ids[t]) for t in range(1, len(ids))],
            }
        else:  # OpenAI: position t holds the distribution of token t; the generated token is listed after the prompt
            listed = [*ids, following]
            logprobs = {
                "tokens": [pieces[i] for i in listed],
                "token_logprobs": [None] + [logp[t - 1, listed[t]].item() for t in range(1, len(listed))],
                "top_logprobs": [None] + [alternatives(logp[t - 1], listed[t]) for t in range(1, len(listed))],
            }
        choice = {"text": "", "index": 0, "logprobs": logprobs, "finish_reason": "length"}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        return json.dumps({"choices": [choice], "usage": usage}).encode()

    def read_body(self) -> dict:
        try:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError as exc:
            raise BadRequest(f"the request is not JSON: {exc}") from None

    def reply(self, status: int, payload: bytes, cut: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2] if cut else payload)

    def do_POST(self):  # noqa: N802
        try:
            payload = self.answer(self.read_body())
        except Unprocessable as exc:
            self.reply(exc.status, json.dumps({"error": {"message": str(exc)}}).encode())
            return
        self.reply(200, payload)


@contextmanager
def serve(
    model, vocab_size: int, handler: type[PromptLogprobHandler] = PromptLogprobHandler, tokenizer=None, **options
) -> Iterator[str]:
    """Serve ``model`` on 127.0.0.1 (a free port) while the block runs; yields the base URL (``.../v1``).
    ``tokenizer``: for echo answers and text prompts; ``options``: ``layout``, ``text_only``."""
    attributes = {"model": model.eval(), "vocab_size": vocab_size, "tokenizer": tokenizer, "_pieces": None}
    handler = type("Served", (handler,), attributes | options)
    with running(handler) as port:
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def running(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """A server of ``handler`` on 127.0.0.1 (a free port) in a thread while the block runs; yields the port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
