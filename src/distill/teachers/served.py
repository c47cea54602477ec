"""A teacher behind an OpenAI-compatible server (``/v1/chat/completions`` or ``/v1/completions``): llama.cpp's
server, vLLM, TGI, or a hosted API. Requests run ``concurrency`` at a time; connection errors, timeouts, 429,
5xx and malformed answers are retried with exponential back-off (honouring Retry-After); other 4xx stop the run,
since retrying cannot fix them. A request that still fails is reported and left for the next run.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from distill.errors import DistillError
from distill.recipe import EndpointSpec, GenerateRecipe, SamplingSpec

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class Retryable(Exception):
    """A failure worth another try; ``wait`` is the server's Retry-After, when it gave one."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


def request_body(endpoint: EndpointSpec, sampling: SamplingSpec, prompt: str, system: str | None, seed: int) -> dict:
    body = {
        "model": endpoint.model,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": seed,
    }
    if endpoint.api == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body["messages"] = messages
        if sampling.logprobs:
            body |= {"logprobs": True, "top_logprobs": sampling.logprobs}
    else:
        body["prompt"] = prompt if system is None else f"{system}\n\n{prompt}"
        if sampling.logprobs:
            body["logprobs"] = sampling.logprobs
    return body


def post(endpoint: EndpointSpec, body: dict) -> dict:
    """One request; Retryable for what another try may fix, DistillError for what it cannot."""
    path = "/chat/completions" if endpoint.api == "chat" else "/completions"
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise DistillError(f"teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is not set")
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(endpoint.url.rstrip("/") + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace")
        if exc.code in RETRYABLE_STATUS:
            after = exc.headers.get("Retry-After")
            raise Retryable(f"HTTP {exc.code} {detail}", float(after) if after and after.isdigit() else None) from None
        raise DistillError(f"teacher endpoint {endpoint.url}{path} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Retryable(f"cannot reach {endpoint.url}: {reason}") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Retryable(f"malformed JSON from {endpoint.url}{path}: {raw[:80]!r}") from None


def top_k(logprobs: dict, k: int) -> dict:
    """The ``k`` most likely entries: llama.cpp's server adds the sampled token to the top list when it is not
    among the top k, so a reply can hold k + 1."""
    return dict(sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:k])


def parse_choice(answer: dict, api: str, k: int) -> dict:
    """Completion text, finish reason and (when returned) per-token log-probabilities of the first choice, at most
    ``k`` alternatives per token."""
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise Retryable(f"answer without a completion: {json.dumps(answer)[:120]}") from None
    result = {"completion": text, "finish_reason": choice.get("finish_reason")}
    logprobs = choice.get("logprobs")
    if api == "chat" and logprobs and logprobs.get("content"):
        result["logprobs"] = [
            {
                "token": t["token"],
                "logprob": t["logprob"],
                "top": top_k({x["token"]: x["logprob"] for x in t.get("top_logprobs", [])}, k),
            }
            for t in logprobs["content"]
        ]
    elif api == "completions" and logprobs and logprobs.get("tokens"):
        tops = logprobs.get("top_logprobs") or [{}] * len(logprobs["tokens"])
        result["logprobs"] = [
            {"token": t, "logprob": lp, "top": top_k(top or {}, k)}
            for t, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=False)
        ]
    return result


def complete(endpoint: EndpointSpec, body: dict, k: int, sleep=time.sleep) -> dict:
    """``post`` + ``parse_choice`` with up to ``endpoint.retries`` retries, back-off doubling each time."""
    delay = endpoint.backoff
    for attempt in range(endpoint.retries + 1):
        try:
            return parse_choice(post(endpoint, body), endpoint.api, k)
        except Retryable as exc:
            if attempt == endpoint.retries:
                raise
            sleep(exc.wait if exc.wait is not None else delay)
            delay *= 2
    raise AssertionError("unreachable")


def served_completions(recipe: GenerateRecipe, jobs: list, failures: list[str]) -> Iterator[tuple[object, dict]]:
    """(job, result) as requests finish, at most ``concurrency`` in flight; a job that exhausts its retries is
    appended to ``failures`` (and not written, so the next run tries it again)."""
    endpoint, sampling = recipe.teacher.endpoint, recipe.sampling
    system = recipe.prompts.system
    with ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
        queue = iter(jobs)
        running = {}

        def submit(job) -> None:
            seed = recipe.seed * 1_000_003 + job.sample
            body = request_body(endpoint, sampling, job.record["prompt"], system, seed)
            running[pool.submit(complete, endpoint, body, sampling.logprobs)] = job

        for job in queue:  # fill the window, then refill one for each that finishes
            submit(job)
            if len(running) >= endpoint.concurrency:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    yield job, {"prompt": job.record["prompt"], **future.result()}
                except Retryable as exc:
                    failures.append(f"{job.id}/{job.sample}: {exc}")
                next_job = next(queue, None)
                if next_job is not None:
                    submit(next_job)
