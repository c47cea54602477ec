"""FSDP (torch's ``fully_shard``, FSDP2) for students and live teachers that do not fit one device.

Each transformer layer is one FSDP unit and the root holds the rest (embeddings, final norm, head); the root
keeps its parameters gathered after forward, so a loss that reads the head's weight outside ``forward`` (the
chunked LM losses) sees a plain tensor. Checkpoints hold full (unsharded) state dicts, the same files as one
process or DDP writes, so a run can resume under another launch. Works with gloo on CPUs and NCCL on GPUs.

A frozen teacher (``shard_frozen``) is sharded the same way for forward passes only: a layer's parameters are
gathered for its forward and freed after it, the root's once the loss has read the head (``release``). It is
never trained, so it has no optimizer state, gradients or checkpoint. Its forward is a collective: every process
must run it as often as the others (the training loop gives a rank with no share of a batch a stand-in row).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of every ``layers`` / ``layer`` ModuleList (HF decoders and encoders); none for small nets."""
    units = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer"):
            units.extend(module)
    return units


def shard(model: nn.Module, mixed_precision: str, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over the default process group; returns a meta-device copy of the plain module
    (no memory) into which ``gather`` later loads the trained weights."""
    template = copy.deepcopy(model).to("meta")
    model.to(device)
    policy = MixedPrecisionPolicy(
        param_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision),
        reduce_dtype=torch.float32 if mixed_precision != "no" else None,
    )
    for unit in layer_units(model):
        fully_shard(unit, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return template


def parameter_names(model: nn.Module) -> list[str]:
    """Names in the order ``model.parameters()`` yields them: the optimizer's parameter indices."""
    return [name for name, _ in model.named_parameters()]


def _renumber(state: dict, keys: dict) -> dict:
    """An optimizer state dict with its parameter keys (indices or names) replaced through ``keys``."""
    groups = [{**group, "params": [keys[p] for p in group["params"]]} for group in state["param_groups"]]
    return {"state": {keys[p]: value for p, value in state["state"].items()}, "param_groups": groups}


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU of rank 0 (a collective: every process calls it), in
    the layout one process saves: the optimizer state keyed by parameter index."""
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    if optimizer_state:  # empty on the other ranks
        optimizer_state = _renumber(optimizer_state, {name: i for i, name in enumerate(names)})
    return get_model_state_dict(model, options=FULL), optimizer_state


def full_model_state(model: nn.Module) -> dict:
    """The unsharded model state dict on the CPU of rank 0 (a collective: every process calls it)."""
    return get_model_state_dict(model, options=FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, names: list[str]) -> None:
    """Load a one-process (index-keyed) optimizer state into the optimizer of the sharded model."""
    named = _renumber(state, dict(enumerate(names)))
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def gather(model: nn.Module, template: nn.Module) -> nn.Module:
    """The trained weights in a plain (unsharded) module on the CPU, on every process."""
    # Every process needs the weights (cpu_offload would give them to rank 0 only).
    state = {k: v.cpu() for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}
    plain = template.to_empty(device="cpu")
    buffers = dict(model.named_buffers())  # FSDP shards no buffer; the state dict lacks the non-persistent ones
    for name, buffer in plain.named_buffers():  # (rotary inv_freq: to_empty leaves it uninitialised)
        buffer.copy_(buffers[name])
    plain.load_state_dict(state)
    return plain


def shard_frozen(model: nn.Module) -> nn.Module:
    """``model`` frozen (eval, no gradients) and sharded in place over the default process group for inference:
    each layer unit gathers its parameters for its forward and frees them after; the root keeps its own gathered
    after forward until ``release``. FSDP moves each unit to the process group's device as it shards it, so the
    whole model is never on that device at once."""
    model.eval().requires_grad_(False)
    for unit in layer_units(model):
        fully_shard(unit, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)  # the loss reads the head after forward
    return model


def release(model: nn.Module) -> None:
    """Free the root's gathered parameters of a model sharded by ``shard_frozen`` (nothing for a plain model).
    Only after the last read of them: the freed storage is reused by the next gather."""
    if isinstance(model, FSDPModule):
        model.reshard()
