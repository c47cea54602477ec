import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_recipe():
    return tiny_digits_recipe()


def tiny_digits_recipe() -> dict:
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


@pytest.fixture(autouse=True)
def _outputs_on_accelerator(request):
    """Tests marked ``on_accelerator`` (or every test, with DISTILL_SIMULATE_ACCELERATOR=1) run with each model
    output behaving as an accelerator's tensor: a ``.numpy()`` on it fails as it would on a GPU."""
    if request.node.get_closest_marker("on_accelerator") or os.environ.get("DISTILL_SIMULATE_ACCELERATOR") == "1":
        from accelerator_sim import outputs_on_accelerator

        with outputs_on_accelerator():
            yield
    else:
        yield
