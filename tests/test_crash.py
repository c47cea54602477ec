"""Crash safety: ``distill run`` killed with SIGKILL at random moments and resumed each time ends with exactly the
weights of an uninterrupted run (checkpoints, models and exports are written by temp file + fsync + rename)."""

from __future__ import annotations

import random
import subprocess
import time

import torch
import yaml
from safetensors.torch import load_file
from test_cli import CLI


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def killed_after(seconds: float, *args) -> bool:
    """Start ``distill`` and SIGKILL it after ``seconds``; True when it finished first."""
    process = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
        return process.returncode == 0
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_recipe):
    tiny_recipe["teacher"]["train"] |= {"epochs": 6, "checkpoint_every": 3}
    tiny_recipe["student"]["train"] |= {"epochs": 6, "checkpoint_every": 3}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    start = time.perf_counter()
    assert run_cli("run", recipe, "--out", clean).returncode == 0
    duration = time.perf_counter() - start

    rng, kills, finished = random.Random(0), 0, False
    while not finished and kills < 6:
        finished = killed_after(rng.uniform(0.25, 0.6) * duration, "run", recipe, "--out", crashed, "--resume")
        kills += not finished
    if not finished:
        result = run_cli("run", recipe, "--out", crashed, "--resume")
        assert result.returncode == 0, result.stderr
    assert kills >= 2, "the run should have been killed more than once"
    for stage in ("teacher", "baseline", "student"):
        expected, got = load_file(clean / stage / "model.safetensors"), load_file(crashed / stage / "model.safetensors")
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert (crashed / "REPORT.md").exists() and (crashed / "exports" / "int8" / "model.int8.pt").exists()
