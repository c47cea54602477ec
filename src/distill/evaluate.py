"""Measurements for every model in a comparison: quality, agreement with the teacher, size, speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.losses import forward_kl
from distill.models.classifiers import count_parameters


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts)


@torch.inference_mode()
def cpu_latency(model: nn.Module, x: np.ndarray, *, threads: int, runs: int, large_batch: int = 1024) -> dict:
    """Median batch-1 latency and large-batch throughput on the CPU with ``threads`` threads, after warm-up."""
    model = model.eval().to("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = torch.from_numpy(x[:1])
        many = torch.from_numpy(np.resize(x, (large_batch, *x.shape[1:])))
        for _ in range(20):
            model(one)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(one)
            times.append(time.perf_counter() - start)
        model(many)
        batch_times = []
        for _ in range(max(3, runs // 20)):
            start = time.perf_counter()
            model(many)
            batch_times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_ms_batch1": round(statistics.median(times) * 1e3, 4),
        f"throughput_per_s_batch{large_batch}": round(large_batch / statistics.median(batch_times), 1),
        "threads": threads,
    }


def classifier_metrics(
    model: nn.Module,
    weights: Path,
    test_x: np.ndarray,
    test_y: np.ndarray,
    teacher_logits: torch.Tensor | None,
    *,
    threads: int,
    runs: int,
) -> dict:
    logits = predict_logits(model, test_x)
    predictions = logits.argmax(-1).numpy()
    errors = int((predictions != test_y).sum())
    metrics = {
        "parameters": count_parameters(model),
        "file_bytes": weights.stat().st_size,
        "test_accuracy": round(1 - errors / len(test_y), 6),
        "test_errors": errors,
        "test_examples": len(test_y),
    }
    if teacher_logits is not None:
        metrics["agreement_with_teacher"] = round(
            float((logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()), 6
        )
        metrics["kl_to_teacher"] = round(float(forward_kl(logits, teacher_logits)), 6)
    return metrics | cpu_latency(model, test_x, threads=threads, runs=runs)
