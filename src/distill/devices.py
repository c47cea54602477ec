"""Moving tensors to the host. Every tensor → NumPy conversion goes through ``to_numpy``: ``Tensor.numpy()``
fails on an accelerator's tensor (the bug that broke every classification recipe on a GPU), and a CPU-only
test cannot see that. ``tests/test_devices.py`` forbids ``.numpy()`` anywhere else in the package and runs
each task with every model output marked as living on an accelerator."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host copy (or view, for a CPU tensor) of ``tensor``, wherever it lives, detached from autograd."""
    return tensor.detach().cpu().numpy()
