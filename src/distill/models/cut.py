"""Students cut from a teacher by layer selection, one implementation for causal LMs and text encoders."""

from __future__ import annotations

import copy
import re

from torch import nn
from transformers import PreTrainedModel

from distill.errors import DistillError

# Config attributes holding one entry per layer; a student keeps the entries of its kept layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


def _layers_name(model: PreTrainedModel, num_layers: int) -> str:
    """Dotted name of the ModuleList holding the transformer layers: ``model.layers`` for Llama/Qwen2,
    ``encoder.layer`` for BERT/MPNet."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == num_layers
            and name.split(".")[-1] in ("layers", "layer")
        ):
            return name
    raise DistillError(f"cannot find the layers of {type(model).__name__} (expected a 'layers' or 'layer' ModuleList)")


def _chosen_layers(num_layers: int, layers: list[int] | None, every: int | None, keep: int | None) -> list[int]:
    if sum(option is not None for option in (layers, every, keep)) != 1:
        raise DistillError("choose the student's layers with exactly one of layers, every or keep")
    if every is not None:
        if every < 1:
            raise DistillError(f"every must be a positive integer, got {every}")
        return list(range(0, num_layers, every))
    if keep is not None:
        if not 1 <= keep <= num_layers:
            raise DistillError(f"keep must be between 1 and the teacher's {num_layers} layers, got {keep}")
        if keep == 1:
            return [num_layers - 1] if num_layers > 1 else [0]
        # Evenly spaced with a step of at least one, so the rounded indices are distinct and hit both ends.
        return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]
    if not layers or any(not 0 <= i < num_layers for i in layers) or list(layers) != sorted(set(layers)):
        raise DistillError(f"layers must be increasing, distinct indices in 0..{num_layers - 1}, got {layers}")
    return list(layers)


def student_from_teacher(
    teacher: PreTrainedModel, *, layers: list[int] | None = None, every: int | None = None, keep: int | None = None
) -> PreTrainedModel:
    """A shallower copy of ``teacher`` keeping some of its layers (DistilBERT-style initialisation).

    Works for decoders (Llama, Qwen2, ...) and encoders (BERT, MPNet, ...): embeddings, final norm, heads and
    every other non-layer weight are copied; student layer ``j`` gets the weights of teacher layer ``kept[j]``.
    """
    teacher_text = teacher.config.get_text_config()
    num_layers = teacher_text.num_hidden_layers
    kept = _chosen_layers(num_layers, layers, every, keep)
    prefix = _layers_name(teacher, num_layers) + "."

    config = copy.deepcopy(teacher.config)
    text = config.get_text_config()
    text.num_hidden_layers = len(kept)
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(text, key, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(text, key, [values[i] for i in kept])

    student = type(teacher)(config).to(teacher.dtype)
    source = teacher.state_dict()
    layer_key = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.*)$")
    state = {}
    for key in student.state_dict():
        match = layer_key.match(key)
        state[key] = source[f"{prefix}{kept[int(match[1])]}.{match[2]}" if match else key]
    # strict: a key the student has and the teacher lacks means the shapes of the two models diverged.
    student.load_state_dict(state, strict=True)
    return student.eval()
