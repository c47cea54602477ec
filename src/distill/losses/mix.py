"""The hard/soft mix of every task, written once: ``(1 - alpha)·s·KD + alpha·CE`` with ``s = T²`` when
``t2_scaling`` (Hinton et al.: soft-target gradients shrink as 1/T², so T² keeps them on the hard-label scale
when T changes), else 1."""

from __future__ import annotations

import torch
from torch import Tensor


def t2_scale(temperature: float, t2_scaling: bool) -> float:
    return temperature**2 if t2_scaling else 1.0


def mix_weights(alpha: float, scale: float) -> tuple[float, float]:
    """The weights of KD and CE in the mix, for losses that fold both into one pass."""
    return (1 - alpha) * scale, alpha


def soft_hard_mix(
    kd: Tensor, ce: Tensor | float, *, alpha: float, scale: float, labeled: Tensor | None = None
) -> Tensor:
    """The mixed loss. With ``labeled`` (per position), an unlabeled position has no hard label and costs
    ``s·KD`` alone; ``ce`` must then be 0 there."""
    if labeled is None:
        kd_weight, ce_weight = mix_weights(alpha, scale)
        return kd_weight * kd + ce_weight * ce
    kd_weight = torch.where(labeled, torch.full_like(kd, 1.0 - alpha), torch.ones_like(kd))
    return kd_weight * scale * kd + alpha * ce
