"""Run an exported GGUF in llama.cpp itself (``llama-cpp-python``, optional): its logits and its CPU speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from distill.errors import DistillError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load(path: Path, *, threads: int = 1, context: int = 512):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DistillError("running a GGUF in llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    try:
        return Llama(
            model_path=str(path), n_threads=threads, n_ctx=context, n_batch=context, logits_all=True, verbose=False
        )
    except ValueError as exc:
        raise DistillError(f"llama.cpp cannot load {path}: {exc}") from None


def logits(model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits for one sequence, the KV cache emptied first."""
    model.reset()
    model.eval(list(ids))
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def forward_seconds(model, ids: list[int], runs: int = 10) -> float:
    """Median wall time of one forward pass over ``ids`` (batch 1) after a warm-up pass."""
    logits(model, ids)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        logits(model, ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
