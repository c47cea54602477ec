import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_recipe():
    """A digits recipe that trains in about a second."""
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"source": "digits"},
        "teacher": {
            "model": {"hidden": [64], "dropout": 0.1},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "log_every": 5, "checkpoint_every": 7},
        },
        "student": {
            "model": {"hidden": [16]},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "log_every": 5, "checkpoint_every": 7},
        },
        "distill": {"temperature": 3.0, "alpha": 0.1},
        "eval": {"latency_runs": 5},
    }
