"""A CPU stand-in for an accelerator, to catch device bugs without a GPU.

Under ``outputs_on_accelerator()`` every ``nn.Module`` output is an ``OnAccelerator`` tensor: it computes as
usual, but converting it to NumPy without moving it to the host first (``.numpy()``, ``np.asarray``) raises the
error CUDA raises. ``.cpu()`` / ``.to("cpu")`` give an ordinary tensor back. It catches host conversions of model
outputs; it cannot catch tensors on two different devices meeting in one op, dtype support that differs on a
GPU (bf16 kernels), or collectives — bench/gpu_check.py is for those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MESSAGE = "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."


def _moves_to_host(args: tuple, kwargs: dict) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, str | torch.device) and torch.device(t).type == "cpu" for t in targets)


class OnAccelerator(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError(MESSAGE)
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _moves_to_host(args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


def on_accelerator(value):
    """``value`` with every tensor in it (a tensor, tuple, list, dict or transformers ModelOutput) marked."""
    if isinstance(value, torch.Tensor):
        return value if isinstance(value, OnAccelerator) else value.as_subclass(OnAccelerator)
    if isinstance(value, tuple | list):
        return type(value)(on_accelerator(v) for v in value)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = on_accelerator(value[key])
    return value


@contextmanager
def outputs_on_accelerator() -> Iterator[None]:
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: on_accelerator(output))
    try:
        yield
    finally:
        handle.remove()
