"""Issue 22: the LM teacher cache built from a served teacher (prompt log-probabilities over HTTP, vLLM's
``prompt_logprobs`` or ``echo`` + ``logprobs``) equals the one the local teacher writes; a server that reads other
tokens is caught at the first block, or its blocks skipped and counted; faults are retried."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml
from lm_fixtures import TEXT, save_tiny
from torch import nn

from distill.errors import DistillError
from distill.losses.sparse import sparse_targets_from_logits
from distill.recipe import EndpointSpec, LMEndpointSpec
from distill.teachers.lm_cache import LMCache, build_lm_cache
from distill.teachers.lm_signals import SparseSignal, StudentTokens
from distill.teachers.served_cache import EchoClient, Pieces, as_logits, served_teacher_logits
from distill.testing.prompt_server import PromptLogprobHandler, Unprocessable, llama_pieces, serve

K = 8
SEQ = 16


class FaultyServer(PromptLogprobHandler):
    """The reference server with faults, consumed one per request: "503", "cut" (a body shorter than its
    Content-Length), "garbage" (not JSON), "retokenized" (the server read one token of an id prompt differently);
    ``misread`` maps token ids the server reads as others, in every prompt (a server with another tokenizer).
    Hostile answers: "negative", "mass", "outside", "huge", "huge-unsized" (see ``spoiled``); "trickle" (the answer
    a byte every 50 ms, each well within any socket timeout, for at most 5 s); "redirect:CODE" (to ``redirect_to``).
    """

    faults: list[str] = []
    answered: list[int] = []  # the first token of each whole block answered in full
    misread: dict[int, int] = {}
    redirect_to = "http://localhost:9/v1/completions"

    def prompt_ids(self, body: dict) -> list[int]:
        return [self.misread.get(i, i) for i in super().prompt_ids(body)]

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            fault = FaultyServer.faults.pop(0) if FaultyServer.faults else "ok"
        if fault == "503":
            self.reply(503, b'{"error": "busy"}')
            return
        if fault.startswith("redirect:"):
            self.send_response(int(fault.partition(":")[2]))
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "retokenized":
            body["prompt"][3] = (body["prompt"][3] + 1) % self.vocab_size
        try:
            payload = b"{not json" if fault == "garbage" else self.answer(body)
        except Unprocessable as exc:
            self.reply(exc.status, json.dumps({"error": {"message": str(exc)}}).encode())
            return
        if fault in ("negative", "mass", "outside", "huge", "huge-unsized", "trickle"):
            self.hostile(fault, payload)
            return
        self.reply(200, payload, cut=fault == "cut")
        ids = self.prompt_ids(body)
        if fault == "ok" and len(ids) == SEQ and (body.get("echo") or "prompt_logprobs" in body):
            with self.lock:
                FaultyServer.answered.append(ids[0])

    def hostile(self, fault: str, payload: bytes) -> None:
        payload = payload if fault == "trickle" else spoiled(fault, payload)
        self.send_response(200)
        if fault != "huge-unsized":  # without a Content-Length the answer runs until the connection closes
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        give_up = time.monotonic() + 5
        try:
            if fault != "trickle":
                self.wfile.write(payload)
                return
            for byte in payload:
                if time.monotonic() > give_up:
                    return
                self.wfile.write(bytes([byte]))
                time.sleep(0.05)
        except OSError:  # the client hung up, as it should
            pass


def spoiled(fault: str, payload: bytes) -> bytes:
    """The answer made hostile: "negative" lists position 2's most likely token as id -1 (old code: row V - 1 of the
    cache got it), "mass" gives every alternative at position 2 a log-prob of -0.01 (they add up to ~k), "outside"
    adds there an unlikely id past any vocabulary (a padded row), "huge" and "huge-unsized" pad it with 16 MB of
    blanks."""
    answer = json.loads(payload)
    choice = answer["choices"][0]
    if fault == "negative":
        entry = choice["prompt_logprobs"][2]
        entry["-1"] = entry.pop(max(entry, key=lambda i: entry[i]["logprob"]))
    elif fault == "outside":
        choice["prompt_logprobs"][2]["1000000"] = {"logprob": -20.0, "rank": 1000000}
    elif fault == "mass" and "prompt_logprobs" in choice:
        for value in choice["prompt_logprobs"][2].values():
            value["logprob"] = -0.01
    elif fault == "mass":
        tops = choice["logprobs"]["top_logprobs"]
        tops[2] = dict.fromkeys(tops[2], -0.01)
    else:
        answer["padding"] = " " * 16_000_000
    return json.dumps(answer).encode()


class Unambiguous(nn.Module):
    """The tiny teacher with the tokens llama.cpp cannot tell apart by their text (lone bytes of multi-byte
    characters, special tokens) pushed 30 nats down, so that no top-k holds one: the echo cache then equals the
    local one exactly."""

    def __init__(self, model: nn.Module, pieces: Pieces):
        super().__init__()
        self.model = model
        self.register_buffer("bias", torch.zeros(model.config.vocab_size))
        self.bias[[i for ids in pieces.ids_of.values() if len(ids) > 1 for i in ids]] = -30.0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        out.logits = out.logits + self.bias
        return out


@pytest.fixture(scope="module")
def pieces(tok):
    return Pieces(tok.decode, len(tok))


@pytest.fixture(scope="module")
def plain(teacher, pieces):
    return Unambiguous(teacher, pieces).eval()


@pytest.fixture
def server(tok, teacher):
    FaultyServer.faults, FaultyServer.answered, FaultyServer.misread = [], [], {}
    with serve(teacher, len(tok), FaultyServer) as url:
        yield url


ECHO_SERVERS = {"openai-ids": ("current", False), "llama-cpp-text": ("next", True)}


@pytest.fixture(params=list(ECHO_SERVERS))
def echo_server(request, tok, plain):
    """The unambiguous teacher in echo format: OpenAI's layout taking token ids, or llama-cpp-python's taking text."""
    FaultyServer.faults, FaultyServer.answered, FaultyServer.misread = [], [], {}
    layout, text_only = ECHO_SERVERS[request.param]
    with serve(plain, len(tok), FaultyServer, tokenizer=tok, layout=layout, text_only=text_only) as url:
        yield url


def blocks(tok, n: int = 6, size: int = SEQ) -> np.ndarray:
    ids = tok(TEXT * 3)["input_ids"]
    return np.array([ids[i * size : (i + 1) * size] for i in range(n)], dtype=np.int64)


def endpoint(url: str, **options) -> EndpointSpec:
    return LMEndpointSpec(url=url, api="completions", concurrency=3, retries=4, backoff=0.01, timeout=10, **options)


def local_logits(model):
    @torch.no_grad()
    def logits(input_ids):
        return model(input_ids=input_ids).logits.float()

    return logits


def build(fn, ids, path, vocab):
    options = {"mode": "topk", "k": K, "teacher_id": "t", "data_id": "d", "vocab_size": vocab, "shard_blocks": 4}
    build_lm_cache(fn, ids, path, batch_size=3, progress=False, **options)
    return LMCache.open(path, teacher_id="t", data_id="d", temperature=1.0)


def assert_same_cache(local: LMCache, served: LMCache, rows) -> None:
    a, b = local[rows], served[rows]
    # The last position predicts a token outside the block: no loss reads it (SparseSignal drops it).
    assert torch.equal(a.ids[:, :-1], b.ids[:, :-1])
    assert torch.allclose(a.logp[:, :-1].float(), b.logp[:, :-1].float(), atol=2e-3, rtol=0)  # float16 on disk
    assert torch.allclose(a.tail[:, :-1].float(), b.tail[:, :-1].float(), atol=2e-3, rtol=0)


def assert_teachers_own(model, logits: torch.Tensor, ids: np.ndarray, vocab: int) -> None:
    """Before float16 storage: the top-k and tail rebuilt from the server's answer are the teacher's own."""
    with torch.no_grad():
        local = model(input_ids=torch.from_numpy(ids)).logits.float()
    a = sparse_targets_from_logits(local[:, :-1], mode="topk", k=K, vocab_size=vocab)
    b = sparse_targets_from_logits(logits[:, :-1], mode="topk", k=K, vocab_size=vocab)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.logp.double(), b.logp, atol=1e-5, rtol=0)
    # The server gives only the top k: its tail is 1 − Σ top-k, compared as a probability (a tiny tail is known to
    # its float32 rounding only, which moves no loss).
    assert torch.allclose(a.tail.double().exp(), b.tail.exp(), atol=1e-5, rtol=0)


def test_served_cache_equals_the_local_one(tok, teacher, server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    local = build(local_logits(teacher), ids, tmp_path / "local", vocab)
    served = build(served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids), ids, tmp_path / "served", vocab)
    assert_same_cache(local, served, torch.arange(len(ids)))
    assert sorted(FaultyServer.answered) == sorted(ids[:, 0].tolist())  # each block asked once
    assert json.loads((tmp_path / "served" / "meta.json").read_text())["teacher_notes"] == {"format": "prompt_logprobs"}


def test_served_log_probs_match_the_teachers_within_1e_5(tok, teacher, server):
    ids, vocab = blocks(tok, n=2), len(tok)
    answer = served_teacher_logits(endpoint(server), vocab, K, tok.decode, ids)(torch.from_numpy(ids))
    assert_teachers_own(teacher, answer.logits, ids, vocab)


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


# ---- echo + logprobs ----


def test_pieces_match_llama_cpps_spelling(tok, pieces):
    """Our spellings (from the tokenizer's decode) hold the piece llama.cpp writes for every id (from the token's
    bytes), and the pieces several ids share are exactly the lone bytes and the special tokens."""
    served = llama_pieces(tok, len(tok))
    assert all(served[i] in pieces.spellings[i] for i in range(len(tok)))
    shared = {piece for piece, ids in pieces.ids_of.items() if len(ids) > 1}
    assert shared == {"", "\ufffd"}
    assert pieces.ids_of[""] == sorted(
        {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id} | set(pieces.ids_of["\ufffd"])
    )


def test_echo_cache_equals_the_local_one(tok, plain, echo_server, tmp_path, request):
    """Either layout, token ids or text: the same cache, every block asked once, the layout found by the probe."""
    ids, vocab = blocks(tok), len(tok)
    fn = served_teacher_logits(endpoint(echo_server, format="echo"), vocab, K, tok.decode, ids)
    assert_teachers_own(plain, fn(torch.from_numpy(ids[:2])).logits, ids[:2], vocab)
    FaultyServer.answered = []
    local = build(local_logits(plain), ids, tmp_path / "local", vocab)
    served = build(fn, ids, tmp_path / "served", vocab)
    assert_same_cache(local, served, torch.arange(len(ids)))
    assert sorted(FaultyServer.answered) == sorted(ids[:, 0].tolist())
    meta = json.loads((tmp_path / "served" / "meta.json").read_text())
    layout, text_only = ECHO_SERVERS[request.node.callspec.params["echo_server"]]
    assert meta["teacher_notes"] == {"format": "echo", "layout": layout, "prompt": "text" if text_only else "ids"}
    assert meta["teacher_counts"]["dropped_ambiguous"] == meta["teacher_counts"]["dropped_unknown"] == 0


def test_echo_never_places_an_alternative_on_the_wrong_token(tok, teacher, pieces):
    """The random teacher ranks lone bytes and special tokens high: the pieces llama.cpp writes for them ("") are
    dropped and counted, and every log-prob kept is the teacher's own for that id."""
    ids, vocab = blocks(tok, n=3), len(tok)
    FaultyServer.faults, FaultyServer.misread = [], {}
    with torch.no_grad():
        local = torch.log_softmax(teacher(input_ids=torch.from_numpy(ids)).logits.float()[..., :vocab], -1)
    ambiguous = {i for piece in ("", "\ufffd") for i in pieces.ids_of[piece]}
    for layout, text_only in ECHO_SERVERS.values():
        with serve(teacher, vocab, FaultyServer, tokenizer=tok, layout=layout, text_only=text_only) as url:
            client = EchoClient(endpoint(url, format="echo"), vocab, K, tok.decode)
            client.settle(ids.tolist(), list(range(len(ids))))
            answers = [client.entries(row, b) for b, row in enumerate(ids.tolist())]
        counts = client.take_counts()
        assert counts["dropped_ambiguous"] > 0 and counts["dropped_unknown"] == 0
        placed = [
            (b, t, i, v) for b, entries in enumerate(answers) for t in range(1, SEQ) for i, v in entries[t].items()
        ]
        assert len(placed) >= (SEQ - 1) * len(ids)  # (a dict holds one "" however many such tokens its top-k had)
        assert not {i for _, _, i, _ in placed} & ambiguous
        theirs = torch.tensor([v for *_, v in placed])
        ours = torch.stack([local[b, t - 1, i] for b, t, i, _ in placed])
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)


def misreading(tok, ids: np.ndarray) -> tuple[int, int, int]:
    """A token of block 0 outside the probe's windows (its first 12 tokens), a token the server reads instead (another
    piece), and the position where block 0 first holds it."""
    token = next(int(t) for t in ids[0, 12:] if t not in ids[0, :12])
    other = next(i for i in range(3, len(tok)) if tok.decode([i]).strip() and tok.decode([i]) != tok.decode([token]))
    return token, other, int(np.nonzero(ids[0] == token)[0][0])


def test_echo_server_reading_other_tokens_is_caught_at_the_first_block(tok, echo_server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    token, other, position = misreading(tok, ids)
    FaultyServer.misread = {token: other}
    fn = served_teacher_logits(endpoint(echo_server, format="echo"), vocab, K, tok.decode, ids)
    expected = (
        rf"served teacher: block 0, position {position}: we sent token {token} \({tok.decode([token])!r}\) but the "
        rf"server read {tok.decode([other])!r}"
    )
    with pytest.raises(DistillError, match=expected):
        build(fn, ids, tmp_path / "c", vocab)
    assert not (tmp_path / "c" / "meta.json").exists() and not list((tmp_path / "c").glob("shard-*"))


def test_on_mismatch_skip_leaves_the_blocks_out_and_counts_them(tok, plain, echo_server, tmp_path, capsys):
    ids, vocab = blocks(tok), len(tok)
    token, other, _ = misreading(tok, ids)
    FaultyServer.misread = {token: other}
    fn = served_teacher_logits(endpoint(echo_server, format="echo", on_mismatch="skip"), vocab, K, tok.decode, ids)
    build_lm_cache(fn, ids, tmp_path / "c", mode="topk", k=K, teacher_id="t", data_id="d", vocab_size=vocab,
                   batch_size=3, shard_blocks=4)  # fmt: skip
    cache = LMCache.open(tmp_path / "c", teacher_id="t", data_id="d", temperature=1.0, verify=True)
    misread = [b for b in range(len(ids)) if token in ids[b]]
    assert 0 < len(misread) < len(ids)
    assert cache.meta["skipped_blocks"] == misread and cache.skipped.nonzero()[0].tolist() == misread
    out = capsys.readouterr().out
    assert out.count(f"{len(misread)} of {len(ids)} blocks skipped") == 1 and "first: served teacher: block 0" in out
    kept = torch.tensor([b for b in range(len(ids)) if b not in misread])
    assert_same_cache(build(local_logits(plain), ids, tmp_path / "local", vocab), cache, kept)
    # A skipped block has no targets: read directly it is an error, through lookup it is masked out.
    with pytest.raises(DistillError, match=rf"block {misread[0]} has no teacher targets"):
        cache[torch.tensor(misread[:1])]
    rows = torch.arange(len(ids))
    targets, scored = cache.lookup(rows, 0)
    assert scored.shape == (len(ids), SEQ) and scored.dtype == torch.bool
    assert scored.all(-1).tolist() == [b not in misread for b in range(len(ids))] and scored.any(-1).equal(
        scored.all(-1)
    )
    assert torch.equal(targets.ids[kept], cache[kept].ids)
    # SparseSignal distils the kept blocks only.
    tokens = StudentTokens(hidden=torch.zeros(len(ids), SEQ - 1, 4), weight=torch.zeros(vocab, 4), bias=None,
                           rows=rows, ids=torch.from_numpy(ids), attention=torch.ones(len(ids), SEQ),
                           mask=torch.ones(len(ids), SEQ - 1, dtype=torch.bool), chunk_size=8, vocab_size=vocab,
                           size=float(len(ids) * (SEQ - 1)))  # fmt: skip
    _, distilled = SparseSignal(cache.lookup, 1.0)._targets(tokens)
    assert distilled.sum().item() == len(kept) * (SEQ - 1)
    # A cache that skipped nothing masks nothing.
    assert build(local_logits(plain), ids, tmp_path / "local", vocab).lookup(rows, 0)[1] is None


def test_echo_faults_are_retried_and_nothing_is_written_twice(tok, plain, echo_server, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults = ["503", "cut", "garbage", "ok", "503", "cut", "ok", "garbage", "503", "ok", "cut"]
    fn = served_teacher_logits(endpoint(echo_server, format="echo"), vocab, K, tok.decode, ids)
    cache = build(fn, ids, tmp_path / "c", vocab)
    assert not FaultyServer.faults
    assert sorted(FaultyServer.answered) == sorted(ids[:, 0].tolist())
    assert [shard["blocks"] for shard in cache.meta["shards"]] == [4, 2]
    assert_same_cache(build(local_logits(plain), ids, tmp_path / "local", vocab), cache, torch.arange(len(ids)))


class Unaligned(FaultyServer):
    """Echo dicts one position late: position t holds the distribution of token t - 1, which neither convention
    does."""

    def answer(self, body: dict) -> bytes:
        payload = super().answer(body)
        if not body.get("echo"):
            return payload
        answer = json.loads(payload)
        tops = answer["choices"][0]["logprobs"]["top_logprobs"]
        answer["choices"][0]["logprobs"]["top_logprobs"] = [None, None, *tops[1:-1]]
        return json.dumps(answer).encode()


def test_an_echo_server_whose_log_probs_line_up_with_no_token_is_refused(tok, plain, tmp_path):
    ids, vocab = blocks(tok), len(tok)
    FaultyServer.faults, FaultyServer.misread = [], {}
    with serve(plain, vocab, Unaligned, tokenizer=tok) as url:
        fn = served_teacher_logits(endpoint(url, format="echo"), vocab, K, tok.decode, ids)
        with pytest.raises(DistillError, match=r"cannot tell which token the server's log-probabilities are for"):
            build(fn, ids, tmp_path / "c", vocab)


@pytest.mark.parametrize("served_format", ["prompt_logprobs", "echo"])
def test_distill_cache_from_a_served_teacher(tok, teacher, tmp_path, served_format):
    """``distill cache RECIPE`` with teacher.endpoint writes the cache the run then reads; bad settings are one line."""
    from test_cli import assert_one_line_error, distill

    from distill.tasks import load_recipe, parse_recipe
    from distill.tasks.causal_lm import setup
    from distill.teachers.lm_choice import cache_path

    folder = save_tiny(teacher, tok, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TEXT * 4)
    FaultyServer.faults, FaultyServer.answered, FaultyServer.misread = [], [], {}
    options = {"layout": "next", "text_only": True} if served_format == "echo" else {}
    with serve(teacher, len(tok), FaultyServer, tokenizer=tok, **options) as url:
        spec = {"url": url, "api": "completions", "backoff": 0.01, "format": served_format, "on_mismatch": "skip"}
        raw = {
            "task": "causal_lm",
            "data": {"source": "text", "path": str(tmp_path / "train.txt"), "block_size": 16, "heldout_fraction": 0.2},
            "teacher": {"path": str(folder), "endpoint": spec},
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
    meta = json.loads((path / "meta.json").read_text())
    assert meta["teacher_notes"]["format"] == served_format and "skipped_blocks" not in meta
    if served_format == "echo":  # one CLI round for the refusals is enough
        raw["teacher"]["endpoint"]["on_mismatch"] = "sometimes"
        with pytest.raises(DistillError, match="on_mismatch"):
            parse_recipe(raw)
        return
    raw["distill"]["temperature"] = 2.0
    recipe_path.write_text(yaml.safe_dump(raw))
    assert_one_line_error(distill("cache", recipe_path, "--out", tmp_path / "run2"), "temperature 1")


def test_a_run_distils_the_blocks_a_served_cache_kept_and_skips_the_others(tok, teacher, tmp_path):
    """``on_mismatch: skip`` end to end: ``distill run`` trains on a cache with skipped blocks (no KD there)."""
    from distill.tasks import parse_recipe, run_recipe
    from distill.tasks.causal_lm import setup

    folder = save_tiny(teacher, tok, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(TEXT * 4)
    spec = {"api": "completions", "backoff": 0.01, "format": "echo", "on_mismatch": "skip"}
    raw = {
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp_path / "train.txt"), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(folder), "endpoint": {"url": "http://127.0.0.1:9", **spec}},
        "student": {"from_teacher": {"keep": 1}, "train": {"max_steps": 2, "batch_size": 4}},
        "distill": {"signal": "cache", "cache_mode": "topk", "cache_k": K, "temperature": 1.0},
        "baseline": False,
        "eval": {"generations": 0},
    }
    train = setup(parse_recipe(raw)).train.input_ids
    probed = set(train[0, :12].tolist())
    token = next(int(t) for t in np.unique(train[1:]) if t not in probed and (train == t).any(1).mean() < 0.8)
    FaultyServer.faults, FaultyServer.answered = [], []
    FaultyServer.misread = {token: next(i for i in range(3, len(tok)) if i != token and tok.decode([i]).strip())}
    with serve(teacher, len(tok), FaultyServer, tokenizer=tok, layout="next", text_only=True) as url:
        raw["teacher"]["endpoint"]["url"] = url
        metrics = run_recipe(parse_recipe(raw), tmp_path / "run")
    FaultyServer.misread = {}
    skipped = [b for b in range(len(train)) if token in train[b]]
    assert 0 < len(skipped) < len(train)
    meta = json.loads(next((tmp_path / "run").rglob("meta.json")).read_text())
    assert meta["skipped_blocks"] == skipped
    assert metrics["models"]["student"]["perplexity"] > 0
