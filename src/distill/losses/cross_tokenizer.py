"""Distillation between a teacher and a student that tokenize the same text differently.

Positions are paired by character offsets (``distill.teachers.cross_tokenizer`` does that): a student position and
a teacher position pair up when both have read the same characters. What follows a paired position is either one
token on both sides spanning the same characters (the spans *coincide*), or a run of tokens on each side up to the
next shared boundary (a *span*). Two losses use that alignment:

- ``uld_distance``: Universal Logit Distillation (Boizard et al. 2024), at every paired position: the L1 distance
  between the two probability vectors each sorted in decreasing order (the shorter padded with zeros). It needs no
  vocabulary mapping, and the teacher can be given as its k largest probabilities plus the mass of the rest.
- ``shared_kl`` + ``span_kl`` (method ``align``): where the spans coincide, the forward KL over the tokens both
  vocabularies share plus one bucket for everything else (each side's own rest); over a span, the binary KL between
  the probabilities both sides give the span's text, each the product of its tokens' probabilities (chain rule,
  ``merge_spans``). With one tokenizer on both sides every span coincides and everything is shared, so it is
  exactly forward KL.

Every function returns per-row values (sum them, divide by the batch's distilled positions); ``pair_loss`` and
``token_log_probs`` go from the student's hidden states through its head a chunk at a time, recomputing the chunk's
logits in backward (activation checkpointing), so [n, V] student logits never outlive their chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.losses.divergences import log_probs

METHODS = ("uld", "align")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012); −inf at x = 0."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def uld_distance(log_s: Tensor, teacher_top: Tensor, teacher_rest: Tensor) -> Tensor:
    """Σ_r |p_s(r) − p_t(r)| over ranks r, per row. ``log_s`` [n, Vs] are the student's log-probs; the teacher is given
    by its k largest log-probs ``teacher_top`` [n, k] (any order) and the log of the mass of the rest ``teacher_rest``
    [n] (−inf when k is its whole vocabulary). Ranks past k compare the two rests' totals, which is exact when
    k ≥ min(Vs, Vt): past either vocabulary's size one side is all zeros."""
    q = teacher_top.to(log_s.dtype).exp().sort(dim=-1, descending=True).values
    k, vocab = q.shape[-1], log_s.shape[-1]
    p = log_s.topk(min(k, vocab), dim=-1).values.exp()  # past rank k only the total counts: no full sort
    rest = (1 - p.sum(-1)).clamp(min=0) if k < vocab else torch.zeros_like(p[:, 0])
    p = F.pad(p, (0, k - p.shape[-1]))
    return (p - q).abs().sum(-1) + (rest - teacher_rest.to(p.dtype).exp()).abs()


def shared_kl(log_s: Tensor, ids: Tensor, teacher_logp: Tensor, teacher_rest: Tensor) -> Tensor:
    """KL(teacher ‖ student) per row over the buckets {student token ids[i]} ∪ {everything else}: ``teacher_logp``
    [n, k] are the teacher's log-probs of those tokens (−inf for none), ``teacher_rest`` [n] the log of its other
    mass; the student's rest is its mass outside ``ids`` [n, k] or [k] (the same tokens for every row)."""
    ids = ids.expand(log_s.shape[0], -1)
    picked = log_s.gather(-1, ids)
    # The picked ids filled with the most negative finite value, not −inf: no NaN gradient when they are all of them.
    student_rest = torch.logsumexp(log_s.scatter(-1, ids, torch.finfo(log_s.dtype).min), dim=-1)
    log_q, log_qr = teacher_logp.to(log_s.dtype), teacher_rest.to(log_s.dtype)
    zero = log_s.new_zeros(())
    kl = torch.where(log_q > -math.inf, log_q.exp() * (log_q - picked), zero).sum(-1)  # 0·log 0 = 0
    return kl + torch.where(log_qr > -math.inf, log_qr.exp() * (log_qr - student_rest), zero)


def merge_spans(token_logp: Tensor, span: Tensor, spans: int) -> Tensor:
    """Chain rule: the log-probability of each span's text, the sum of its tokens' log-probs (``span`` [m] says
    which of the ``spans`` each of the m tokens belongs to)."""
    return token_logp.new_zeros(spans).index_add(0, span, token_logp)


def span_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Binary KL per span between the teacher's and the student's probability of the span's text (log-probs [n]):
    q·log(q/p) + (1 − q)·log((1 − q)/(1 − p))."""
    log_p = student_logp.clamp(max=-1e-6)  # p = 1 would make log(1 − p) −inf
    log_q = teacher_logp.to(log_p.dtype)
    zero = log_p.new_zeros(())
    log_1q = log1mexp(log_q)
    inside = torch.where(log_q > -math.inf, log_q.exp() * (log_q - log_p), zero)
    return inside + torch.where(log_1q > -math.inf, log_1q.exp() * (log_1q - log1mexp(log_p)), zero)


PER_PAIR = {"uld": uld_distance, "align": shared_kl}


def _head_log_probs(h: Tensor, w: Tensor, b: Tensor | None, vocab_size: int, temperature: float) -> Tensor:
    return log_probs(F.linear(h, w[:vocab_size], None if b is None else b[:vocab_size]), temperature)


def pair_loss(
    h: Tensor, w: Tensor, b: Tensor | None, targets: tuple, *, method: str, vocab_size: int, temperature: float
) -> Tensor:
    """Summed ``PER_PAIR[method]`` of the student rows ``h`` [n, H] (logits ``h·wᵀ + b``, rows of ``w`` past
    ``vocab_size`` are padding) against the teacher ``targets`` (that function's teacher arguments)."""
    if method not in PER_PAIR:
        raise ValueError(f"unknown cross-tokenizer method {method!r}; choose one of {list(METHODS)}")

    def chunk(h, w, b, *targets):
        return PER_PAIR[method](_head_log_probs(h, w, b, vocab_size, temperature), *targets).sum()

    return checkpoint(chunk, h, w, b, *targets, use_reentrant=False)


def token_log_probs(
    h: Tensor, w: Tensor, b: Tensor | None, tokens: Tensor, *, vocab_size: int, temperature: float
) -> Tensor:
    """The student's log-probability of ``tokens`` [n] at the rows ``h`` [n, H], at ``temperature``."""

    def chunk(h, w, b):
        return _head_log_probs(h, w, b, vocab_size, temperature).gather(-1, tokens[:, None])[:, 0]

    return checkpoint(chunk, h, w, b, use_reentrant=False)
