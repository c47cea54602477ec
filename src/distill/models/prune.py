"""Students pruned from a causal-LM teacher by importance measured on calibration data (Minitron: Muralidharan et
al. 2024, Sreenivas et al. 2024), weights copied from the teacher.

- depth: a block's importance is how much it changes its input, 1 − mean cosine(input, output) over the
  calibration tokens (ShortGPT's block influence); the least important blocks go.
- width: MLP neurons by the mean |activation| entering ``down_proj``; attention by key/value group (a KV head and
  the query heads that read it, so grouped-query attention stays whole) by the mean L2 norm of its heads' outputs
  entering ``o_proj``; embedding channels by the mean |output| of every RMSNorm (the residual stream each layer
  reads), one choice for the whole model since the residual stream is shared.

The target is a share of the teacher's transformer-block parameters. Depth alone keeps that share of the blocks;
width alone shrinks the attention groups and the embedding width by its square root (block parameters scale with
width²); both split it evenly (the blocks by √share, those widths by share^¼); the MLP width is then solved for, so
the kept block weights come to the share. Widths are rounded to multiples of 32 where the teacher's allow it (see
``plan``). What was removed and why goes into ``pruning`` (the run folder's
``prune.json``). Llama-style decoders (Llama, Qwen2, Mistral, SmolLM): q/k/v/o projections and gate/up/down MLPs.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.errors import DistillError

AXES = ("depth", "width")
ALIGN = 32  # widths are multiples of this where the teacher's allow (q8_0 packs rows of 32)


def _blocks(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    block = layers[0] if layers else None
    attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    wanted = [(attention, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    if block is None or any(part is None or not all(hasattr(part, n) for n in names) for part, names in wanted):
        raise DistillError(
            f"student.prune: {type(model).__name__} is not a Llama-style decoder (model.layers with self_attn "
            "q/k/v/o_proj and mlp gate/up/down_proj), so its width cannot be pruned; use axes: [depth] or "
            "student.from_teacher"
        )
    return layers


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def importance(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Every score, from one forward pass over the calibration blocks (hooks read what each part produces)."""
    config = model.config
    layers = _blocks(model)
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    device = next(model.parameters()).device  # the scores are summed there and kept on the CPU
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    keep = attention_mask.bool()
    tokens = keep.sum().clamp(min=1)
    scores = {
        "blocks": torch.zeros(len(layers), dtype=torch.float64),
        "neurons": [None] * len(layers),
        "groups": [None] * len(layers),
        "channels": torch.zeros(config.hidden_size, dtype=torch.float64),
    }
    hooks = []

    def on_block(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cosine = nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            scores["blocks"][i] = (1 - (cosine * keep).sum() / tokens).item()

        return hook

    def on_down(i):
        def hook(module, args):
            scores["neurons"][i] = ((args[0].double().abs() * keep[..., None]).sum((0, 1)) / tokens).cpu()

        return hook

    def on_o(i):
        def hook(module, args):
            per_head = args[0].double().unflatten(-1, (heads, head_dim)).norm(dim=-1)  # [B, S, heads]
            per_head = (per_head * keep[..., None]).sum((0, 1)) / tokens
            scores["groups"][i] = per_head.unflatten(0, (groups, heads // groups)).sum(-1).cpu()

        return hook

    def on_norm(module, args, output):
        scores["channels"].add_(((output.double().abs() * keep[..., None]).sum((0, 1)) / tokens).cpu())

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    norms = [m for name, m in model.named_modules() if name.endswith("norm") and "RMSNorm" in type(m).__name__]
    hooks += [norm.register_forward_hook(on_norm) for norm in norms]
    try:
        model.eval()(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return scores


def plan(config, share: float, axes: list[str]) -> dict:
    """How many blocks, MLP neurons, KV groups and embedding channels the student keeps.

    Blocks and attention follow the share (see the module's docstring); the MLP width is then solved for, so the
    student's block weights come to ``share`` of the teacher's. Widths are multiples of 32 (q8_0 packs rows of 32,
    and SIMD units and tensor cores like them; a width that is not falls back to f16 in a GGUF) where the teacher's
    width holds at least four such units, and the embedding width a multiple of the heads too (transformers checks
    it).
    """
    if not 0 < share <= 1:
        raise DistillError(f"student.prune.params {share}: give the share of the teacher's block parameters, in (0, 1]")
    unknown = [axis for axis in axes if axis not in AXES]
    if unknown or not axes:
        raise DistillError(f"student.prune.axes {axes}: choose from {list(AXES)}")
    both = len(set(axes)) == 2
    depth_share = math.sqrt(share) if both else share if "depth" in axes else 1.0
    width = (share ** (0.25 if both else 0.5)) if "width" in axes else 1.0
    groups = round(config.num_key_value_heads * width)
    heads = groups * (config.num_attention_heads // config.num_key_value_heads)
    counts = {
        "blocks": round(config.num_hidden_layers * depth_share),
        "groups": groups,
        "channels": _aligned(config.hidden_size * width, math.lcm(max(heads, 1), ALIGN), config.hidden_size, heads),
    }
    for part, count in counts.items():
        if count < 1:
            raise DistillError(
                f"student.prune.params {share}: leaves no {part[:-1].replace('group', 'attention head group')} "
                f"(the teacher has {_teacher_counts(config)[part]}); prune less"
            )
    counts["neurons"] = config.intermediate_size
    if "width" in axes:  # the MLP takes what the share leaves once attention is kept
        per_block = share * block_weights(config, _teacher_counts(config)) / counts["blocks"]
        neurons = (per_block - block_weights(config, {**counts, "blocks": 1, "neurons": 0})) / (3 * counts["channels"])
        if neurons < 1:
            raise DistillError(
                f"student.prune.params {share}: leaves no MLP neuron once the attention heads are kept (the teacher "
                f"has {config.intermediate_size}); prune less or add depth to axes"
            )
        counts["neurons"] = min(_aligned(neurons, ALIGN, config.intermediate_size, 1), config.intermediate_size)
    return counts


def _aligned(value: float, multiple: int, teacher_width: int, fallback: int) -> int:
    """``value`` rounded to a multiple of ``multiple`` (at least one) where the teacher's width holds four of them,
    else to a multiple of ``fallback``."""
    step = multiple if teacher_width >= 4 * multiple else max(fallback, 1)
    return max(round(value / step), 1) * step


def block_weights(config, counts: dict) -> int:
    """Weights of the transformer blocks' matrices for these counts (norms and biases, under 0.1 %, left out)."""
    head_dim = _head_dim(config)
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    heads = counts["groups"] * heads_per_group
    attention = counts["channels"] * head_dim * (2 * heads + 2 * counts["groups"])
    return counts["blocks"] * (attention + 3 * counts["channels"] * counts["neurons"])


def _teacher_counts(config) -> dict:
    return {
        "blocks": config.num_hidden_layers,
        "neurons": config.intermediate_size,
        "groups": config.num_key_value_heads,
        "channels": config.hidden_size,
    }


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def _rows(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> dict:
    weight = linear.weight
    weight = weight if rows is None else weight[rows]
    weight = weight if columns is None else weight[:, columns]
    state = {"weight": weight}
    if linear.bias is not None:
        state["bias"] = linear.bias if rows is None else linear.bias[rows]
    return state


@torch.no_grad()
def prune(model: PreTrainedModel, calibration: tuple[torch.Tensor, torch.Tensor], share: float, axes: list[str]):
    """The pruned student and the record of what went and why."""
    config = model.config
    counts = plan(config, share, axes)
    layers = _blocks(model)
    scores = importance(model, *calibration)
    blocks = _top(scores["blocks"], counts["blocks"])
    channels = _top(scores["channels"], counts["channels"])
    heads_per_group, head_dim = config.num_attention_heads // config.num_key_value_heads, _head_dim(config)

    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(blocks)
    student_config.intermediate_size = counts["neurons"]
    student_config.num_key_value_heads = counts["groups"]
    student_config.num_attention_heads = counts["groups"] * heads_per_group
    student_config.hidden_size = counts["channels"]
    student_config.head_dim = head_dim  # kept whole: a head's width is not pruned
    for key in ("layer_types", "no_rope_layers"):
        values = getattr(student_config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(student_config, key, [values[i] for i in blocks.tolist()])
    student = type(model)(student_config).to(model.dtype)

    state = {}
    record_layers = []
    for j, i in enumerate(blocks.tolist()):
        layer, prefix = layers[i], f"model.layers.{j}."
        neurons = _top(scores["neurons"][i], counts["neurons"])
        groups = _top(scores["groups"][i], counts["groups"])
        q_heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group)).reshape(-1)
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        attention, mlp = layer.self_attn, layer.mlp
        parts = {
            "self_attn.q_proj": _rows(attention.q_proj, q_rows, channels),
            "self_attn.k_proj": _rows(attention.k_proj, kv_rows, channels),
            "self_attn.v_proj": _rows(attention.v_proj, kv_rows, channels),
            "self_attn.o_proj": _rows(attention.o_proj, channels, q_rows),
            "mlp.gate_proj": _rows(mlp.gate_proj, neurons, channels),
            "mlp.up_proj": _rows(mlp.up_proj, neurons, channels),
            "mlp.down_proj": _rows(mlp.down_proj, channels, neurons),
        }
        for name, tensors in parts.items():
            state |= {f"{prefix}{name}.{key}": value for key, value in tensors.items()}
        record_layers.append({"teacher_block": i, "kv_groups_kept": groups.tolist(), "neurons_kept": counts["neurons"]})
    student_state = student.state_dict()
    source = model.state_dict()
    for key, value in student_state.items():
        if key in state:
            continue
        if key.startswith("model.layers."):  # the block's norms and anything else per block: channels only
            _, _, j, rest = key.split(".", 3)
            teacher_value = source[f"model.layers.{blocks[int(j)].item()}.{rest}"]
        else:  # embeddings, final norm, head
            teacher_value = source[key]
        state[key] = _channels(teacher_value, value.shape, channels)
    student.load_state_dict(state, strict=True)
    record = {
        "share": share,
        "axes": list(axes),
        "kept": counts,
        "teacher": _teacher_counts(config),
        "block_weights": {
            "teacher": block_weights(config, _teacher_counts(config)),
            "kept": block_weights(config, counts),
        },
        "blocks_kept": blocks.tolist(),
        "blocks_removed": sorted(set(range(config.num_hidden_layers)) - set(blocks.tolist())),
        "block_importance": [round(v, 6) for v in scores["blocks"].tolist()],
        "channels_removed": sorted(set(range(config.hidden_size)) - set(channels.tolist())),
        "layers": record_layers,
        "how": "block: 1 - cosine(input, output); neuron: mean |activation| into down_proj; KV group: mean L2 of "
        "its heads' outputs into o_proj; channel: mean |RMSNorm output| over every norm",
    }
    return student.eval(), record


def _channels(value: torch.Tensor, shape: torch.Size, channels: torch.Tensor) -> torch.Tensor:
    """A non-block tensor with the kept embedding channels: the dimension that shrank to their number."""
    if value.shape == shape:
        return value
    for dim, (old, new) in enumerate(zip(value.shape, shape, strict=True)):
        if old != new:
            return value.index_select(dim, channels)
    return value
