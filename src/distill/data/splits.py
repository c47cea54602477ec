"""The validation split of labeled data: the same per-class hold-out for image/tabular examples and for texts."""

from __future__ import annotations

import numpy as np

from distill.errors import DistillError


def held_out_per_class(labels: np.ndarray, class_names: list[str], fraction: float, seed: int, *, unit: str, hint: str):
    """Sorted indices of ``fraction`` of each class's labeled rows (at least one per class), seeded: the rows a
    validation split takes from training. A class needs two labeled rows, one for each side; ``unit`` and ``hint``
    word that error for the caller's data."""
    rng = np.random.default_rng(seed + 104_729)
    held = []
    for label, name in enumerate(class_names):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) == 0:
            continue  # a class with no labeled row: nothing to validate it on, nor to train it on
        if len(members) < 2:
            raise DistillError(
                f"class {name} has {len(members)} labeled training {unit}: the validation split needs one and "
                f"training another; {hint}"
            )
        held.extend(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.asarray(held, dtype=np.int64))
