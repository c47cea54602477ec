"""The validation split of every task, and the seed offsets of the data's seeded draws, in one place.

``validation_rows`` is the one function that picks the training rows a validation split takes: per class for
labeled data (image/tabular examples, labeled texts), over all rows for unlabeled ones (an embedding source's
texts, causal-LM token blocks). Each seeded draw of the data reads its own stream, ``seed + OFFSET``, so that
changing one (say, the validation fraction) leaves the others (the test split, which labels are kept) as they
were. The offsets are part of every run's data: changing one changes which rows each split holds.
"""

from __future__ import annotations

import numpy as np

from distill.errors import DistillError

# The test split (digits, rotten_tomatoes, causal-LM held-out blocks) and the training-block cap draw from ``seed``.
VALIDATION_SEED_OFFSET = 104_729  # the validation split, every task
UNLABELED_SEED_OFFSET = 7_919  # image/tabular data: which training examples lose their label (labeled_fraction)
LABELED_TEXT_SEED_OFFSET = 1  # labeled texts: which training texts keep their label (labeled_fraction, per class)
TEST_TEXT_LIMIT_SEED_OFFSET = 7  # labeled texts: which test texts data.limit_test keeps


def validation_rows(
    count: int,
    fraction: float,
    seed: int,
    *,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    unit: str = "row",
    hint: str = "",
) -> np.ndarray:
    """Sorted indices of the rows a validation split takes from ``count`` training rows, seeded
    (``seed + VALIDATION_SEED_OFFSET``).

    Without ``labels``: ``fraction`` of all rows (at least one); the caller makes sure at least two rows are there,
    one for each side. With ``labels`` (one per row) and ``class_names``: ``fraction`` of each class's labeled rows
    (at least one per class, stratified); every class needs two labeled rows, one for each side, and ``unit`` and
    ``hint`` word that error for the caller's data."""
    rng = np.random.default_rng(seed + VALIDATION_SEED_OFFSET)
    if labels is None:
        return np.sort(rng.permutation(count)[: max(1, round(fraction * count))]).astype(np.int64)
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
