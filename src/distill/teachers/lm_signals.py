"""Token-level teacher signals of causal LMs, one interface for all: ``signal.kd(tokens)`` is the KD term of a
micro-batch of student tokens: a sum over its distilled positions divided by the micro-batch's weight (its
trained tokens in the data), as every LM loss. Dividing by the positions a term happens to cover instead (the
positions a recorded teacher scored, the tokens an on-policy student wrote) would make the step's gradient
depend on how the batch is split over micro-batches and processes.

- ``LiveLMSignal``: the teacher model runs beside the student on the same tokens (any divergence);
- ``SparseSignal``: k targets per token stored ahead of time — the LM cache (``lm_cache``) or the
  log-probabilities recorded with the traces (``recorded``), which also say which positions were scored.

None of them builds [batch, seq, vocab] logits: the losses go from hidden states through the heads in chunks.
``signal.kd_with_ce(tokens, next_tokens, kd_weight, ce_weight)`` is the mixed loss with the next-token
cross-entropy and both terms; a sparse signal makes it in one pass over the student's head (a cached KD step at
the cost of a cross-entropy step), the live one with two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distill import parallel
from distill.losses.chunked import chunked_distillation_loss
from distill.losses.sparse import (
    SparseTargets,
    chunked_cross_entropy,
    chunked_sparse_kd_loss,
    chunked_sparse_kd_with_ce,
)
from distill.models.causal_lm import head_of, last_hidden


@dataclass
class StudentTokens:
    """A micro-batch as the student saw it: its final hidden states at the positions that predict a next
    token, its LM head, the rows' inputs, and which positions are distilled."""

    hidden: Tensor  # [B, S-1, H]
    weight: Tensor  # the LM head [V, H]
    bias: Tensor | None
    rows: Tensor  # indices of the rows in the training data (what a cache is read by)
    ids: Tensor  # [B, S] on the device
    attention: Tensor  # [B, S]
    mask: Tensor  # [B, S-1] bool: position t's next token is trained
    chunk_size: int
    vocab_size: int
    size: float  # what every term is divided by: the micro-batch's weight in the training loop (its trained tokens)

    def loss_kwargs(self, mask: Tensor | None = None) -> dict:
        return {
            "mask": self.mask if mask is None else mask,
            "normalizer": max(self.size, 1.0),
            "chunk_size": self.chunk_size,
            "vocab_size": self.vocab_size,
            "student_bias": self.bias,
        }


@dataclass
class LiveLMSignal:
    """The teacher model, frozen, scoring the student's tokens as it trains."""

    model: nn.Module
    divergence: str = "forward_kl"
    temperature: float = 1.0
    divergence_kwargs: dict = field(default_factory=dict)

    def kd(self, s: StudentTokens) -> Tensor:
        # Always runs the teacher, even for a micro-batch with nothing to distill: a sharded teacher's forward is a
        # collective every process takes part in.
        with torch.no_grad():  # not inference_mode: the teacher's hidden states are saved for backward
            teacher_hidden = last_hidden(self.model, s.ids, s.attention)[:, :-1]
        t_weight, t_bias = head_of(self.model)  # a sharded teacher's root (the head) is still gathered here
        loss = chunked_distillation_loss(
            s.hidden,
            s.weight,
            teacher_hidden,
            t_weight,
            divergence=self.divergence,
            temperature=self.temperature,
            teacher_bias=t_bias,
            **s.loss_kwargs(),
            **self.divergence_kwargs,
        )
        # The fused loss made every gradient in its forward and keeps none of the teacher's tensors for backward,
        # so a sharded teacher can free its head now.
        parallel.release(self.model)
        return loss

    def kd_with_ce(self, s: StudentTokens, next_tokens: Tensor, kd_weight: float, ce_weight: float):
        kd, ce = self.kd(s), chunked_cross_entropy(s.hidden, s.weight, next_tokens, **s.loss_kwargs())
        return kd_weight * kd + ce_weight * ce, kd.detach(), ce.detach()


@dataclass
class SparseSignal:
    """Stored sparse targets. ``lookup(rows, epoch)`` gives the rows' targets for that epoch (position t: the
    token at t + 1; a cache with several sets of draws gives a fresh set each epoch) and, for recorded ones, the
    positions the teacher scored (None: every trained position)."""

    lookup: Callable[[Tensor, int], tuple[SparseTargets, Tensor | None]]
    temperature: float
    epoch: int = 0

    def _targets(self, s: StudentTokens) -> tuple[SparseTargets, Tensor | None]:
        """The rows' targets shifted to the positions that predict them, and which positions were scored."""
        targets, scored = self.lookup(s.rows, self.epoch)
        device = s.hidden.device
        shifted = SparseTargets(
            ids=targets.ids[:, :-1].to(device),
            logp=None if targets.logp is None else targets.logp[:, :-1].to(device),
            tail=None if targets.tail is None else targets.tail[:, :-1].to(device),
        )
        return shifted, None if scored is None else scored[:, :-1].to(s.mask.device)

    def kd(self, s: StudentTokens) -> Tensor:
        targets, scored = self._targets(s)
        mask = s.mask if scored is None else s.mask & scored
        return chunked_sparse_kd_loss(s.hidden, s.weight, targets, temperature=self.temperature, **s.loss_kwargs(mask))

    def kd_with_ce(self, s: StudentTokens, next_tokens: Tensor, kd_weight: float, ce_weight: float):
        targets, scored = self._targets(s)
        return chunked_sparse_kd_with_ce(
            s.hidden,
            s.weight,
            targets,
            next_tokens,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            temperature=self.temperature,
            distilled=scored,
            **s.loss_kwargs(),
        )
