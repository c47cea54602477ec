"""Losses of embedding students: the sentence vector against the teacher's, and every token's state."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_losses(predicted: torch.Tensor, target: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """MSE (mean over rows and dimensions, as sentence-transformers' MSELoss) and/or 1 − cosine."""
    mse = F.mse_loss(predicted.float(), target.float())
    cosine = 1.0 - F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()
    total = {"mse": mse, "cosine": cosine, "mse+cosine": mse + cosine}[loss]
    return {"loss": total, "mse": mse.detach(), "cosine": cosine.detach()}


def token_state_loss(predicted: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE between unit-length token states, averaged over real tokens and dimensions: the sentence MSE's scale,
    so with a weight of 1 all of a batch's tokens together count as much as its sentence vectors."""
    squared = (F.normalize(predicted.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).mean(-1)
    mask = attention_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)
