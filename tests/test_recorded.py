"""Token-level distillation from log-probabilities recorded with the traces (``distill.signal: recorded``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import save_tiny, tiny_llama, tiny_tokenizer

from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.losses.sparse import chunked_sparse_kd_loss, sparse_kd_loss
from distill.models.causal_lm import load_causal_lm
from distill.recipe import LMDistillSpec
from distill.tasks import parse_recipe
from distill.tasks.causal_lm import LMBatches
from distill.tasks.causal_lm import run as run_lm
from distill.tasks.generate import generate
from distill.teachers.lm_signals import SparseSignal
from distill.teachers.recorded import encode_recorded, read_recorded

PROMPTS = ["the quick brown fox", "a teacher writes", "numbers like one two", "the weather today"]


@pytest.fixture(scope="module")
def traces(tok, tmp_path_factory):
    """A tiny local teacher samples completions with its top-4 log-probs through ``distill generate``."""
    folder = tmp_path_factory.mktemp("recorded")
    model = tiny_llama(tok, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a confident teacher: its top 4 hold most of the mass, as a trained one's do
    teacher = save_tiny(model, tok, folder / "teacher")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    spec = parse_recipe(
        {
            "task": "generate",
            "prompts": {"path": str(prompts), "chat_template": False},
            "teacher": {"path": str(teacher)},
            "sampling": {"temperature": 1.0, "max_new_tokens": 8, "samples": 3, "logprobs": 4, "batch_size": 6},
            "verify": {"method": "none"},
        }
    )
    generate(spec, folder / "traces.jsonl")
    return teacher, folder / "traces.kept.jsonl"


def test_rows_are_the_written_tokens_with_the_teachers_distribution_one_position_earlier(tok, traces):
    teacher_dir, kept = traces
    records = read_recorded(kept)
    assert len(records) == 12 and all("tokens" in r and "logprobs" in r for r in records)
    data = encode_recorded(records, tok, 64)
    teacher = load_causal_lm(teacher_dir)[0].double()
    scored_positions = 0
    for row, record in enumerate(records):
        prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
        written = record["tokens"]
        ending = [] if written[-1] == tok.eos_token_id else [tok.eos_token_id]
        ids = [*prompt, *written, *ending]
        assert data.input_ids[row, : len(ids)].tolist() == ids
        assert data.labels[row].tolist() == [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :] + [IGNORE_INDEX] * (
            data.labels.shape[1] - len(ids)
        )
        scored = data.recorded.scored[row]
        assert scored.nonzero()[0].tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(written)))
        # independent check: the teacher's own float64 log-softmax at every scored position
        with torch.no_grad():
            logits = teacher(torch.tensor([ids])).logits[0, :, : len(tok)]
        log_q = F.log_softmax(logits, -1)
        for t in scored.nonzero()[0]:
            top_ids = data.recorded.ids[row, t]
            top_logp = data.recorded.logp[row, t]
            real = top_logp > -math.inf
            assert ids[t + 1] in top_ids[real]  # the written token is always among the candidates
            torch.testing.assert_close(
                torch.from_numpy(top_logp[real]).double(), log_q[t, top_ids[real]], atol=2e-4, rtol=0
            )
            others = torch.ones(len(tok), dtype=torch.bool)
            others[top_ids[real]] = False
            tail = torch.logsumexp(log_q[t][others], -1)
            assert abs(float(data.recorded.tail[row, t]) - float(tail)) < 2e-3
            scored_positions += 1
    assert scored_positions == sum(len(r["tokens"]) for r in records)


def test_loss_is_cross_entropy_plus_top_k_kl_on_scored_positions(tok, traces):
    """Against a float64 reference: α·CE over every response token + (1 − α)·KL over the k recorded tokens plus
    the tail bucket, summed over the positions the teacher scored; both divided by the trained tokens (the
    micro-batch's weight in the loop: the eos a trace did not write is trained but not scored)."""
    _, kept = traces
    data = encode_recorded(read_recorded(kept), tok, 64)
    student = tiny_llama(tok, layers=1, seed=7).double()
    spec = LMDistillSpec(signal="recorded", alpha=0.3)
    signal = SparseSignal(lambda rows, epoch: data.recorded[rows], spec.temperature)
    batches = LMBatches(data, vocab_size=len(tok), chunk_size=5, distill=spec, signal=signal)
    rows = torch.arange(len(data))
    got = batches.loss(student, rows, torch.device("cpu"))

    ids = torch.from_numpy(data.input_ids).long()
    with torch.no_grad():
        logits = student(ids, attention_mask=torch.from_numpy(data.attention_mask).long()).logits[:, :-1, : len(tok)]
    log_p = F.log_softmax(logits.double(), -1)
    labels = torch.from_numpy(data.labels[:, 1:])
    trained = labels != IGNORE_INDEX
    ce = -log_p[trained].gather(-1, labels[trained].unsqueeze(-1)).mean()
    scored = torch.from_numpy(data.recorded.scored[:, :-1])
    assert bool((scored <= trained).all())
    kl = []
    for b, t in scored.nonzero().tolist():
        top = torch.from_numpy(data.recorded.logp[b, t]).double()
        cand = torch.from_numpy(data.recorded.ids[b, t])
        real = top > -math.inf
        q, p = top[real].exp(), log_p[b, t, cand[real]]
        q_tail = 1 - q.sum()
        p_tail = 1 - p.exp().sum()
        tail = q_tail * (q_tail.log() - p_tail.log()) if q_tail > 0 else 0.0
        kl.append((q * (q.log() - p)).sum() + tail)
    kd = torch.stack(kl).sum() / trained.sum()
    torch.testing.assert_close(got["ce"].double(), ce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["kd"].double(), kd, atol=1e-3, rtol=1e-4)  # tails from float32 records
    torch.testing.assert_close(got["loss"].double(), 0.3 * ce + 0.7 * kd, atol=1e-3, rtol=1e-4)


def test_served_text_pieces_map_back_to_ids_and_unmappable_traces_fall_back_to_text(tok, tmp_path):
    prompt, response = "the cat", " sat on the mat"
    written = tok(response, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in written]
    steps = [
        {"token": piece, "logprob": -0.5, "top": {piece: -0.5, "\ufffd": -2.0, tok.decode([written[0]]): -1.0}}
        for piece in pieces
    ]
    records = [
        {"prompt": prompt, "response": response, "logprobs": steps},
        {"prompt": prompt, "response": response, "logprobs": [{"token": "\ufffd", "logprob": -1.0, "top": {}}]},
    ]
    path = tmp_path / "served.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="1 of 2 traces have tokens the tokenizer cannot map back"):
        data = encode_recorded(read_recorded(path), tok, 32)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    both = [*prompt_ids, *written, tok.eos_token_id]
    assert data.input_ids[0, : len(both)].tolist() == data.input_ids[1, : len(both)].tolist() == both
    first = len(prompt_ids) - 1
    ids, logp = data.recorded.ids[0, first], data.recorded.logp[0, first]
    # the written piece and the first piece (the same one here) merge; the ambiguous "\ufffd" goes to the tail
    assert ids[0] == written[0] and logp[0] == pytest.approx(-0.5) and (logp[1:] == -math.inf).all()
    assert data.recorded.tail[0, first] == pytest.approx(math.log(1 - math.exp(-0.5)), abs=1e-6)
    second = data.recorded.logp[0, first + 1]
    assert sorted(second[second > -math.inf].tolist()) == pytest.approx([-1.0, -0.5])
    assert data.recorded.scored[0].sum() == len(written) and not data.recorded.scored[1].any()


def test_recipe_and_trace_errors_are_one_line(tmp_path):
    base = {"task": "causal_lm", "data": {"source": "jsonl", "path": "t.jsonl"}, "distill": {"signal": "recorded"}}
    parse_recipe(base)
    with pytest.raises(DistillError, match="set data.source: jsonl"):
        parse_recipe(base | {"data": {"source": "shakespeare"}})
    with pytest.raises(DistillError, match="temperature: 1"):
        parse_recipe(base | {"distill": {"signal": "recorded", "temperature": 2.0}})
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(DistillError, match="line 1 has no per-token log-probabilities.*sampling.logprobs"):
        read_recorded(plain)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"prompt": "a", "tokens": [99999], "logprobs": [{"token": 99999, "logprob": 0}]}))
    with pytest.raises(DistillError, match="outside the tokenizer's .* another vocabulary"):
        encode_recorded(read_recorded(foreign), tiny_tokenizer(), 16)


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
def test_run_trains_on_traces_with_their_recorded_log_probs(tok, traces, tmp_path):
    teacher_dir, kept = traces
    recipe = parse_recipe(
        {
            "task": "causal_lm",
            "data": {"source": "jsonl", "path": str(kept), "block_size": 32, "heldout_fraction": 0.25},
            "teacher": {"path": str(teacher_dir)},
            "student": {
                "from_teacher": {"keep": 1},
                "train": {"epochs": 3, "batch_size": 3, "optimizer": "adamw", "lr": 1e-3, "log_every": 1},
            },
            "distill": {"signal": "recorded", "alpha": 0.0, "chunk_size": 16},
            "eval": {"batch_size": 4, "threads": 1},
        }
    )
    metrics = run_lm(recipe, tmp_path / "run")
    assert {"teacher", "baseline", "student"} <= set(metrics["models"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kd = [entry["kd"] for entry in log if entry["stage"] == "student" and "validation" not in entry]
    assert len(kd) == 9 and all(math.isfinite(v) and v >= 0 for v in kd)
    assert sum(kd[-3:]) < sum(kd[:3])  # the student moves towards the recorded distributions


def test_short_top_lists_keep_token_zero_in_the_tail(tok):
    """Issue 17.3: rows with fewer than k candidates were padded with id 0, which took token 0 out of the
    student's tail. Top lists here hold 70% of the mass (tail 0.3) and token 0 is likely under the student."""
    tops = [(5, {5: 0.4, 9: 0.2, 11: 0.1}), (7, {7: 0.7}), (12, {12: 0.5, 3: 0.2})]
    steps = [
        {"token": w, "logprob": math.log(top[w]), "top": {str(i): math.log(p) for i, p in top.items()}}
        for w, top in tops
    ]
    data = encode_recorded(
        [{"prompt": "the quick brown fox", "tokens": [w for w, _ in tops], "logprobs": steps}], tok, 32
    )
    targets, scored = data.recorded[torch.arange(1)]
    vocab, width = len(tok), data.input_ids.shape[1]
    torch.manual_seed(0)
    hidden = torch.randn(width, 16, dtype=torch.float64)
    hidden[:, 0] += 4
    head = 0.3 * torch.randn(vocab, 16, dtype=torch.float64)
    head[0] = 0
    head[0, 0] = 2  # token 0 takes about half of the student's mass
    hidden.requires_grad_(True)
    head.requires_grad_(True)

    def reference():
        log_p = F.log_softmax(hidden @ head.T, -1)
        total = 0.0
        for t, (_, top) in zip(scored[0].nonzero()[:, 0].tolist(), tops, strict=True):
            ids = torch.tensor(list(top))
            q = torch.tensor(list(top.values()), dtype=torch.float64)
            p_tail = 1 - log_p[t, ids].exp().sum()
            total = total + (q * (q.log() - log_p[t, ids])).sum() + 0.3 * (math.log(0.3) - p_tail.log())
        return total / len(tops)

    want = reference()
    want_grads = torch.autograd.grad(want, (hidden, head))
    for loss in (
        lambda: sparse_kd_loss((hidden @ head.T)[None], targets, mask=scored),
        lambda: chunked_sparse_kd_loss(hidden[None], head, targets, mask=scored, chunk_size=2),
    ):
        got = loss()
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)  # records are float32
        for g, w in zip(torch.autograd.grad(got, (hidden, head)), want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-6)
