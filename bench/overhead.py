"""Per-epoch cost of distilling from the teacher cache vs plain hard-label training of the same student.

Same student (MNIST 784-800-800-10), same data, same loop (`distill.train.train_stage`), one epoch
each, interleaved and repeated; the live-teacher epoch is shown for reference. Bar: cache ≤ 1.15× plain.
Ends with one JSON line; exits 1 when the bar is missed.

    python bench/overhead.py [--repeats 3] [--limit 60000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.data.arrays import default_mnist_dir, load_mnist
from distill.models.classifiers import mlp
from distill.recipe import DistillSpec, TrainSpec
from distill.teachers.live import LiveTeacher
from distill.teachers.logits_cache import build_logits_cache
from distill.train import Stage, make_accelerator, train_stage


def epoch_seconds(work: Path, name: str, data, teacher, spec: TrainSpec) -> float:
    torch.manual_seed(0)
    stage = Stage(name, mlp(784, [800, 800], 10), spec, teacher, DistillSpec(temperature=20.0) if teacher else None)
    start = time.perf_counter()
    train_stage(stage, data.train_x, data.train_y, work / name, make_accelerator(), seed=0, input_shape=(1, 28, 28))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=60000, help="training examples per epoch")
    args = parser.parse_args()

    data = load_mnist(default_mnist_dir())
    data = type(data)(data.train_x[: args.limit], data.train_y[: args.limit], data.test_x, data.test_y, 10, (1, 28, 28))
    spec = TrainSpec(epochs=1, batch_size=128, lr=0.1, log_every=100, checkpoint_every=10**9)
    torch.manual_seed(0)
    live = LiveTeacher(mlp(784, [1200, 1200], 10, dropout=0.5, input_dropout=0.2))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        cache = build_logits_cache(work / "cache", live, data.train_x, teacher_id="bench", data_id=data.fingerprint())
        cache_build = time.perf_counter() - start
        epoch_seconds(work / "warm-up", "hard_labels", data, None, spec)  # first-call costs, not timed
        times: dict[str, list[float]] = {"hard_labels": [], "cache": [], "live_teacher": []}
        for repeat in range(args.repeats):
            for name, teacher in (("hard_labels", None), ("cache", cache), ("live_teacher", live)):
                times[name].append(epoch_seconds(work / str(repeat), name, data, teacher, spec))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["cache"] / median["hard_labels"]
    passed = ratio <= 1.15
    for name, value in median.items():
        print(f"{name:>13}: {value:6.2f} s/epoch  ({value / median['hard_labels']:.3f}× hard labels)")
    print(f"cache built once in {cache_build:.2f} s; bar cache ≤ 1.15× hard labels: {'PASS' if passed else 'FAIL'}")
    print(
        json.dumps(
            {
                "bench": "overhead",
                "examples_per_epoch": len(data.train_x),
                "threads": torch.get_num_threads(),
                "seconds_per_epoch": {k: round(v, 3) for k, v in median.items()},
                "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "cache_over_hard": round(ratio, 4),
                "live_over_hard": round(median["live_teacher"] / median["hard_labels"], 4),
                "cache_build_seconds": round(cache_build, 3),
                "pass": passed,
            }
        )
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
