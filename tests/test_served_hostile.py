"""Issue 33: a served teacher's answers are untrusted. A redirect is an error (the API key never leaves the origin),
the endpoint is an http(s) URL with a finite timeout, malformed log-probabilities (a negative id, probabilities adding
up to more than 1) are retried then named, an answer's size is capped, ``timeout`` bounds the whole request, Ctrl-C
cuts the requests in flight; the reference server answers a bad request with HTTP 400."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from test_served_cache import FaultyServer, K, assert_same_cache, blocks, build, local_logits

from distill.errors import DistillError
from distill.recipe import LMEndpointSpec
from distill.tasks import parse_recipe
from distill.tasks.generate import generate
from distill.teachers.served import Refused, Retryable, answer_limit, post
from distill.teachers.served_cache import request_body, served_teacher_logits
from distill.testing.prompt_server import running, serve


@pytest.fixture
def server(tok, teacher):
    FaultyServer.faults, FaultyServer.answered, FaultyServer.misread = [], [], {}
    with serve(teacher, len(tok), FaultyServer, tokenizer=tok) as url:
        yield url
    FaultyServer.faults = []


def spec(url: str, **options) -> LMEndpointSpec:
    defaults = {"url": url, "api": "completions", "concurrency": 2, "retries": 1, "backoff": 0.01, "timeout": 10}
    return LMEndpointSpec(**defaults | options)


def served(url: str, tok, ids, **options):
    return served_teacher_logits(spec(url, **options), len(tok), K, tok.decode, ids)


class Elsewhere(BaseHTTPRequestHandler):
    """Another origin: records every request that reaches it, and answers it."""

    seen: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.seen.append((self.command, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET  # noqa: N815


@contextmanager
def elsewhere():
    Elsewhere.seen = []
    with running(Elsewhere) as port:
        yield f"http://localhost:{port}"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_key_never_leaves(tok, server, monkeypatch, code):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret")
    ids = blocks(tok, n=1)
    with elsewhere() as other:
        monkeypatch.setattr(FaultyServer, "redirect_to", f"{other}/v1/completions")
        FaultyServer.faults = [f"redirect:{code}"]
        with pytest.raises(DistillError) as caught:
            served(server, tok, ids, api_key_env="TEACHER_KEY")(torch.from_numpy(ids))
    assert Elsewhere.seen == []  # neither the key nor the request went there
    message = str(caught.value)
    assert f"{server}/completions answered HTTP {code} redirecting to {other}/v1/completions: " in message
    assert "set teacher.endpoint.url" in message and "\n" not in message and "sk-secret" not in message


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("url", "file:///etc/passwd", "'file:///etc/passwd': give the http:// or https:// address of the server"),
        ("url", "ftp://127.0.0.1/v1", "give the http:// or https:// address"),
        ("url", "127.0.0.1:8080/v1", "give the http:// or https:// address"),
        ("url", "http://me:pw@127.0.0.1/v1", "put no credentials in the URL; name the variable .* in api_key_env"),
        ("timeout", ".inf", "inf: Input should be a finite number"),
        ("timeout", ".nan", "nan: Input should be a finite number"),
        ("timeout", "1e9", "less than or equal to 3600"),
        ("backoff", ".inf", "inf: Input should be a finite number"),
    ],
)
def test_the_endpoint_is_an_http_url_with_a_finite_timeout(tmp_path, key, value, says):
    import yaml

    endpoint = {"url": "http://127.0.0.1:9/v1", key: yaml.safe_load(value)}
    raw = {"task": "generate", "prompts": {"path": str(tmp_path / "p.jsonl")}, "teacher": {"endpoint": endpoint}}
    with pytest.raises(DistillError, match=rf"^recipe: teacher\.endpoint\.{key} = .*{says}") as caught:
        parse_recipe(raw)
    assert "\n" not in str(caught.value) and "root:" not in str(caught.value)  # nothing of the file is read
    with pytest.raises(ValueError):  # a causal_lm's served teacher too
        LMEndpointSpec(**endpoint)


@pytest.mark.parametrize(
    ("fault", "answer_format", "says"),
    [
        ("negative", "prompt_logprobs", "malformed prompt log-probabilities at position 2: token id -1 is negative"),
        (
            "mass",
            "prompt_logprobs",
            "malformed prompt log-probabilities at position 2: alternatives whose probabilities add up to [0-9.]+",
        ),
        ("mass", "echo", "malformed echo log-probabilities at position 2: alternatives whose probabilities add up to"),
    ],
)
def test_a_malformed_answer_is_retried_then_named(tok, server, fault, answer_format, says):
    ids = blocks(tok, n=1)
    FaultyServer.faults = [fault] * 3  # every try (echo: the probe's first try too)
    with pytest.raises(DistillError, match=rf"^teacher\.endpoint: a block failed 2 times \({says}") as caught:
        served(server, tok, ids, format=answer_format)(torch.from_numpy(ids))
    assert "\n" not in str(caught.value)


def test_malformed_and_huge_answers_are_retried_and_the_cache_is_the_teachers(tok, teacher, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults = ["negative", "mass", "huge", "huge-unsized"]
    cache = build(served(server, tok, ids, retries=4), ids, tmp_path / "served", vocab)
    assert not FaultyServer.faults
    assert_same_cache(build(local_logits(teacher), ids, tmp_path / "local", vocab), cache, torch.arange(len(ids)))


def test_ids_past_the_vocabulary_are_left_in_the_tail_and_counted(tok, teacher, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults = ["outside", "outside"]
    cache = build(served(server, tok, ids), ids, tmp_path / "served", vocab)
    assert cache.meta["teacher_counts"] == {"dropped_outside_vocabulary": 2}
    assert_same_cache(build(local_logits(teacher), ids, tmp_path / "local", vocab), cache, torch.arange(len(ids)))


@pytest.mark.parametrize("fault", ["huge", "huge-unsized"])
def test_an_answer_past_the_cap_is_refused_unread(tok, server, monkeypatch, fault):
    body = request_body(spec(server), blocks(tok, n=1)[0].tolist(), K)
    limit = answer_limit(body)
    assert limit < 2_000_000  # 16 MB are sent
    read, original = [], http.client.HTTPResponse.read

    def counted(self, amt=None):
        data = original(self, amt)
        read.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read", counted)
    FaultyServer.faults = [fault]
    with pytest.raises(Retryable, match=rf"^answer from {server}/completions is longer than {limit} bytes, the most"):
        post(spec(server), body)
    assert sum(read) <= limit + 1


def test_a_trickling_answer_hits_the_whole_request_deadline(tok, server):
    body = request_body(spec(server), blocks(tok, n=1)[0].tolist(), K)
    FaultyServer.faults = ["trickle"]  # a byte every 50 ms: no single read waits 0.5 s
    start = time.monotonic()
    with pytest.raises(Retryable, match=rf"^no whole answer from {server}/completions within 0.5 s \(teacher"):
        post(spec(server, timeout=0.5), body)
    assert time.monotonic() - start < 1.5


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")}


@pytest.mark.parametrize("job", ["cache", "generate"])
def test_ctrl_c_cuts_the_requests_in_flight(tok, server, tmp_path, job):
    """SIGINT while every request trickles (timeout 60 s): KeyboardInterrupt at once, and no worker thread left to
    hold the process at exit (ThreadPoolExecutor joins them)."""
    if job == "cache":
        ids = blocks(tok, n=4)
        fn = served(server, tok, ids, timeout=60)

        def run():
            fn(torch.from_numpy(ids))
    else:
        prompts = tmp_path / "prompts.jsonl"
        lines = [
            json.dumps({"id": f"p{i}", "prompt": f"what is {i} plus {i}?", "answer": str(2 * i)}) for i in range(4)
        ]
        prompts.write_text("\n".join(lines) + "\n")
        endpoint = {"url": server, "api": "completions", "timeout": 60, "retries": 1, "backoff": 0.01, "concurrency": 2}
        recipe = parse_recipe(
            {"task": "generate", "prompts": {"path": str(prompts)}, "teacher": {"endpoint": endpoint}}
            | {"verify": {"method": "none"}}
        )

        def run():
            generate(recipe, tmp_path / "traces.jsonl")

    before = pool_threads()
    FaultyServer.faults = ["trickle"] * 20
    interrupt = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    # Python's own SIGINT handler, unblocked: something the whole suite loads before this test leaves SIGINT so that
    # it never reaches Python (the interrupt came only when the requests ended). Then SA_RESTART on it, as a library
    # loaded beside us may leave it: a blocking wait would return to Python only when the requests end.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.siginterrupt(signal.SIGINT, False)
    start = time.monotonic()
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        interrupt.cancel()
        signal.siginterrupt(signal.SIGINT, True)
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 1.5
    gone = time.monotonic() + 1
    while pool_threads() - before and time.monotonic() < gone:
        time.sleep(0.02)
    assert not pool_threads() - before


@pytest.mark.parametrize("prompt", [[5, -1, 7], [5, "V", 7], [5, "x"], []])
def test_the_reference_server_answers_a_bad_request_with_http_400(tok, teacher, prompt):
    vocab = len(tok)
    prompt = [vocab if i == "V" else i for i in prompt]
    with serve(teacher, vocab) as url:
        body = {"model": "m", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
        with pytest.raises(Refused, match=r"answered HTTP 400: \{\"error\": \{\"message\": \"prompt: ") as caught:
            post(spec(url, retries=0), body)
    assert caught.value.status == 400
