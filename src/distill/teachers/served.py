"""A teacher behind an OpenAI-compatible server (``/v1/chat/completions`` or ``/v1/completions``): llama.cpp's
server, vLLM, TGI, or a hosted API. Requests run ``concurrency`` at a time; connection errors, timeouts, 429,
5xx, answers cut short and malformed answers (bad JSON, bad log-probabilities) are retried with jittered
exponential back-off (honouring Retry-After); other 4xx stop the run, since retrying cannot fix them. No single wait
is longer than MAX_WAIT. A request that still fails is reported and left for the next run.

An answer is untrusted: ``timeout`` bounds the whole request (not one socket read), the body read is capped
(``answer_limit``), and a redirect is an error, never followed (a POST would become a GET and the API key would go to
whatever host the server names). Ctrl-C (or an error that ends the run) cuts the requests in flight (``Stop``).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager

from distill.errors import DistillError
from distill.recipe import EndpointSpec, GenerateRecipe, SamplingSpec

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# The longest wait before a retry, whether the server's Retry-After or our back-off asks for more: a server that
# wants an hour (an exhausted quota) gets its retries sooner and the request is left for the next run, rather than
# the run hanging with nothing printed.
MAX_WAIT = 60.0
# Servers round log-probabilities; one this little above 0 is a rounded 0, anything more is not a log-probability.
LOGPROB_SLACK = 1e-4
# What a malformed answer can raise while it is taken apart (OverflowError: a 400-digit integer as a log-prob).
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)
# Probabilities a server rounded may add up to a little over 1; more than this is not a distribution.
MASS_SLACK = 1e-3


class Refused(DistillError):
    """A 4xx other than those retried: the server will not take this request as it is (``status``: the code)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


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


class Stop:
    """Ends one run's requests at once (Ctrl-C, or an error that ends the run): shuts their sockets and cuts their
    back-off waits short. ThreadPoolExecutor joins its worker threads at exit, even after shutdown(wait=False), so a
    request left running would hold the process until its deadline."""

    def __init__(self):
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.cuts: set = set()

    def set(self) -> None:
        with self.lock:
            self.event.set()
            cuts = list(self.cuts)
        for cut in cuts:
            cut()


def answer_limit(body: dict) -> int:
    """The most bytes an answer to ``body`` may take: 1 MiB, plus 512 bytes (several times what vLLM, llama.cpp or
    OpenAI write) for each alternative of each token sent or asked for. A server padding its answers would otherwise
    fill the memory."""
    prompt = body.get("prompt", body.get("messages", ""))
    sent = len(prompt) if isinstance(prompt, list) else len(json.dumps(prompt).encode())
    k = max(int(body.get(key) or 0) for key in ("prompt_logprobs", "logprobs", "top_logprobs"))
    return 2**20 + (sent + int(body.get("max_tokens") or 0)) * (k + 2) * 512


@contextmanager
def deadline(sock: socket.socket, seconds: float, stop: Stop, cut: threading.Event) -> Iterator[None]:
    """Shuts ``sock`` once ``seconds`` have passed, or when ``stop`` is set, and sets ``cut``: the reading thread then
    finds the connection closed. The socket's own timeout bounds one read, and a server trickling a byte at a time
    would never trip it. (The socket itself is held: http.client lets go of it while an HTTP/1.0 answer is read.)"""

    def shut() -> None:
        cut.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(seconds, shut)
    timer.daemon = True
    with stop.lock:
        stopped = stop.event.is_set()
        stop.cuts.add(shut)
    if stopped:
        shut()
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with stop.lock:
            stop.cuts.discard(shut)


def post(endpoint: EndpointSpec, body: dict, stop: Stop | None = None) -> dict:
    """One request; Retryable for what another try may fix, DistillError for what it cannot. ``stop``: cuts it."""
    stop = stop or Stop()
    path = "/chat/completions" if endpoint.api == "chat" else "/completions"
    url = endpoint.url.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise DistillError(f"teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is not set")
        headers["Authorization"] = f"Bearer {key}"
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.netloc, timeout=endpoint.timeout)  # the socket's timeout bounds connecting and each read
    cut, response = threading.Event(), None
    try:
        conn.connect()
        with deadline(conn.sock, endpoint.timeout, stop, cut):
            conn.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), json.dumps(body), headers)
            response = conn.getresponse()
            status = response.status
            if 300 <= status < 400:
                location = " ".join(str(response.getheader("Location")).split())[:200]
                raise Refused(
                    f"teacher endpoint {url} answered HTTP {status} redirecting to {location}: redirects are not "
                    "followed (the request would lose its body, the API key go to another host); set "
                    "teacher.endpoint.url to the address that answers",
                    status,
                )
            raw = error_detail(response) if status >= 400 else read_answer(response, url, answer_limit(body))
    except (http.client.HTTPException, OSError) as exc:
        if stop.event.is_set():
            raise Retryable("stopped") from None
        if cut.is_set():
            raise Retryable(
                f"no whole answer from {url} within {endpoint.timeout:g} s (teacher.endpoint.timeout bounds the "
                "whole request)"
            ) from None
        if isinstance(exc, http.client.HTTPException) or response is not None:  # the server began to answer
            raise Retryable(f"answer from {url} cut short: {exc!r:.200}") from None
        raise Retryable(f"cannot reach {endpoint.url}: {exc}") from None
    finally:
        if response is not None:
            response.close()
        conn.close()
    if status in RETRYABLE_STATUS:
        raise Retryable(f"HTTP {status} {raw}", retry_after(response.getheader("Retry-After")))
    if status >= 400:
        raise Refused(f"teacher endpoint {url} answered HTTP {status}: {raw}", status)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an over-long integer; deep nesting
        raise Retryable(f"malformed JSON from {url}: {raw[:80]!r}") from None


def read_answer(response: http.client.HTTPResponse, url: str, limit: int) -> bytes:
    """The body, refused unread past ``limit`` bytes (Retryable: a glitch another try may not repeat)."""
    too_long = f"answer from {url} is longer than {limit} bytes, the most one to this request needs; refused unread"
    if response.length is not None:  # read() raises IncompleteRead for a body cut short of its Content-Length
        if response.length > limit:
            raise Retryable(f"{too_long} (Content-Length {response.length})")
        return response.read()
    raw = response.read(limit + 1)  # chunked, or until the server closes
    if len(raw) > limit:
        raise Retryable(too_long)
    return raw


def error_detail(response: http.client.HTTPResponse) -> str:
    """The start of an error answer's body on one line; a body that cannot be read must not hide the status."""
    try:
        return " ".join(response.read(200).decode("utf-8", "replace").split())
    except (http.client.HTTPException, OSError, ValueError, AttributeError):
        return "(unreadable body)"


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (integer or decimal), at most MAX_WAIT; None for an HTTP date or junk, which leaves
    the wait to the back-off."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return min(seconds, MAX_WAIT) if seconds >= 0 else None  # NaN fails >= 0; inf is capped


def as_logprob(value: object) -> float:
    """A log-probability: a finite number <= 0 (up to LOGPROB_SLACK above, read as 0); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not -math.inf < value <= LOGPROB_SLACK:
        raise ValueError(value)  # NaN fails the comparison too
    return min(float(value), 0.0)


def top_k(pairs, k: int) -> dict:
    """The ``k`` most likely of the (token, log-prob) alternatives: llama.cpp's server adds the sampled token to the
    top list when it is not among the top k, so a reply can hold k + 1. A -inf alternative (probability 0: a
    masked token some servers still list) is dropped, as it carries nothing and JSON cannot hold it; -inf for the
    sampled token itself is malformed, since a sampled token had a probability."""
    top = {}
    for token, value in pairs:
        if not isinstance(token, str):
            raise TypeError(token)
        if value != -math.inf:
            top[token] = as_logprob(value)
    return dict(sorted(top.items(), key=lambda item: item[1], reverse=True)[:k])


def unpack(entry, api: str) -> tuple:
    """(token, log-prob, [(alternative, log-prob)]) of one token's entry, in either API's layout."""
    if api == "chat":  # {"token", "logprob", "top_logprobs": [{"token", "logprob"}]}
        tops = entry.get("top_logprobs") or []
        if not isinstance(tops, list):
            raise TypeError(tops)
        return entry["token"], entry["logprob"], [(x["token"], x["logprob"]) for x in tops]
    top = entry["top_logprobs"]  # {token: logprob} or null
    if top is not None and not isinstance(top, dict):
        raise TypeError(top)
    return entry["token"], entry["token_logprob"], list((top or {}).items())


def token_logprobs(logprobs: object, api: str, k: int) -> list[dict] | None:
    """Per-token log-probabilities of a choice, None when it has none; ValueError naming the first bad part of a
    malformed payload (wrong types, missing keys, lists of different lengths, a log-prob that is not a number <= 0).
    """
    if logprobs is None:
        return None
    if not isinstance(logprobs, dict):
        raise ValueError(json.dumps(logprobs)[:80])
    if api == "chat":  # {"content": [entry, ...]}
        entries = logprobs.get("content")
        if not entries:
            return None
        if not isinstance(entries, list):
            raise ValueError(f"content: {json.dumps(entries)[:80]}")
    else:  # {"tokens": [...], "token_logprobs": [...], "top_logprobs": [...] or null}, one entry per token
        tokens, values, tops = (logprobs.get(key) for key in ("tokens", "token_logprobs", "top_logprobs"))
        if not tokens:
            return None
        if tops is None and isinstance(tokens, list):
            tops = [None] * len(tokens)
        if not all(isinstance(x, list) and len(x) == len(tokens) for x in (tokens, values, tops)):
            raise ValueError(
                f"tokens, token_logprobs, top_logprobs not lists of one length: {json.dumps(logprobs)[:80]}"
            )
        keys = ("token", "token_logprob", "top_logprobs")  # one entry per token, so that an error can show it
        entries = [dict(zip(keys, row, strict=True)) for row in zip(tokens, values, tops, strict=True)]
    result = []
    for i, entry in enumerate(entries):
        try:
            token, value, pairs = unpack(entry, api)
            if not isinstance(token, str):
                raise TypeError(token)
            result.append({"token": token, "logprob": as_logprob(value), "top": top_k(pairs, k)})
        except MALFORMED:
            raise ValueError(f"token {i}: {json.dumps(entry)[:80]}") from None
        mass = sum(math.exp(v) for v in result[-1]["top"].values())
        if mass > 1 + MASS_SLACK:
            raise ValueError(f"token {i}: alternatives whose probabilities add up to {mass:.4g}, more than 1")
    return result


def parse_choice(answer: dict, api: str, k: int, source: str = "the teacher endpoint") -> dict:
    """Completion text, finish reason and (when returned) per-token log-probabilities of the first choice, at most
    ``k`` alternatives per token; Retryable for an answer without a completion or with malformed log-probabilities
    (a server glitch another try may not repeat; writing it would poison the distillation targets)."""
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise Retryable(f"answer without a completion: {json.dumps(answer)[:120]}") from None
    result = {"completion": text, "finish_reason": choice.get("finish_reason")}
    raw = choice.get("logprobs")
    try:
        logprobs = token_logprobs(raw, api, k)
    except MALFORMED as exc:  # a ValueError of token_logprobs names the bad part; anything else, show the start
        detail = exc if type(exc) is ValueError else json.dumps(raw)[:80]
        raise Retryable(f"malformed log-probabilities from {source}: {detail}") from None
    if logprobs:
        result["logprobs"] = logprobs
    return result


def backoff_wait(endpoint: EndpointSpec, attempt: int, retry_after: float | None, uniform=random.uniform) -> float:
    """Seconds before retry ``attempt + 1``: the back-off doubles from ``endpoint.backoff`` up to MAX_WAIT, with equal
    jitter (a uniform draw from its upper half) so that requests failed together do not all retry together, while
    the wait still grows. A Retry-After (already at most MAX_WAIT) is the least wait: the server said when it is
    ready, and the back-off still keeps a Retry-After of 0 from turning the retries into a busy loop."""
    delay = min(endpoint.backoff * 2.0 ** min(attempt, 64), MAX_WAIT)  # min(attempt, 64): no float overflow
    jittered = uniform(delay / 2, delay)
    return jittered if retry_after is None else max(retry_after, jittered)


def with_retries(endpoint: EndpointSpec, parse, body: dict, sleep=None, uniform=random.uniform, stop=None):
    """``parse(post(endpoint, body))`` with up to ``endpoint.retries`` retries and ``backoff_wait`` between them; the
    last Retryable is raised, at once when ``stop`` is set. ``sleep`` and ``uniform`` are there for tests."""
    stop = stop or Stop()
    sleep = sleep or stop.event.wait  # a back-off wait ends when the run stops
    for attempt in range(endpoint.retries + 1):
        try:
            return parse(post(endpoint, body, stop))
        except Retryable as exc:
            if attempt == endpoint.retries or stop.event.is_set():
                raise
            sleep(backoff_wait(endpoint, attempt, exc.wait, uniform))
    raise AssertionError("unreachable")


def complete(endpoint: EndpointSpec, body: dict, k: int, sleep=None, uniform=random.uniform, stop=None) -> dict:
    """One completion (``parse_choice`` of the answer), retried as ``with_retries`` does."""

    def parse(answer: dict) -> dict:
        return parse_choice(answer, endpoint.api, k, endpoint.url)

    return with_retries(endpoint, parse, body, sleep, uniform, stop)


# The main thread waits on the requests in slices of this many seconds. A blocking wait returns to Python only when
# it ends if a library loaded beside us installed the SIGINT handler with SA_RESTART (seen in the test suite): Ctrl-C
# would then wait for the requests; a timed wait sees it within one slice.
POLL = 0.1


def results(futures: list) -> list:
    """Each future's result, in order (the first failure raised as soon as it is reached, as ``pool.map`` does),
    waiting in ``POLL`` slices (Ctrl-C is seen within one)."""
    out = []
    for future in futures:
        while not future.done():
            wait([future], timeout=POLL)
        out.append(future.result())
    return out


def served_completions(recipe: GenerateRecipe, jobs: list, failures: list[str]) -> Iterator[tuple[object, dict]]:
    """(job, result) as requests finish, at most ``concurrency`` in flight; a job that exhausts its retries is
    appended to ``failures`` (and not written, so the next run tries it again)."""
    endpoint, sampling = recipe.teacher.endpoint, recipe.sampling
    system = recipe.prompts.system
    pool, stop = ThreadPoolExecutor(max_workers=endpoint.concurrency), Stop()
    try:
        queue = iter(jobs)
        running = {}

        def submit(job) -> None:
            seed = recipe.seed * 1_000_003 + job.sample
            body = request_body(endpoint, sampling, job.record["prompt"], system, seed)
            running[pool.submit(complete, endpoint, body, sampling.logprobs, stop=stop)] = job

        for job in queue:  # fill the window, then refill one for each that finishes
            submit(job)
            if len(running) >= endpoint.concurrency:
                break
        while running:
            done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    yield job, {"prompt": job.record["prompt"], **future.result()}
                except Retryable as exc:
                    failures.append(f"{job.id}/{job.sample}: {exc}")
                next_job = next(queue, None)
                if next_job is not None:
                    submit(next_job)
    finally:  # Ctrl-C, an error or the caller closing us: cut what is in flight and wait for none of it
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
