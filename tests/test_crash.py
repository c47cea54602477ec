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


def kill_until_finished(args: list, duration: float, seed: int, partial, span=(0.3, 0.9)) -> tuple[int, int]:
    """SIGKILL ``distill *args`` at random moments of a ``duration``-second run until one attempt finishes.
    Returns (kills, kills that left partial work behind, as judged by ``partial()``)."""
    rng, kills, mid_work = random.Random(seed), 0, 0
    while kills < 8:
        if killed_after(rng.uniform(*span) * duration, *args):
            return kills, mid_work
        kills += 1
        mid_work += bool(partial())
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return kills, mid_work


def test_sigkill_during_distill_cache_then_rerun_gives_the_same_bytes(tmp_path):
    from lm_fixtures import TEXT, save_tiny, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    save_tiny(tiny_llama(tok, layers=4, seed=0), tok, tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text(TEXT * 60)
    raw = {
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp_path / "corpus.txt"), "block_size": 16},
        "teacher": {"path": str(tmp_path / "teacher")},
        "student": {"from_teacher": {"keep": 2}},
        "distill": {"cache_k": 8, "cache_shard_blocks": 4},
    }
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    assert run_cli("cache", recipe, "--out", tmp_path / "clean").returncode == 0
    duration = time.perf_counter() - start
    (clean,) = (tmp_path / "clean" / "cache").iterdir()

    def partial() -> bool:
        return any((tmp_path / "crashed" / "cache").glob("*/progress.json"))

    kills, _ = kill_until_finished(["cache", recipe, "--out", tmp_path / "crashed"], duration, 1, partial)
    assert kills >= 2
    (crashed,) = (tmp_path / "crashed" / "cache").iterdir()
    assert not (crashed / "progress.json").exists()
    shards = sorted(p.name for p in clean.glob("shard-*.npy"))
    assert len(shards) > 10 and shards == sorted(p.name for p in crashed.glob("shard-*.npy"))
    for name in shards:
        assert (clean / name).read_bytes() == (crashed / name).read_bytes()


def test_sigkill_during_distill_generate_then_rerun_loses_and_duplicates_nothing(tmp_path):
    import json
    import threading
    from http.server import ThreadingHTTPServer

    from test_generate import FakeTeacher, read_records, write_prompts

    FakeTeacher.faults = ["slow"] * 200  # 0.3 s per answer: a run of 40 prompts at concurrency 2 lasts ~6 s
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        raw = {
            "task": "generate",
            "prompts": {"path": str(write_prompts(tmp_path / "prompts.jsonl", 40))},
            "teacher": {"endpoint": {"url": url, "concurrency": 2, "retries": 2, "backoff": 0.01, "timeout": 5}},
        }
        recipe = tmp_path / "gen.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        assert run_cli("generate", recipe, "--out", tmp_path / "clean.jsonl").returncode == 0
        duration = time.perf_counter() - start
        crashed = tmp_path / "crashed.jsonl"

        def partial() -> bool:
            return crashed.exists() and 0 < len(crashed.read_text().splitlines()) < 40

        # Each rerun has fewer prompts left, so the kills come early in the clean run's duration.
        args = ["generate", recipe, "--out", crashed]
        kills, mid_work = kill_until_finished(args, duration, 2, partial, span=(0.2, 0.5))
        assert kills >= 2 and mid_work >= 1
    finally:
        httpd.shutdown()
        FakeTeacher.faults = []
    key = lambda r: (r["id"], r.get("sample", 0))  # noqa: E731
    clean, got = read_records(tmp_path / "clean.jsonl"), read_records(crashed)
    assert len(got) == 40 and len({key(r) for r in got}) == 40
    assert sorted(json.dumps(r["completion"]) for r in got) == sorted(json.dumps(r["completion"]) for r in clean)
