"""Classifier builders. Any ``nn.Module`` whose forward maps a [B, features] batch to logits works;
the built-ins are a plain MLP (with Hinton-style input/hidden dropout) and a small CNN.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.errors import DistillError
from distill.io import atomic_path
from distill.recipe import ModelSpec


def mlp(in_features: int, hidden: list[int], num_classes: int, dropout=0.0, input_dropout=0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv-ReLU-pool blocks then a linear head; takes flat inputs and reshapes them to ``input_shape``."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], num_classes: int, dropout=0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise DistillError(f"cnn needs image inputs (C, H, W); this data has shape {input_shape}")
        self.input_shape = tuple(input_shape)
        blocks: list[nn.Module] = []
        width, side = input_shape[0], min(input_shape[1:])
        for out in channels:
            blocks += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
            if side >= 4:
                blocks.append(nn.MaxPool2d(2))
                side //= 2
            width = out
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, *self.input_shape)))


def build_classifier(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    in_features = int(torch.tensor(input_shape).prod())
    if spec.arch == "mlp":
        return mlp(in_features, spec.hidden, num_classes, spec.dropout, spec.input_dropout)
    if spec.arch == "cnn":
        return SmallCNN(input_shape, spec.channels, num_classes, spec.dropout)
    module_name, _, function_name = spec.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise DistillError(f"model factory {spec.factory!r} cannot be imported: {exc}") from None
    model = factory(in_features=in_features, num_classes=num_classes, **spec.kwargs)
    if not isinstance(model, nn.Module):
        raise DistillError(f"model factory {spec.factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


def save_classifier(model: nn.Module, folder: Path, spec: ModelSpec, input_shape, num_classes: int) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (what rebuilds it), each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"model": spec.model_dump(mode="json"), "input_shape": list(input_shape), "num_classes": num_classes}
    with atomic_path(folder / "model.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    return folder / "model.safetensors"


def load_classifier(path: Path, spec: ModelSpec, input_shape, num_classes: int) -> nn.Module:
    """Build the model of ``spec`` and load weights from a safetensors file, checking they fit."""
    model = build_classifier(spec, input_shape, num_classes)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise DistillError(f"model weights {path} do not exist") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DistillError(f"model weights {path} are unreadable or corrupt: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        head = [v for k, v in state.items() if k.endswith("weight")][-1:]
        classes = f" (it outputs {head[0].shape[0]} classes, the data has {num_classes})" if head else ""
        raise DistillError(
            f"weights in {path} do not fit the model in the recipe{classes}: {str(exc).splitlines()[0]}"
        ) from None
    return model
