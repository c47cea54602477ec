"""Divergences between teacher and student distributions: pure functions on logits.

Every divergence is called as ``f(student_logits, teacher_logits, *, temperature=1.0, mask=None)``,
works over the last dimension, and returns the mean over unmasked positions. All arithmetic is done
in log-space in float32 (float64 stays float64); an all-masked batch gives 0, not NaN.

Conventions (P = teacher distribution, Q = student distribution, both at ``temperature``):

- ``forward_kl``  KL(P || Q): mode-covering, the classic Hinton loss.
- ``reverse_kl``  KL(Q || P): mode-seeking.
- ``jsd(beta)``   generalised Jensen-Shannon of GKD (Agarwal et al. 2024) with M = beta·P + (1-beta)·Q:
                  beta·KL(P || M) + (1-beta)·KL(Q || M). beta=0.5 is the symmetric JSD.
                  At the endpoints the expression itself vanishes, so (as in GKD and TRL) beta=0 means
                  forward KL and beta=1 means reverse KL; these are the limits of jsd/beta as
                  beta→0 and of jsd/(1-beta) as beta→1.
- ``skew_kl(alpha)`` skew KL of DistiLLM (Ko et al. 2024): KL(P || alpha·P + (1-alpha)·Q).
                  alpha=0 is forward KL; alpha must be < 1 (alpha=1 is identically 0).
- ``tvd``         total variation distance ½·Σ|P - Q|, bounded in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import IGNORE_INDEX
from distill.losses.mix import soft_hard_mix, t2_scale


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax at ``temperature``, accumulated in at least float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)  # x / 1 is x: one pass less


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p·(log p − log q) over the last dim, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _forward_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_terms(log_t, log_s)


def _reverse_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_terms(log_s, log_t)


def _jsd(log_s: Tensor, log_t: Tensor, beta: float = 0.5) -> Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _forward_kl(log_s, log_t)
    if beta == 1.0:
        return _reverse_kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)


def _skew_kl(log_s: Tensor, log_t: Tensor, alpha: float = 0.1) -> Tensor:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return _forward_kl(log_s, log_t)
    log_mix = torch.logsumexp(torch.stack([log_t + math.log(alpha), log_s + math.log1p(-alpha)]), dim=0)
    return _kl_terms(log_t, log_mix)


def _tvd(log_s: Tensor, log_t: Tensor) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


# Per-position divergences on log-probabilities: name -> f(log_student, log_teacher, **kwargs) -> [...]
PER_POSITION: dict[str, Callable[..., Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_kl": _skew_kl,
    "tvd": _tvd,
}


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 (with a gradient path) if none are."""
    if mask is None:
        return values.mean()
    mask = mask.to(torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(values.shape)}")
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **kwargs: float,
) -> Tensor:
    """Divergence ``name`` between teacher and student at ``temperature``, mean over unmasked positions."""
    if name not in PER_POSITION:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(PER_POSITION)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    per_position = PER_POSITION[name](
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), **kwargs
    )
    return masked_mean(per_position, mask)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None) -> Tensor:
    """KL(teacher || student)."""
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature, mask=mask)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None) -> Tensor:
    """KL(student || teacher)."""
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature, mask=mask)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None) -> Tensor:
    """Generalised JSD(beta); beta=0 → forward KL, beta=1 → reverse KL (see module docstring)."""
    return divergence("jsd", student_logits, teacher_logits, temperature=temperature, mask=mask, beta=beta)


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None) -> Tensor:
    """KL(teacher || alpha·teacher + (1-alpha)·student)."""
    return divergence("skew_kl", student_logits, teacher_logits, temperature=temperature, mask=mask, alpha=alpha)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None) -> Tensor:
    """Total variation distance, ½·Σ|teacher − student|."""
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature, mask=mask)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence_name: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    t2_scaling: bool = True,
    mask: Tensor | None = None,
    **divergence_kwargs: float,
) -> dict[str, Tensor]:
    """Soft-label loss mixed with hard-label cross-entropy, per example.

    A labeled position costs ``(1-alpha)·s·D + alpha·CE`` and an unlabeled one (label
    ``IGNORE_INDEX`` or no labels at all) costs ``s·D``, where D is the divergence at ``temperature``
    and ``s = temperature²`` when ``t2_scaling`` (Hinton et al.: keeps soft-target gradients on the
    same scale as hard-label ones when T changes), else 1. Returns the total ``loss`` and the terms
    ``kd`` (mean divergence) and ``ce`` (mean cross-entropy over labeled positions) for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if divergence_name not in PER_POSITION:
        raise ValueError(f"unknown divergence {divergence_name!r}; choose one of {sorted(PER_POSITION)}")
    positions = student_logits.shape[:-1]
    keep = torch.ones(positions, dtype=torch.bool, device=student_logits.device) if mask is None else mask
    kd = PER_POSITION[divergence_name](
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), **divergence_kwargs
    )
    if labels is None:
        labeled = torch.zeros_like(keep)
        ce = torch.zeros_like(kd)
    else:
        labeled = (labels != IGNORE_INDEX) & keep
        safe_labels = torch.where(labeled, labels, torch.zeros_like(labels))
        ce = F.nll_loss(
            log_probs(student_logits).reshape(-1, student_logits.shape[-1]),
            safe_labels.reshape(-1),
            reduction="none",
        ).reshape(positions)
    hard = torch.where(labeled, ce, torch.zeros_like(ce))
    per_position = soft_hard_mix(kd, hard, alpha=alpha, scale=t2_scale(temperature, t2_scaling), labeled=labeled)
    return {
        "loss": masked_mean(per_position, keep),
        "kd": masked_mean(kd, keep),
        "ce": masked_mean(ce, labeled),
    }
