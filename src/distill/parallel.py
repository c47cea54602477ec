"""How training spreads over processes: ``Parallel`` holds what differs between one process, DDP (accelerate's
wrapper) and FSDP (torch's ``fully_shard``, FSDP2, for students and live teachers that do not fit one device).

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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim import Optimizer

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


class Parallel:
    """What the training loop does differently in one process, under DDP and under FSDP, behind one interface.

    One process and DDP go through accelerate (``prepare`` wraps the model for DDP and mixed precision); FSDP shards
    the model itself, before the optimizer is built on its sharded parameters. Every state handed out is full
    (unsharded) and keyed as one process keys it, so checkpoints and best weights are the same files whatever the
    launch, and a run resumes under another one.
    """

    def __init__(self, accelerator: Accelerator, fsdp: bool) -> None:
        self.accelerator = accelerator
        # One process shards too when a process group exists (torchrun --nproc_per_node 1; bench/gpu_check.py on one
        # GPU); without one there is nothing to shard over.
        self.fsdp = fsdp and (accelerator.num_processes > 1 or torch.distributed.is_initialized())
        self.names: list[str] = []  # FSDP: the optimizer's parameter indices, by name (checkpoints hold indices)
        self.template: nn.Module | None = None  # FSDP: the plain module ``unwrap`` loads the trained weights into

    def shard(self, model: nn.Module) -> None:
        """Under FSDP, shard ``model`` in place; to be called before its optimizer is built. Nothing otherwise."""
        if self.fsdp:
            self.names = parameter_names(model)
            self.template = shard(model, self.accelerator.mixed_precision, self.accelerator.device)

    def load_optimizer_state(self, model: nn.Module, optimizer: Optimizer, state: dict) -> None:
        """Load a checkpoint's (full, index-keyed) optimizer state, before ``prepare``."""
        if self.fsdp:
            load_optimizer_state(model, optimizer, state, self.names)
        else:
            optimizer.load_state_dict(state)

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        """The model and optimizer the loop trains with: accelerate's (device, mixed precision, DDP), or under FSDP
        the sharded ones as they are."""
        if self.fsdp:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def sync(self, model: nn.Module, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward: gradients are all-reduced (DDP) or
        reduce-scattered (FSDP) only after the ``last`` micro-batch of a step."""
        if self.fsdp:
            model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.accelerator.no_sync(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        """Clip the gradients to a global norm: accelerate's clip (which unscales fp16 gradients first) for the
        model it prepared, torch's for the sharded one accelerate never saw (its DTensor gradients' norm is global)."""
        clip = torch.nn.utils.clip_grad_norm_ if self.fsdp else self.accelerator.clip_grad_norm_
        clip(model.parameters(), max_norm)

    def full_states(self, model: nn.Module, optimizer: Optimizer) -> tuple[dict, dict]:
        """The full model and optimizer state dicts for a checkpoint. Under FSDP a collective (every process calls
        it) whose states are on rank 0 only."""
        if self.fsdp:
            return full_states(model, optimizer, self.names)
        return self.accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()

    def full_model_state(self, model: nn.Module) -> dict:
        """The full model state dict (the best weights). Under FSDP a collective, on rank 0 only."""
        return full_model_state(model) if self.fsdp else self.accelerator.unwrap_model(model).state_dict()

    def validate(self, model: nn.Module, validator: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """``validator``'s metrics of the model in eval mode, without gradients; the model is left in train mode."""
        model.eval()
        with torch.no_grad():
            metrics = validator(model if self.fsdp else self.accelerator.unwrap_model(model))
        if self.fsdp:  # the root keeps its parameters gathered after a forward; no backward will reshard them now
            model.reshard()
        model.train()
        return metrics

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain module, without the mixed-precision wrapper: it is evaluated, timed and
        exported in its own precision, beside a teacher that runs in its own (with the wrapper its forward would
        stay under autocast). Under FSDP the gathered weights in a plain module on the CPU, on every process."""
        if self.fsdp:
            return gather(model, self.template)
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
