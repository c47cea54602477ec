"""A user-defined model for the `arch: python` factory test."""

from torch import nn


def build(in_features: int, num_classes: int, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, num_classes))


def not_a_model(in_features: int, num_classes: int):
    return "nope"
