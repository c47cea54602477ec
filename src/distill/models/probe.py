"""A linear probe: logistic regression on frozen features, as one ``nn.Linear`` (the text teacher's head, and
the embedding task's measure of what an embedding keeps)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> nn.Linear:
    """Multinomial logistic regression on standardised features, folded into one ``nn.Linear`` on the raw ones."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / std, y)
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
    return head
