"""The validation split of labeled data: the same per-class hold-out for image/tabular examples and for texts."""

from __future__ import annotations

import numpy as np

from distill.errors import DistillError


def held_out_per_class(labels: np.ndarray, class_names: list[str], fraction: float, seed: int, *, unit: str, hint: str):
    """Sorted indices of ``fraction`` of each class's labeled rows (at least one per class), seeded: the rows a
    validation split takes from training. Every class needs two labeled rows, one for each side; ``unit`` and
    ``hint`` word that error for the caller's data."""
    rng = np.random.default_rng(seed + 104_729)
    held = []
    for label, name in enumerate(class_names):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) == 0:  # the validation split would miss it, and the teacher and baseline never see it
            raise DistillError(
                f"class {name} has no labeled training {unit}: the validation split would miss it; {hint}"
            )
        if len(members) < 2:
            raise DistillError(
                f"class {name} has {len(members)} labeled training {unit}: the validation split needs one and "
                f"training another; {hint}"
            )
        held.extend(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.asarray(held, dtype=np.int64))
