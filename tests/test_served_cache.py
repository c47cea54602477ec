"""Issue 22: the LM teacher cache built from a served teacher (prompt log-probabilities over HTTP) equals the one
the local teacher writes; a server that reads other tokens is caught at the first block; faults are retried."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from lm_fixtures import TEXT, save_tiny, tiny_llama, tiny_tokenizer

from distill.errors import DistillError
from distill.losses.sparse import sparse_targets_from_logits
from distill.recipe import EndpointSpec
from distill.teachers.lm_cache import LMCache, build_lm_cache
from distill.teachers.prompt_server import PromptLogprobHandler, serve
from distill.teachers.served_cache import as_logits, served_teacher_logits

K = 8


class FaultyServer(PromptLogprobHandler):
    """The reference server with faults, consumed one per request: "503", "cut" (a body shorter than its
    Content-Length), "garbage" (not JSON), "retokenized" (the server read one token differently)."""

    faults: list[str] = []
    answered: list[int] = []  # the first token of each block answered in full

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            fault = FaultyServer.faults.pop(0) if FaultyServer.faults else "ok"
        if fault == "503":
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": "busy"}')
            return
        if fault == "retokenized":
            body["prompt"][3] = (body["prompt"][3] + 1) % self.vocab_size
        payload = b"{not json" if fault == "garbage" else self.answer(body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2] if fault == "cut" else payload)
        if fault == "ok":
            with self.lock:
                FaultyServer.answered.append(body["prompt"][0])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny_llama(tok, layers=2)


@pytest.fixture
def server(tok, teacher):
    FaultyServer.faults, FaultyServer.answered = [], []
    with serve(teacher, len(tok), FaultyServer) as url:
        yield url


def blocks(tok, n: int = 6, size: int = 16) -> np.ndarray:
    ids = tok(TEXT * 3)["input_ids"]
    return np.array([ids[i * size : (i + 1) * size] for i in range(n)], dtype=np.int64)


def endpoint(url: str) -> EndpointSpec:
    return EndpointSpec(url=url, api="completions", concurrency=3, retries=4, backoff=0.01, timeout=10)


def local_logits(model):
    @torch.no_grad()
    def logits(input_ids):
        return model(input_ids=input_ids).logits.float()

    return logits


def build(fn, ids, path, vocab):
    options = {"mode": "topk", "k": K, "teacher_id": "t", "data_id": "d", "vocab_size": vocab, "shard_blocks": 4}
    build_lm_cache(fn, ids, path, batch_size=3, progress=False, **options)
    return LMCache.open(path, teacher_id="t", data_id="d", temperature=1.0)


def test_served_cache_equals_the_local_one(tok, teacher, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    local = build(local_logits(teacher), ids, tmp_path / "local", vocab)
    served = build(served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids), ids, tmp_path / "served", vocab)
    rows = torch.arange(len(ids))
    a, b = local[rows], served[rows]
    # The last position predicts a token outside the block: no loss reads it (SparseSignal drops it).
    assert torch.equal(a.ids[:, :-1], b.ids[:, :-1])
    assert torch.allclose(a.logp[:, :-1].float(), b.logp[:, :-1].float(), atol=2e-3, rtol=0)  # float16 on disk
    assert torch.allclose(a.tail[:, :-1].float(), b.tail[:, :-1].float(), atol=2e-3, rtol=0)
    assert sorted(FaultyServer.answered) == sorted(ids[:, 0].tolist())  # each block asked once


def test_served_log_probs_match_the_teachers_within_1e_5(tok, teacher, server):
    """Before float16 storage: the top-k and tail rebuilt from the server's answer are the teacher's own."""
    ids, vocab = blocks(tok, n=2), len(tok)
    served = served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids)(torch.from_numpy(ids))
    with torch.no_grad():
        local = teacher(input_ids=torch.from_numpy(ids)).logits.float()
    a = sparse_targets_from_logits(local[:, :-1], mode="topk", k=K, vocab_size=vocab)
    b = sparse_targets_from_logits(served[:, :-1], mode="topk", k=K, vocab_size=vocab)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.logp.double(), b.logp, atol=1e-5, rtol=0)
    # The server gives only the top k: its tail is 1 − Σ top-k, compared as a probability (a tiny tail is known to
    # its float32 rounding only, which moves no loss).
    assert torch.allclose(a.tail.double().exp(), b.tail.exp(), atol=1e-5, rtol=0)


def test_faults_are_retried_and_nothing_is_written_twice(tok, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults = ["503", "cut", "garbage", "ok", "503"]
    cache = build(served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids), ids, tmp_path / "c", vocab)
    assert len(cache) == len(ids)
    assert sorted(FaultyServer.answered) == sorted(ids[:, 0].tolist())
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert [shard["blocks"] for shard in meta["shards"]] == [4, 2]


def test_a_server_reading_other_tokens_is_caught_at_the_first_block(tok, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults = ["retokenized"] * 3
    with pytest.raises(DistillError, match=r"served teacher: block [0-2], position 3: we sent token \d+"):
        build(served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids), ids, tmp_path / "c", vocab)
    assert not (tmp_path / "c" / "meta.json").exists() and not list((tmp_path / "c").glob("shard-*"))


def test_rebuilt_distribution_keeps_the_servers_top_k_and_tail():
    entries = [None, {5: -0.5, 7: -1.5, 9: -3.0}, {1: -0.1}]
    logits = as_logits(entries, vocab_size=20, k=2)
    p = torch.softmax(logits[0].double(), -1)
    assert p[5].item() == pytest.approx(np.exp(-0.5), abs=1e-6) and p[7].item() == pytest.approx(np.exp(-1.5), abs=1e-6)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert p[9].item() == pytest.approx((1 - np.exp(-0.5) - np.exp(-1.5)) / 18, abs=1e-6)  # k=2: 9 joins the tail


def test_distill_cache_from_a_served_teacher(tok, teacher, server, tmp_path):
    """``distill cache RECIPE`` with teacher.endpoint writes the cache the run then reads; bad settings are one line."""
    from test_cli import assert_one_line_error, distill

    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import cache_path, setup

    folder = save_tiny(teacher, tok, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TEXT * 4)
    raw = {
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp_path / "train.txt"), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(folder), "endpoint": {"url": server, "api": "completions", "backoff": 0.01}},
        "student": {"from_teacher": {"keep": 1}},
        "distill": {"signal": "cache", "cache_mode": "topk", "cache_k": K, "temperature": 1.0},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    done = distill("cache", recipe_path, "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    recipe = load_recipe(recipe_path)
    path = cache_path(recipe, tmp_path / "run", setup(recipe))
    assert path.name.startswith("teacher-served-") and (path / "meta.json").exists()
    raw["distill"]["temperature"] = 2.0
    recipe_path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(distill("cache", recipe_path, "--out", tmp_path / "run2"), "temperature 1")
