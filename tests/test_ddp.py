"""Data-parallel training: ``distill run`` under torchrun with 2 CPU processes (gloo) reaches the weights of one
process with the same global batch; one process writes the run folder and the report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file
from test_cli import CLI


def run_two_processes(recipe, out, env, *extra) -> subprocess.CompletedProcess:
    """``distill run`` under torchrun with 2 processes, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    launch = [*launcher, "-m", "distill.cli", "run", recipe, "--out", out, *extra]
    return subprocess.run(launch, capture_output=True, text=True, env=env, timeout=180)


def one_and_two_processes(recipe, tmp_path) -> subprocess.CompletedProcess:
    """``distill run`` of ``recipe`` in one process (``tmp_path/one``) and in two (``tmp_path/two``), one thread
    each; both must succeed. The two-process run's result."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([*CLI, "run", recipe, "--out", tmp_path / "one"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = run_two_processes(recipe, tmp_path / "two", env)
    assert two.returncode == 0, two.stderr[-3000:]
    return two


def assert_same_weights(tmp_path, stage: str) -> None:
    """The stage's weights of the one- and the two-process run agree to 1e-5."""
    single = load_file(tmp_path / "one" / stage / "model.safetensors")
    parallel = load_file(tmp_path / "two" / stage / "model.safetensors")
    assert single.keys() == parallel.keys()
    for name, tensor in single.items():
        assert (parallel[name] - tensor).abs().max() < 1e-5, (stage, name)


def test_two_processes_reach_the_single_process_weights(tmp_path, tiny_recipe):
    """With a short last batch (129 examples, batch 64: one row, which only rank 0 gets) and more micro-batches
    than a rank has rows (issue 17.1: a rank with nothing to do skipped its step and the others hung)."""
    tiny_recipe["teacher"]["model"]["dropout"] = 0.0  # dropout masks are drawn per process: not comparable
    tiny_recipe["data"] |= {"limit_train": 129, "labeled_fraction": 1.0, "validation_fraction": 0.0}
    tiny_recipe["student"]["train"]["grad_accum"] = 2
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    two = one_and_two_processes(recipe, tmp_path)
    assert two.stdout.count("report:") == 1  # the main process reports, once
    for stage in ("teacher", "baseline", "student"):
        assert_same_weights(tmp_path, stage)
    assert (tmp_path / "two" / "REPORT.md").exists()


def test_fsdp_two_processes_reach_the_single_process_weights_of_an_lm_student(tmp_path):
    """FSDP (fully_shard, gloo) on the chunked-loss LM path: the same final weights as one process."""
    from lm_fixtures import tiny_tokenizer
    from test_lm import write_recipe

    path, raw = write_recipe(tmp_path, tiny_tokenizer(), "live", baseline=False, mixed_precision="no")
    # 17 blocks, batches of 8: a last batch of one block, which rank 1 has no share of (issue 17.1)
    raw["data"] |= {"limit_train_blocks": 17, "validation_fraction": 0.0}
    raw["student"]["train"] |= {"fsdp": True, "batch_size": 8, "grad_accum": 2, "max_grad_norm": 1.0}
    path.write_text(yaml.safe_dump(raw))
    one_and_two_processes(path, tmp_path)
    assert_same_weights(tmp_path, "student")


def test_a_one_process_checkpoint_resumes_under_fsdp(tmp_path):
    """Checkpoints hold full state dicts: a run stopped in one process finishes under FSDP with 2 processes,
    with the weights of an uninterrupted run (optimizer state loaded into the sharded optimizer)."""
    from lm_fixtures import tiny_tokenizer
    from test_lm import write_recipe

    from distill.tasks import load_recipe
    from distill.tasks.causal_lm import run as run_lm

    path, raw = write_recipe(tmp_path, tiny_tokenizer(), "live", baseline=False, mixed_precision="no")
    raw["student"]["train"] |= {"fsdp": True, "checkpoint_every": 5}
    path.write_text(yaml.safe_dump(raw))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    straight = subprocess.run([*CLI, "run", path, "--out", tmp_path / "one"], capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr

    class Stop(Exception):
        pass

    def stop(stage, step):
        if (stage, step) == ("student", 12):
            raise Stop

    with pytest.raises(Stop):
        run_lm(load_recipe(path), tmp_path / "two", on_step=stop)
    resumed = run_two_processes(path, tmp_path / "two", env, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = load_file(tmp_path / "one" / "student" / "model.safetensors")
    sharded = load_file(tmp_path / "two" / "student" / "model.safetensors")
    for name, tensor in single.items():
        assert (sharded[name] - tensor).abs().max() < 1e-5, name


def test_fsdp_in_one_process_reaches_the_plain_weights(tmp_path, monkeypatch):
    """FSDP over a one-process group (what bench/gpu_check.py runs on one GPU), in process: the same weights as a
    plain run, through the chunked live-teacher loss and a short last batch."""
    import torch
    from lm_fixtures import tiny_llama, tiny_tokenizer
    from test_lm import signal_batches, token_data

    from distill import parallel
    from distill.recipe import TrainSpec
    from distill.train import make_accelerator, train_loop

    sharded = []
    shard = parallel.shard
    monkeypatch.setattr(parallel, "shard", lambda model, *args: sharded.append(model) or shard(model, *args))
    tok = tiny_tokenizer()
    data = token_data(tok, blocks=7)
    teacher = tiny_llama(tok, layers=2, seed=9)
    trained = {}
    for fsdp in (False, True):
        spec = TrainSpec(epochs=1, batch_size=4, grad_accum=2, optimizer="adamw", lr=1e-2, fsdp=fsdp)
        if fsdp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            model = train_loop(
                f"s{fsdp}",
                tiny_llama(tok, layers=2, seed=3),
                spec,
                signal_batches("live", data, tok, teacher),
                tmp_path,
                make_accelerator("no"),  # not an earlier test's precision (accelerate keeps one state per process)
                seed=0,
            )
        finally:
            if fsdp:
                torch.distributed.destroy_process_group()
        # the non-persistent buffers too (rotary inv_freq): the returned student is what rank 0 evaluates
        trained[fsdp] = {**dict(model.named_buffers()), **model.state_dict()}
    assert len(sharded) == 1  # the FSDP run did shard
    assert trained[True].keys() == trained[False].keys() and "model.rotary_emb.inv_freq" in trained[True]
    for name, tensor in trained[False].items():
        torch.testing.assert_close(trained[True][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("signal", ["cache", "recorded"])
def test_two_processes_reach_the_single_process_weights_with_stored_lm_targets(tmp_path, signal):
    """Issue 17.4: the KD term of the stored signals (the LM cache; log-probs recorded with traces, which score
    only some trained positions) weighs every token alike whatever the split over processes (DDP here)."""
    from lm_fixtures import tiny_tokenizer
    from test_lm import write_recipe

    from distill.tasks import parse_recipe
    from distill.tasks.generate import generate

    path, raw = write_recipe(tmp_path, tiny_tokenizer(), signal, baseline=False, mixed_precision="no")
    raw["student"]["train"] |= {"batch_size": 6, "grad_accum": 2}
    if signal == "recorded":
        prompts = tmp_path / "prompts.jsonl"
        lines = [{"id": i, "prompt": f"the {w} of the"} for i, w in enumerate(["fox", "dog", "king", "sea", "sky"])]
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        spec = {
            "task": "generate",
            "prompts": {"path": str(prompts), "chat_template": False},
            "teacher": {"path": raw["teacher"]["path"]},
            "sampling": {"temperature": 1.0, "max_new_tokens": 10, "samples": 3, "logprobs": 4, "batch_size": 8},
            "verify": {"method": "none"},
        }
        generate(parse_recipe(spec), tmp_path / "traces.jsonl")
        raw["data"] = {"source": "jsonl", "path": str(tmp_path / "traces.kept.jsonl"), "block_size": 32}
        raw["distill"] |= {"temperature": 1.0, "alpha": 0.3}
    path.write_text(yaml.safe_dump(raw))
    one_and_two_processes(path, tmp_path)
    assert_same_weights(tmp_path, "student")
