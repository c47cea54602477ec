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


def lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def killed_after_progress(progress, delay: float, *args) -> bool:
    """Start ``distill *args``, wait until ``progress()`` rises above its value at the start, then SIGKILL it
    ``delay`` seconds later; True when it finished first. Kills follow the work, not the wall clock, so a slow
    or busy machine still kills mid-work."""
    start = progress()
    process = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if progress() > start:
            time.sleep(delay)
            process.kill()
            process.wait()
            return False
        time.sleep(0.01)
    return process.returncode == 0


def kill_until_finished(args: list, progress, seed: int, most: int = 4) -> int:
    """SIGKILL ``distill *args`` ``most`` times at random moments after it made progress, then let it finish."""
    rng = random.Random(seed)
    for kills in range(most):
        if killed_after_progress(progress, rng.uniform(0.0, 0.3), *args):
            return kills
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return most


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_recipe):
    tiny_recipe["teacher"]["train"] |= {"epochs": 6, "checkpoint_every": 3}
    tiny_recipe["student"]["train"] |= {"epochs": 6, "checkpoint_every": 3}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("run", recipe, "--out", clean).returncode == 0
    args = ["run", recipe, "--out", crashed, "--resume"]
    kills = kill_until_finished(args, lambda: lines(crashed / "log.jsonl"), seed=0)
    assert kills >= 2, "the run should have been killed more than once"
    for stage in ("teacher", "baseline", "student"):
        expected, got = load_file(clean / stage / "model.safetensors"), load_file(crashed / stage / "model.safetensors")
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert (crashed / "REPORT.md").exists() and (crashed / "exports" / "int8" / "model.int8.pt").exists()


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
    assert run_cli("cache", recipe, "--out", tmp_path / "clean").returncode == 0
    (clean,) = (tmp_path / "clean" / "cache").iterdir()

    def shards_done() -> int:
        found = list((tmp_path / "crashed" / "cache").glob("*/shard-*.npy"))
        return len(found) if not list((tmp_path / "crashed" / "cache").glob("*/meta.json")) else 10**6

    kills = kill_until_finished(["cache", recipe, "--out", tmp_path / "crashed"], shards_done, seed=1)
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
        assert run_cli("generate", recipe, "--out", tmp_path / "clean.jsonl").returncode == 0
        crashed = tmp_path / "crashed.jsonl"
        kills = kill_until_finished(["generate", recipe, "--out", crashed], lambda: lines(crashed), seed=2)
        assert kills >= 2
    finally:
        httpd.shutdown()
        FakeTeacher.faults = []
    key = lambda r: (r["id"], r.get("sample", 0))  # noqa: E731
    clean, got = read_records(tmp_path / "clean.jsonl"), read_records(crashed)
    assert len(got) == 40 and len({key(r) for r in got}) == 40
    assert sorted(json.dumps(r["completion"]) for r in got) == sorted(json.dumps(r["completion"]) for r in clean)
