"""A live teacher: a frozen model run under inference mode, on its own device and dtype."""

from __future__ import annotations

import torch
from torch import nn


class LiveTeacher:
    """Calls a frozen model; never in an optimizer, never wrapped for gradients."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype or next(model.parameters()).dtype

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device, self.dtype)).float()

    def __call__(self, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) for inputs ``x``; ``indices`` is unused (a cache needs it)."""
        # Clone outside inference mode: the result then behaves as an ordinary tensor in autograd.
        return self._forward(x).clone()
