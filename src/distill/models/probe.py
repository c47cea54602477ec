"""A linear probe: logistic regression on frozen features, as one ``nn.Linear`` (the text teacher's head, and
the embedding task's measure of what an embedding keeps)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import nn

PROBE_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strengths tried by cross-validation
PROBE_FOLDS = 5


def cross_validated_c(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, dict[float, float]]:
    """The inverse L2 strength of ``PROBE_CS`` with the lowest log loss over stratified folds of the (standardised)
    labeled examples, and every C's loss: an unregularised probe on a few hundred examples is confidently wrong, and
    its soft labels teach that. Held-out examples of a class a fold did not train on count at probability 1e-6.
    Fewer folds when no class has ``PROBE_FOLDS`` examples; C 1 (and no losses) when none has two."""
    folds = min(PROBE_FOLDS, int(np.bincount(y).max()))
    if folds < 2:
        return 1.0, {}
    losses = dict.fromkeys(PROBE_CS, 0.0)
    with warnings.catch_warnings():  # classes with fewer examples than folds: StratifiedKFold warns, still splits
        warnings.simplefilter("ignore", UserWarning)
        folds = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    for train, held_out in folds:
        for c in PROBE_CS:
            probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x[train], y[train])
            proba = np.full((len(held_out), int(y.max()) + 1), 1e-6)
            proba[:, probe.classes_] = np.maximum(probe.predict_proba(x[held_out]), 1e-6)
            losses[c] -= np.log(proba[np.arange(len(held_out)), y[held_out]]).sum() / len(y)
    return min(PROBE_CS, key=losses.get), {c: round(float(loss), 6) for c, loss in losses.items()}


def fit_probe(x: np.ndarray, y: np.ndarray, c: float | str, seed: int) -> tuple[nn.Linear, dict]:
    """Multinomial logistic regression on standardised features, folded into one ``nn.Linear`` on the raw ones, and
    how its C was set (``c``: a number, or auto: ``cross_validated_c``)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x_std = (x - mean) / std
    record = {"c": c}
    if c == "auto":
        c, losses = cross_validated_c(x_std, y, seed)
        record = {"c": c, "chosen_by": f"{PROBE_FOLDS}-fold log loss", "log_loss": losses}
    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_std, y)
    weight = probe.coef_ / std
    if weight.shape[0] == 1:  # two classes: sklearn keeps one row (logit of class 1); logits [0, z] are equivalent
        weight = np.concatenate([np.zeros_like(weight), weight])
        bias = np.array([0.0, probe.intercept_[0]])
    else:
        bias = probe.intercept_
    head = nn.Linear(x.shape[1], len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias - weight @ mean))
    return head, record
