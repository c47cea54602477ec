"""A live causal-LM teacher sharded over the processes of the job (``teacher.shard``, FSDP2 over gloo here): the same
logits, KD loss and student gradients as the whole teacher; never in an optimizer, never given gradients; a run
with it reaches the weights of a run without it; the combinations that cannot shard are one line.

Run as a script under torchrun, this file is the worker of the logits test (``python -m torch.distributed.run
--nproc_per_node 2 tests/test_sharded_teacher.py OUT``).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import CLI

# Float32 forward passes of the same weights on the same inputs: the gathered layers compute exactly what the
# whole model computes (measured: 0.0 on all three models, bfloat16 too); the bound leaves room for a kernel that
# splits its work differently.
LOGITS_ATOL = 1e-6
GRAD_ATOL = 1e-7  # the student's gradients through the KD loss (measured: 0.0)


def _inputs(tok, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different rows per rank, as data parallelism gives them: rank 0 three (one padded), rank 1 one — a rank's
    share may be a single stand-in row, and its forward is still a collective."""
    generator = torch.Generator().manual_seed(100 + rank)
    rows = 3 if rank == 0 else 1
    ids = torch.randint(3, len(tok), (rows, 16), generator=generator)
    attention = torch.ones_like(ids)
    if rows > 1:
        ids[1, 12:], attention[1, 12:] = tok.pad_token_id, 0
    return ids, attention


def _tokens(student, ids, attention, vocab: int):
    from distill.models.causal_lm import head_of, last_hidden
    from distill.teachers.lm_signals import StudentTokens

    hidden = last_hidden(student, ids, attention)[:, :-1]
    weight, bias = head_of(student)
    mask = attention[:, 1:].bool()
    rows = torch.arange(len(ids))
    return StudentTokens(hidden, weight, bias, rows, ids, attention, mask, 8, vocab, float(mask.sum()))


def _student_grads(teacher, student, ids, attention, vocab: int) -> tuple[float, dict]:
    from distill.teachers.lm_signals import LiveLMSignal

    student.zero_grad(set_to_none=True)
    loss = LiveLMSignal(teacher, "forward_kl", 2.0).kd(_tokens(student, ids, attention, vocab))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in student.named_parameters()}


def _all_sharded(model) -> bool:
    """Every parameter is this rank's shard (a DTensor about half the size), none gathered."""
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) and p.to_local().numel() <= -(-p.numel() // 2) for p in model.parameters())


def worker(out: Path) -> None:
    """Under torchrun: each model's logits, KD loss and student gradients, whole and sharded, on this rank's rows."""
    from lm_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer
    from torch.distributed.tensor import DTensor

    from distill import parallel

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tok = tiny_tokenizer()
    ids, attention = _inputs(tok, rank)
    report = {}
    models = {
        "llama": lambda: tiny_llama(tok, layers=4, seed=0),
        "qwen2_tied": lambda: tiny_qwen2(tok, layers=4, seed=0),  # tied head and embeddings, q/k/v biases
        "llama_bf16": lambda: tiny_llama(tok, layers=4, seed=0).to(torch.bfloat16),  # teacher.dtype: bfloat16
    }
    for name, build in models.items():
        whole = build().requires_grad_(False)
        student = tiny_llama(tok, layers=2, seed=3)
        vocab = len(tok)
        sharded = parallel.shard_frozen(copy.deepcopy(whole))
        with torch.no_grad():
            expected = whole(input_ids=ids, attention_mask=attention).logits
            got = sharded(input_ids=ids, attention_mask=attention).logits
        # After forward: every layer freed again, the root (embeddings, norm, head) gathered until release.
        layers_freed = all(isinstance(p, DTensor) for u in parallel.layer_units(sharded) for p in u.parameters())
        root_gathered = not isinstance(sharded.get_output_embeddings().weight, DTensor)
        parallel.release(sharded)
        loss, grads = _student_grads(whole, student, ids, attention, vocab)
        sharded_loss, sharded_grads = _student_grads(sharded, student, ids, attention, vocab)
        report[name] = {
            "logits": (got - expected).abs().max().item(),
            "layers_freed_root_gathered": layers_freed and root_gathered,
            "loss": abs(sharded_loss - loss),
            "grads": max((sharded_grads[k] - g).abs().max().item() for k, g in grads.items()),
            "sharded_between_steps": _all_sharded(sharded),  # the root too: released after the loss
            "no_grads": all(p.grad is None and not p.requires_grad for p in sharded.parameters()),
            "eval": not any(m.training for m in sharded.modules()),
            "units": len(parallel.layer_units(sharded)) + 1,
        }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_sharded_teacher_gives_the_whole_teachers_logits_loss_and_gradients(tmp_path):
    """Two CPU processes (gloo), each on its own rows (one of them a single row): every logit within LOGITS_ATOL of
    the whole teacher's, the KD loss and the student's gradients the same; between steps each process holds only
    its half of every parameter, none of which requires or has a gradient."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in report.items():
            print(rank, name, r)
            assert r["logits"] <= LOGITS_ATOL, (rank, name, r)
            assert r["loss"] <= 1e-6 and r["grads"] <= GRAD_ATOL, (rank, name, r)
            assert r["layers_freed_root_gathered"] and r["sharded_between_steps"], (rank, name, r)
            assert r["no_grads"] and r["eval"], (rank, name, r)
            assert r["units"] == 5  # four layers and the root


def sharded_recipe(tmp_path, **train) -> tuple[Path, dict]:
    """The tiny live-signal LM recipe with ``teacher.shard``: 17 training blocks in batches of 8 over two
    micro-batches, so the last batch is one block that rank 1 has no share of (it runs a stand-in row)."""
    from lm_fixtures import tiny_tokenizer
    from test_lm import write_recipe

    # float32: the runs compare weights across process layouts to 1e-5, below bf16's round-off (auto is bf16 here)
    path, raw = write_recipe(tmp_path, tiny_tokenizer(), "live", baseline=False, mixed_precision="no")
    raw["data"] |= {"limit_train_blocks": 17}
    raw["teacher"]["shard"] = True
    raw["distill"] |= {"alpha": 0.3, "temperature": 2.0}
    raw["student"]["train"] |= {"batch_size": 8, "grad_accum": 2, "max_grad_norm": 1.0, **train}
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def student_weights(run: Path) -> dict:
    return load_file(run / "student" / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_a_run_with_the_sharded_teacher_reaches_the_weights_of_the_unsharded_runs(tmp_path):
    """``distill run`` under 2 processes with ``teacher.shard``: the student of the same recipe without it, under 2
    processes and under one, within 1e-5 (measured: 0 against 2 processes; 3.5e-6 against one, as for any
    2-process run: the data-parallel sums add in another order)."""
    from test_ddp import run_two_processes

    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import run as run_lm

    path, raw = sharded_recipe(tmp_path)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**raw, "teacher": {**raw["teacher"], "shard": False}}))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with torch_threads(1):  # in this process: its imports are done
        run_lm(load_recipe(plain), tmp_path / "one")
    for recipe, out in ((plain, "two_plain"), (path, "two_sharded")):
        two = run_two_processes(recipe, tmp_path / out, env)
        assert two.returncode == 0, two.stderr[-3000:]
        assert ("teacher: sharded over 2 processes, 5 units" in two.stdout) == (out == "two_sharded"), two.stdout
    sharded = student_weights(tmp_path / "two_sharded")
    against_two = max_difference(sharded, student_weights(tmp_path / "two_plain"))
    against_one = max_difference(sharded, student_weights(tmp_path / "one"))
    print(f"sharded teacher, 2 processes: {against_two:.2e} from 2 processes unsharded, {against_one:.2e} from one")
    assert against_two < 1e-5 and against_one < 1e-5
    assert (tmp_path / "two_sharded" / "REPORT.md").exists()


def test_a_sharded_teacher_beside_an_fsdp_student(tmp_path):
    """Two FSDP trees in one step (a big teacher often comes with a student sharded too): under 2 processes the
    student of one process, within 1e-5."""
    from test_ddp import run_two_processes

    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import run as run_lm

    path, _ = sharded_recipe(tmp_path, fsdp=True)
    two = run_two_processes(path, tmp_path / "two", os.environ | {"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "teacher: sharded over 2 processes" in two.stdout
    with torch_threads(1):
        run_lm(load_recipe(path), tmp_path / "one")  # one process: neither is sharded
    difference = max_difference(student_weights(tmp_path / "two"), student_weights(tmp_path / "one"))
    print(f"FSDP student, sharded teacher over 2 processes: {difference:.2e} from one process")
    assert difference < 1e-5, difference


def test_on_policy_steps_score_with_the_sharded_teacher(tmp_path):
    """``distill.onpolicy`` (every step on the student's greedy completions, of different lengths on each rank):
    under 2 processes with the sharded teacher, the student of one process within 1e-5."""
    from lm_fixtures import save_tiny, tiny_llama
    from test_ddp import run_two_processes

    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import run as run_lm
    from distill.testing.arithmetic import char_tokenizer, make_problems

    tokenizer = char_tokenizer()
    save_tiny(tiny_llama(tokenizer, layers=2, seed=1), tokenizer, tmp_path / "teacher")
    pairs = [{"prompt": p["prompt"], "response": p["solution"]} for p in make_problems(20, seed=5)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    recipe = {
        "task": "causal_lm",
        "data": {"source": "jsonl", "path": str(tmp_path / "pairs.jsonl"), "block_size": 48, "heldout_fraction": 0.2},
        "teacher": {"path": str(tmp_path / "teacher"), "shard": True},
        "student": {"from_teacher": {"keep": 1}, "train": {"epochs": 1, "batch_size": 6, "lr": 1e-3, "grad_accum": 2}},
        "distill": {"signal": "live", "onpolicy": {"lam": 1.0, "max_new_tokens": 6, "temperature": 0.0}},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1},
    }
    path = tmp_path / "onpolicy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    two = run_two_processes(path, tmp_path / "two", os.environ | {"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "teacher: sharded over 2 processes" in two.stdout
    with torch_threads(1):
        run_lm(load_recipe(path), tmp_path / "one")
    difference = max_difference(student_weights(tmp_path / "two"), student_weights(tmp_path / "one"))
    print(f"on-policy, sharded teacher over 2 processes: {difference:.2e} from one process")
    assert difference < 1e-5, difference


def test_the_sharded_teacher_is_never_trained(tmp_path, monkeypatch):
    """A whole run in one process over a one-process group (where the teacher is sharded, as under torchrun
    --nproc_per_node 1): the sharded teacher is in no optimizer, its parameters never require or get a gradient,
    and it stays in eval mode. Without a process group the switch does nothing: the whole teacher runs."""
    from distill import parallel, train
    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import run as run_lm
    from distill.teachers.lm_choice import live_teacher

    path, _ = sharded_recipe(tmp_path)
    recipe = load_recipe(path)
    whole = torch.nn.Linear(2, 2)
    one_process = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert live_teacher(recipe, SimpleNamespace(teacher=whole), one_process) is whole
    teachers, optimized = [], []
    shard_frozen, make_optimizer = parallel.shard_frozen, train.make_optimizer
    monkeypatch.setattr(parallel, "shard_frozen", lambda model: teachers.append(shard_frozen(model)) or teachers[-1])
    monkeypatch.setattr(
        train, "make_optimizer", lambda model, spec: optimized.append(make_optimizer(model, spec)) or optimized[-1]
    )
    train.make_accelerator("no")  # the recipe's precision, not an earlier test's: fixed once the group exists
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        run_lm(recipe, tmp_path / "run")
    finally:
        torch.distributed.destroy_process_group()
    [teacher] = teachers
    parameters = list(teacher.parameters())
    assert parameters and all(not p.requires_grad and p.grad is None for p in parameters)
    assert not any(m.training for m in teacher.modules())
    ids = {id(p) for p in parameters}
    [optimizer] = optimized  # the student's
    assert not any(id(p) in ids for group in optimizer.param_groups for p in group["params"])


def test_what_cannot_shard_is_one_line(tmp_path):
    """Read with the recipe, before any work: one line naming the fix; ``distill run`` exits 2 with it and makes no
    run folder."""
    from distill.errors import DistillError
    from distill.tasks import load_recipe

    path, raw = sharded_recipe(tmp_path)
    endpoint = {"url": "http://127.0.0.1:9/v1", "api": "completions"}
    for change, message in (
        ({"distill": {"signal": "cache"}}, "got signal 'cache'"),
        ({"distill": {"signal": "recorded"}, "data": {"source": "jsonl"}}, "got signal 'recorded'"),
        ({"distill": {"signal": "cache", "cache_mode": "topk"}, "teacher": {"endpoint": endpoint}}, "teacher.endpoint"),
        ({"distill": {"cross_tokenizer": "uld"}}, "does not take distill.cross_tokenizer 'uld'"),
    ):
        bad = {**raw, **{key: {**raw[key], **value} for key, value in change.items()}}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(DistillError, match="teacher.shard") as caught:
            load_recipe(path)
        assert message in str(caught.value) and "\n" not in str(caught.value), caught.value
    done = subprocess.run([*CLI, "run", path, "--out", tmp_path / "run"], capture_output=True, text=True, timeout=120)
    line = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in line and "teacher.shard" in line, done.stderr
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
