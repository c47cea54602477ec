"""distill generate: local batched generation, a served teacher under faults, verification, resume."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from lm_fixtures import save_tiny, tiny_llama, tiny_tokenizer

from distill.errors import DistillError
from distill.tasks import parse_recipe
from distill.tasks.generate import finished, generate, generate_local, read_prompts
from distill.tasks.verify import exact_match, extract_answer, verdict


def write_prompts(path: Path, n: int) -> Path:
    lines = [json.dumps({"id": f"p{i}", "prompt": f"what is {i} plus {i}?", "answer": str(2 * i)}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(tmp_path, teacher: dict, **sections):
    raw = {
        "task": "generate",
        "prompts": {"path": str(write_prompts(tmp_path / "prompts.jsonl", 12))},
        "teacher": teacher,
    }
    return parse_recipe(raw | sections)


# ---- a local OpenAI-compatible server that answers 2*i and injects faults ----


class FakeTeacher(BaseHTTPRequestHandler):
    lock = threading.Lock()
    in_flight = peak = requests = 0
    # consumed one per request: "503", "429" (Retry-After 0), "429:SECONDS" (Retry-After SECONDS), "garbage",
    # "slow", "400", "ok"; "cut" / "cut503": a 200 / 503 whose body stops short of its Content-Length;
    # "badlogprobs": valid JSON with malformed log-probabilities
    faults: list[str] = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.requests += 1
            cls.peak = max(cls.peak, cls.in_flight)
            fault = cls.faults.pop(0) if cls.faults else "ok"
        try:
            time.sleep(0.05 if fault != "slow" else 0.3)
            status, _, after = fault.partition(":")
            if status in ("503", "429", "400", "cut503"):
                error = b'{"error": "injected"}'
                self.send_response(503 if status == "cut503" else int(status))
                if status == "429":
                    self.send_header("Retry-After", after or "0")
                if status == "cut503":  # promises more than it sends, then hangs up
                    self.send_header("Content-Length", str(len(error) + 100))
                self.end_headers()
                self.wfile.write(error)
                return
            chat = "messages" in body
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            number = int(prompt.split()[2])
            text = f"{number} + {number} = {2 * number}. The answer is {2 * number}"
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            if body.get("logprobs") and fault == "badlogprobs":  # an entry without its token; lists out of step
                choice["logprobs"] = (
                    {"content": [{"token": "x", "logprob": -0.1}, {"logprob": "NaN"}]}
                    if chat
                    else {"tokens": ["x", "y"], "token_logprobs": [-0.1], "top_logprobs": None}
                )
            elif body.get("logprobs"):
                choice["logprobs"] = (
                    {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "x", "logprob": -0.1}]}]}
                    if chat
                    else {"tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [{"x": -0.1}]}
                )
            payload = (
                b"{not json"
                if fault == "garbage"
                else json.dumps({"choices": [{**choice, "finish_reason": "stop"}]}).encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if fault == "cut":  # promises the whole answer, sends half of it, hangs up
                self.send_header("Content-Length", str(len(payload)))
                payload = payload[: len(payload) // 2]
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture
def server():
    FakeTeacher.in_flight = FakeTeacher.peak = FakeTeacher.requests = 0
    FakeTeacher.faults = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def served(url: str, **endpoint) -> dict:
    return {"endpoint": {"url": url, "concurrency": 3, "retries": 4, "backoff": 0.01, "timeout": 5, **endpoint}}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_served_teacher_survives_faults_at_its_concurrency(tmp_path, server, api):
    FakeTeacher.faults = ["503", "garbage", "429", "slow", "ok", "503", "slow", "slow", "cut", "badlogprobs"]
    FakeTeacher.faults += ["ok", "cut503", "429:0.02"]
    spec = recipe(tmp_path, served(server, api=api), sampling={"samples": 2, "logprobs": 1})
    out = tmp_path / "traces.jsonl"
    summary = generate(spec, out)
    records = read_records(out)
    assert sorted((r["id"], r["sample"]) for r in records) == sorted((f"p{i}", k) for i in range(12) for k in range(2))
    assert summary == summary | {"traces": 24, "kept": 24, "dropped": 0}
    assert FakeTeacher.peak == 3  # the configured concurrency, held and never exceeded
    assert FakeTeacher.requests == 24 + 8  # each injected failure (all but ok and slow) cost one retry
    assert all(r["correct"] for r in records)
    assert all(r["logprobs"] == [{"token": "x", "logprob": -0.1, "top": {"x": -0.1}}] for r in records)


def test_a_down_server_loses_nothing_and_a_rerun_finishes(tmp_path, server):
    spec = recipe(tmp_path, served(server, retries=1))
    out = tmp_path / "traces.jsonl"
    FakeTeacher.faults = ["ok"] * 5 + ["503"] * 200  # 5 answers, then the server keeps failing
    with pytest.raises(DistillError, match=r"request\(s\) failed after 1 retries .* run the same command again"):
        generate(spec, out)
    first = read_records(out)
    assert len(first) == 5
    FakeTeacher.faults = []
    generate(spec, out)
    records = read_records(out)
    assert records[:5] == first  # finished records untouched
    assert len({(r["id"], r["sample"]) for r in records}) == len(records) == 12  # nothing duplicated


def test_unreachable_endpoint_and_client_errors_are_one_line(tmp_path, server):
    spec = recipe(tmp_path, served("http://127.0.0.1:9/v1", retries=0))
    with pytest.raises(DistillError, match="cannot reach http://127.0.0.1:9/v1"):
        generate(spec, tmp_path / "a.jsonl")
    FakeTeacher.faults = ["400"] * 10
    with pytest.raises(DistillError, match="answered HTTP 400"):
        generate(recipe(tmp_path, served(server)), tmp_path / "b.jsonl")


def test_restart_cuts_a_half_written_record_and_skips_finished_ones(tmp_path, server):
    spec = recipe(tmp_path, served(server))
    out = tmp_path / "traces.jsonl"
    generate(spec, out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:20])  # killed while writing record 8
    assert len(finished(out)) == 7 and out.read_text() == "".join(lines[:7])
    FakeTeacher.requests = 0
    generate(spec, out)
    assert FakeTeacher.requests == 5
    assert sorted(r["id"] for r in read_records(out)) == sorted(f"p{i}" for i in range(12))


def test_bad_prompt_lines_are_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    spec = parse_recipe({"task": "generate", "prompts": {"path": str(path)}, "teacher": {"path": "x"}})
    with pytest.raises(DistillError, match="line 2 is not valid JSON"):
        read_prompts(spec)
    path.write_text('{"question": "a"}\n')
    with pytest.raises(DistillError, match="line 1 needs a JSON object with a string field 'prompt'"):
        read_prompts(spec)
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(DistillError, match="id '1' appears twice"):
        read_prompts(spec)


def test_recipe_needs_exactly_one_teacher():
    with pytest.raises(DistillError, match="exactly one of path"):
        parse_recipe({"task": "generate", "prompts": {"path": "p"}, "teacher": {}})


# ---- verification ----


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 3+4=7. #### 7", "7"),
        ("The answer is 1,234.", "1,234"),
        ("So, the answer is **2**.", "2"),
        (r"thus \boxed{42}", "42"),
        ("x=5 then 6", "6"),
        ("none", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_match_normalises_numbers():
    assert exact_match("The answer is 1,234.", {"answer": "1234"}) == 1.0
    assert exact_match("The answer is 12", {"answer": 13}) == 0.0


def test_raising_verifier_drops_the_trace_and_is_reported(tmp_path, server):
    checker = tmp_path / "checker.py"
    checker.write_text(
        "def check(text, record):\n"
        "    if record['id'] == 'p3':\n"
        "        raise ValueError('boom')\n"
        "    return record['id'] != 'p4'\n"
    )
    spec = recipe(tmp_path, served(server), verify={"method": "callable", "callable": f"{checker}:check"})
    out = tmp_path / "traces.jsonl"
    summary = generate(spec, out)
    assert (
        summary | {"kept": 10, "dropped": 2, "verifier_errors": 1, "first_verifier_error": "ValueError: boom"}
        == summary
    )
    kept = read_records(tmp_path / "traces.kept.jsonl")
    assert sorted(r["id"] for r in kept) == sorted(f"p{i}" for i in range(12) if i not in (3, 4))
    assert set(kept[0]) >= {"prompt", "response"}
    assert verdict(None, "x 5", {}, 1.0) == {"predicted": "5", "correct": None}


def test_unknown_callable_is_one_line(tmp_path):
    spec = recipe(tmp_path, {"path": "x"}, verify={"method": "callable", "callable": "no_such_module_xyz:f"})
    with pytest.raises(DistillError, match="cannot import no_such_module_xyz"):
        generate(spec, tmp_path / "t.jsonl")


# ---- local teacher ----


def test_batched_left_padded_generation_equals_one_at_a_time(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2)
    spec = parse_recipe(
        {
            "task": "generate",
            "prompts": {"path": "p"},
            "teacher": {"path": "x"},
            "sampling": {"temperature": 0, "max_new_tokens": 6, "logprobs": 3},
        }
    )
    texts = ["the quick brown fox", "a teacher", "numbers like one two three four five"]
    batched = generate_local(model, tokenizer, texts, spec.sampling, seed=0)
    alone = [generate_local(model, tokenizer, [t], spec.sampling, seed=0)[0] for t in texts]
    assert [b["tokens"] for b in batched] == [a["tokens"] for a in alone]
    assert all(len(b["logprobs"]) == len(b["tokens"]) and len(b["logprobs"][0]["top"]) == 3 for b in batched)
    for b, a in zip(batched, alone, strict=True):
        torch.testing.assert_close(
            torch.tensor([t["logprob"] for t in b["logprobs"]]),
            torch.tensor([t["logprob"] for t in a["logprobs"]]),
            atol=1e-4,
            rtol=0,
        )


def test_local_teacher_end_to_end_with_samples(tmp_path):
    tokenizer = tiny_tokenizer()
    folder = save_tiny(tiny_llama(tokenizer, layers=2), tokenizer, tmp_path / "teacher")
    spec = recipe(
        tmp_path,
        {"path": str(folder)},
        sampling={"samples": 2, "max_new_tokens": 5, "batch_size": 5},
        verify={"method": "none"},
    )
    out = tmp_path / "traces.jsonl"
    summary = generate(spec, out)
    assert summary["traces"] == summary["kept"] == 24
    again = generate(spec, out)  # nothing left to do: nothing duplicated
    assert again["traces"] == 24


def test_top_logprobs_are_cut_to_k():
    """llama.cpp's server adds the sampled token to its top list when it is not among the top k."""
    from distill.teachers.served import parse_choice

    tops = [{"token": t, "logprob": -0.5 - i} for i, t in enumerate("xyza")]
    answer = chat_answer({"content": [{"token": "a", "logprob": -3.5, "top_logprobs": tops}]})
    assert parse_choice(answer, "chat", 3)["logprobs"][0]["top"] == {"x": -0.5, "y": -1.5, "z": -2.5}


def chat_answer(logprobs) -> dict:
    return {"choices": [{"message": {"content": "a"}, "logprobs": logprobs}]}


def completions_answer(logprobs) -> dict:
    return {"choices": [{"text": "a", "logprobs": logprobs}]}


def entry(**fields) -> dict:
    return {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": []} | fields]}


@pytest.mark.parametrize(
    "answer",
    [
        chat_answer([{"token": "a", "logprob": -1.0}]),  # logprobs not an object
        chat_answer({"content": "a"}),  # content not a list
        chat_answer({"content": ["a"]}),  # an entry not an object
        chat_answer({"content": [{"logprob": -1.0}]}),  # no token
        chat_answer({"content": [{"token": "a"}]}),  # no logprob
        chat_answer(entry(token=7)),
        chat_answer(entry(logprob="NaN")),
        chat_answer(entry(logprob=float("nan"))),  # json.loads reads a bare NaN so
        chat_answer(entry(logprob=0.5)),  # not a log-probability
        chat_answer(entry(logprob=float("-inf"))),  # a sampled token had a probability
        chat_answer(entry(logprob=True)),
        chat_answer(entry(logprob=-(10**400))),  # a float cannot hold it
        chat_answer(entry(top_logprobs={"b": -2.0})),
        chat_answer(entry(top_logprobs=[{"token": "b"}])),
        chat_answer(entry(top_logprobs=[{"token": "b", "logprob": "high"}])),
        chat_answer(entry(top_logprobs=[{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.2}])),  # mass > 1
        completions_answer({"tokens": "ab", "token_logprobs": [-1.0, -2.0]}),
        completions_answer({"tokens": ["a", "b"], "token_logprobs": [-1.0]}),
        completions_answer({"tokens": ["a"]}),  # no token_logprobs
        completions_answer({"tokens": ["a"], "token_logprobs": [None]}),
        completions_answer({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}, {}]}),
        completions_answer({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [["a", -1.0]]}),
        completions_answer({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": "-1"}]}),
        completions_answer({"tokens": 5, "token_logprobs": [-1.0]}),
    ],
)
def test_malformed_logprobs_are_a_one_line_retry(answer):
    from distill.teachers.served import Retryable, parse_choice

    api = "chat" if "message" in answer["choices"][0] else "completions"
    with pytest.raises(Retryable, match="^malformed log-probabilities from http://t/v1: .") as caught:
        parse_choice(answer, api, 3, "http://t/v1")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_logprobs_edge_cases_that_are_fine():
    from distill.teachers.served import parse_choice

    # a log-prob rounded a hair above 0 reads as 0; a masked alternative (-inf, probability 0) is dropped
    tops = [{"token": "a", "logprob": 1e-5}, {"token": "b", "logprob": float("-inf")}]
    fine = parse_choice(chat_answer(entry(logprob=1e-5, top_logprobs=tops)), "chat", 3)
    assert fine["logprobs"] == [{"token": "a", "logprob": 0.0, "top": {"a": 0.0}}]
    assert "logprobs" not in parse_choice(chat_answer(None), "chat", 3)
    assert "logprobs" not in parse_choice(chat_answer({"content": None}), "chat", 3)
    plain = completions_answer({"tokens": ["a", "b"], "token_logprobs": [-1, -2.5], "top_logprobs": None})
    assert parse_choice(plain, "completions", 3)["logprobs"] == [
        {"token": "a", "logprob": -1.0, "top": {}},
        {"token": "b", "logprob": -2.5, "top": {}},
    ]


def test_cut_answers_and_bad_logprobs_are_retryable_with_a_clear_line(tmp_path, server):
    from distill.teachers.served import Retryable, complete, request_body

    spec = recipe(tmp_path, served(server, retries=0), sampling={"logprobs": 1})
    endpoint = spec.teacher.endpoint
    body = request_body(endpoint, spec.sampling, "what is 3 plus 3?", None, 0)
    for fault, message in [
        ("cut", rf"^answer from {server}/chat/completions cut short: IncompleteRead\("),
        ("cut503", r"^HTTP 503 \{\"error\": \"injected\"\}$"),
        ("badlogprobs", rf"^malformed log-probabilities from {server}: token 1: "),
    ]:
        FakeTeacher.faults = [fault]
        with pytest.raises(Retryable, match=message):
            complete(endpoint, body, 1)


def test_retry_after_is_honoured_in_decimals_and_capped(tmp_path, server):
    from distill.teachers.served import MAX_WAIT, complete, request_body, retry_after

    assert MAX_WAIT == 60.0
    values = ["7", "2.5", " 3 ", "3600", "inf", "-1", "nan", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", None]
    assert [retry_after(v) for v in values] == [7.0, 2.5, 3.0, 60.0, 60.0, None, None, None, None, None]
    spec = recipe(tmp_path, served(server))  # backoff 0.01, 4 retries
    endpoint = spec.teacher.endpoint
    body = request_body(endpoint, spec.sampling, "what is 3 plus 3?", None, 0)
    FakeTeacher.faults = ["429:3600", "429:1.5", "429:Wed, 21 Oct 2015 07:28:00 GMT", "503"]
    waits: list[float] = []
    result = complete(endpoint, body, 0, sleep=waits.append, uniform=lambda low, high: high)
    assert result["completion"].endswith("The answer is 6")
    # capped Retry-After, decimal Retry-After, a date (not honoured: the back-off), no Retry-After (the back-off)
    assert waits == pytest.approx([60.0, 1.5, 0.04, 0.08])


def test_backoff_is_jittered_doubling_and_capped(monkeypatch):
    import random

    from distill.recipe import EndpointSpec
    from distill.teachers import served as served_module

    def refuse(endpoint, body, stop=None):
        raise served_module.Retryable("HTTP 503")

    monkeypatch.setattr(served_module, "post", refuse)
    endpoint = EndpointSpec(url="http://t/v1", retries=10, backoff=1.0)
    highs = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]  # doubling, capped at MAX_WAIT

    def waits(uniform) -> list[float]:
        slept: list[float] = []
        with pytest.raises(served_module.Retryable, match="^HTTP "):
            served_module.complete(endpoint, {}, 0, sleep=slept.append, uniform=uniform)
        return slept

    assert waits(lambda low, high: high) == highs
    assert waits(lambda low, high: low) == [h / 2 for h in highs]  # equal jitter: never under half the back-off
    seeded = waits(random.Random(0).uniform)
    assert all(h / 2 <= w <= h for w, h in zip(seeded, highs, strict=True))
    assert len(set(seeded)) == len(seeded)  # jittered, not the same wait for every client
    assert seeded == waits(random.Random(0).uniform)  # a seeded draw repeats

    # Retry-After: 0 makes no busy loop: the jittered back-off is still the least
    def ready_now(endpoint, body, stop=None):
        raise served_module.Retryable("HTTP 429", wait=0.0)

    monkeypatch.setattr(served_module, "post", ready_now)
    assert waits(lambda low, high: low) == [h / 2 for h in highs]
