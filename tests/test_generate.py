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
from distill.teachers.generate import finished, generate, generate_local, read_prompts
from distill.verify import exact_match, extract_answer, verdict


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
    faults: list[str] = []  # consumed one per request: "503", "429", "garbage", "slow", "400", "ok"

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
            if fault in ("503", "429", "400"):
                self.send_response(int(fault))
                if fault == "429":
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(b'{"error": "injected"}')
                return
            prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
            number = int(prompt.split()[2])
            text = f"{number} + {number} = {2 * number}. The answer is {2 * number}"
            choice = {"message": {"role": "assistant", "content": text}} if "messages" in body else {"text": text}
            if "messages" in body and body.get("logprobs"):
                choice["logprobs"] = {
                    "content": [{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "x", "logprob": -0.1}]}]
                }
            payload = (
                b"{not json"
                if fault == "garbage"
                else json.dumps({"choices": [{**choice, "finish_reason": "stop"}]}).encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
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
    FakeTeacher.faults = ["503", "garbage", "429", "slow", "ok", "503", "slow", "slow"]
    spec = recipe(tmp_path, served(server, api=api), sampling={"samples": 2, "logprobs": 1})
    out = tmp_path / "traces.jsonl"
    summary = generate(spec, out)
    records = read_records(out)
    assert sorted((r["id"], r["sample"]) for r in records) == sorted((f"p{i}", k) for i in range(12) for k in range(2))
    assert summary == summary | {"traces": 24, "kept": 24, "dropped": 0}
    assert FakeTeacher.peak == 3  # the configured concurrency, held and never exceeded
    assert FakeTeacher.requests == 24 + 4  # each injected failure (503, garbage, 429, 503) cost one retry
    assert all(r["correct"] for r in records)
    if api == "chat":
        assert records[0]["logprobs"][0]["top"] == {"x": -0.1}


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

    token = {"token": "a", "logprob": -3.0, "top_logprobs": [{"token": t, "logprob": -i} for i, t in enumerate("xyza")]}
    answer = {"choices": [{"message": {"content": "a"}, "logprobs": {"content": [token]}}]}
    assert parse_choice(answer, "chat", 3)["logprobs"][0]["top"] == {"x": 0, "y": -1, "z": -2}
