"""Reasoning distillation pieces: the arithmetic task, on-policy (GKD) batches, reasoning-gym verification."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import tiny_llama

from distill.data.token_blocks import IGNORE_INDEX, encode_pairs
from distill.tasks.verify import exact_match, extract_answer
from distill.teachers.onpolicy import OnPolicyBatches, prompt_lengths, sample_completions
from distill.testing.arithmetic import char_tokenizer, make_problems


def test_problems_are_solved_correctly_and_held_out_ones_never_repeat():
    heldout = make_problems(50, seed=1)
    train = make_problems(500, seed=2, exclude={p["prompt"] for p in heldout})
    assert not {p["prompt"] for p in heldout} & {p["prompt"] for p in train}
    assert len({p["prompt"] for p in train}) == 500
    for p in train[:100]:
        assert eval(p["prompt"].rstrip("=")) == int(p["answer"])  # noqa: S307 - digits and +/- only
        for step in p["solution"].split(";")[:-1]:
            left, right = step.split("=")
            assert eval(left) == int(right)  # noqa: S307
        assert exact_match(p["solution"], p) == 1.0 and extract_answer(p["solution"]) == p["answer"]
    assert make_problems(5, seed=3) == make_problems(5, seed=3)


def test_modular_problems_reduce_every_step():
    problems = make_problems(200, seed=4, terms=6, digits=1, modulus=10)
    for p in problems:
        total = eval(p["prompt"].rstrip("=")) % 10  # noqa: S307 - digits and +/- only
        assert p["answer"] == str(total)
        steps = p["solution"].split(";")
        assert len(steps) == 6 and steps[-1] == f"answer {total}"
        for step in steps[:-1]:
            left, right = step.split("=")
            assert eval(left) % 10 == int(right) and 0 <= int(right) < 10  # noqa: S307
    assert {n for p in problems for n in p["prompt"].rstrip("=").replace("-", "+").split("+")} == set("0123456789")


def test_char_tokenizer_round_trips():
    tokenizer = char_tokenizer()
    text = "12+34=46;46-7=39;answer 39"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def models():
    tokenizer = char_tokenizer()
    student, teacher = tiny_llama(tokenizer, layers=1, seed=0), tiny_llama(tokenizer, layers=2, seed=1)
    student.config.pad_token_id = teacher.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, student.double(), teacher.double()


def test_sampled_completions_are_right_padded_and_labelled_up_to_eos(models):
    tokenizer, student, _ = models
    prompts = [tokenizer("12+3=")["input_ids"], tokenizer("1+2+30=")["input_ids"]]
    ids, attention, labels = sample_completions(
        student,
        prompts,
        max_new_tokens=6,
        temperature=1.0,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    for row, prompt in enumerate(prompts):
        n = int(attention[row].sum())
        assert ids[row, : len(prompt)].tolist() == prompt  # the prompt starts at position 0
        assert (labels[row, : len(prompt)] == IGNORE_INDEX).all()
        generated = labels[row, len(prompt) : n]
        assert 1 <= len(generated) <= 6 and (generated == ids[row, len(prompt) : n]).all()
        assert (labels[row, n:] == IGNORE_INDEX).all() and (attention[row, n:] == 0).all()
        assert tokenizer.eos_token_id not in generated[:-1].tolist()


def reference_jsd(student, teacher, ids, attention, labels, beta):
    """float64, full logits: beta·KL(P‖M) + (1-beta)·KL(Q‖M), M = beta·P + (1-beta)·Q, P teacher, Q student,
    averaged over the response tokens."""
    with torch.no_grad():
        p = F.softmax(teacher(input_ids=ids, attention_mask=attention).logits[:, :-1].double(), -1)
    q = F.softmax(student(input_ids=ids, attention_mask=attention).logits[:, :-1].double(), -1)
    m = beta * p + (1 - beta) * q
    kl_pm = (p * (p.clamp_min(1e-300).log() - m.log())).sum(-1)
    kl_qm = (q * (q.clamp_min(1e-300).log() - m.log())).sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return ((beta * kl_pm + (1 - beta) * kl_qm) * mask).sum() / mask.sum()


def test_fixed_data_step_matches_a_float64_jsd_reference(models):
    tokenizer, student, teacher = models
    problems = make_problems(6, seed=0)
    data = encode_pairs([(p["prompt"], p["solution"]) for p in problems], tokenizer, 64)
    assert (prompt_lengths(data) == [len(p["prompt"]) for p in problems]).all()
    vocab = len(tokenizer)
    batches = OnPolicyBatches(
        data, teacher, vocab, lam=0.0, beta=0.3, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
    )
    rows = torch.arange(6)
    got = batches.loss(student, rows, torch.device("cpu"))
    assert got["on_policy"] == 0.0
    ids, attention = torch.from_numpy(data.input_ids).long(), torch.from_numpy(data.attention_mask).long()
    labels = torch.from_numpy(data.labels)
    # the reference over the real vocabulary only: padded rows get no probability in the loss
    student.lm_head.weight.data[vocab:] = -1e4
    teacher.lm_head.weight.data[vocab:] = -1e4
    expected = reference_jsd(student, teacher, ids, attention, labels, 0.3)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-6, atol=1e-9)


def test_on_policy_step_trains_on_the_students_own_samples(models):
    tokenizer, student, teacher = models
    problems = make_problems(4, seed=0)
    data = encode_pairs([(p["prompt"], p["solution"]) for p in problems], tokenizer, 64)
    batches = OnPolicyBatches(
        data,
        teacher,
        len(tokenizer),
        lam=1.0,
        max_new_tokens=5,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    student.zero_grad()
    got = batches.loss(student, torch.arange(4), torch.device("cpu"))
    assert got["on_policy"] == 1.0 and got["loss"] > 0
    got["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert OnPolicyBatches(data, teacher, len(tokenizer), lam=0.5).on_policy(torch.arange(4)) in (True, False)
    choices = {
        OnPolicyBatches(data, teacher, len(tokenizer), lam=0.5, seed=s).on_policy(torch.arange(4)) for s in range(20)
    }
    assert choices == {True, False}  # lam mixes the two kinds of step
    np.testing.assert_array_equal(batches.weights, (data.labels[:, 1:] != IGNORE_INDEX).sum(1))


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is not installed")
def test_reasoning_gym_scorer_verifies_traces():
    import reasoning_gym

    from distill.tasks.verify import reasoning_gym_score

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0, min_terms=2, max_terms=2, max_digits=1)[0]
    assert reasoning_gym_score(f"step one... The answer is {entry['answer']}", {"entry": entry}) == 1.0
    assert reasoning_gym_score("The answer is 123456789", {"entry": entry}) < 1.0


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
def test_onpolicy_distillation_through_distill_run(tmp_path):
    """``distill.onpolicy`` in a causal-LM recipe: every student step (lam 1) completes the prompts with the student
    and trains on the teacher's JSD; the run ends with a report, and a bad combination is one line."""
    import json
    import subprocess
    import sys

    import yaml
    from lm_fixtures import save_tiny

    tokenizer = char_tokenizer()
    save_tiny(tiny_llama(tokenizer, layers=2, seed=1), tokenizer, tmp_path / "teacher")
    with (tmp_path / "pairs.jsonl").open("w") as handle:
        for p in make_problems(24, seed=5):
            handle.write(json.dumps({"prompt": p["prompt"], "response": p["solution"]}) + "\n")
    recipe = {
        "task": "causal_lm",
        "data": {"source": "jsonl", "path": str(tmp_path / "pairs.jsonl"), "block_size": 48, "heldout_fraction": 0.2},
        "teacher": {"path": str(tmp_path / "teacher")},
        "student": {"from_teacher": {"keep": 1}, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "log_every": 1}},
        "distill": {"signal": "live", "onpolicy": {"lam": 1.0, "beta": 0.5, "max_new_tokens": 6}},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cli = [sys.executable, "-m", "distill.cli", "run", str(tmp_path / "r.yaml")]
    done = subprocess.run([*cli, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if entry["stage"] == "student" and "validation" not in entry]
    assert steps and all(entry["on_policy"] == 1.0 and entry["jsd"] >= 0 for entry in steps)
    assert "student" in json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]
    bad = subprocess.run(
        [*cli, "--out", str(tmp_path / "bad"), "--set", "distill.signal=cache"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "distill.onpolicy needs distill.signal: live" in bad.stderr
    assert not (tmp_path / "bad").exists()
