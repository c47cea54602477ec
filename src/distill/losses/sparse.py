"""Distillation from a sparse per-token teacher signal: k sampled tokens or the top-k log-probabilities.

Storing a teacher's full distribution for LM pre-training is out of the question ([tokens, V] floats), so
an offline cache keeps k entries per token. Two ways to pick them:

- ``sampled``: k tokens drawn *with replacement* from the teacher at temperature T (random-sampling KD,
  Anshumann et al. 2025, "Sparse Logit Sampling"). Each draw weighs 1/k, so the empirical distribution is
  an unbiased estimate of the teacher's, and cross-entropy against it has in expectation exactly the
  gradient of full forward KL: E[(p − counts/k)/T] = (p − q)/T.
- ``topk``: the k largest teacher log-probs plus the log of the remaining mass; the loss is the exact KL
  over k+1 buckets (the k tokens and "everything else"). Deterministic, but biased: inside the tail the
  student is only asked to match the total, not its shape.

``sparse_kd_loss`` works on materialised logits; ``chunked_sparse_kd_loss`` goes from hidden states and
the LM head chunk by chunk, as ``distill.losses.chunked`` does, so [N, V] logits never exist. Neither applies
T² scaling: the caller does, as for the dense losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses.chunked import (
    DEFAULT_CHUNK_SIZE,
    HeadOperands,
    fold_chunk_gradient,
    grad_needs,
    gradient_buffers,
    matmul_dtype,
    normalizer_scale,
    save_gradients,
    saved_gradients,
)
from distill.losses.divergences import log_probs

MODES = ("sampled", "topk")


@dataclass
class SparseTargets:
    """Per-position teacher signal: ``ids`` [..., k]; for top-k also ``logp`` [..., k] and ``tail`` [...].

    ``logp`` are teacher log-probs at the distillation temperature, ``tail`` is log(1 − Σ exp(logp)). A row with
    fewer than k candidates is padded with log-prob −inf and an id *already in the row*: every id listed counts
    as a candidate, so a padding id of its own would be taken out of the student's tail.
    """

    ids: Tensor
    logp: Tensor | None = None
    tail: Tensor | None = None

    def __post_init__(self):
        if (self.logp is None) != (self.tail is None):
            raise ValueError("top-k targets need both logp and tail; sampled targets neither")
        if self.logp is not None and (self.logp.shape != self.ids.shape or self.tail.shape != self.ids.shape[:-1]):
            raise ValueError(
                f"ids {tuple(self.ids.shape)}, logp {tuple(self.logp.shape)} and tail {tuple(self.tail.shape)} "
                "do not line up"
            )

    @property
    def mode(self) -> str:
        return "sampled" if self.logp is None else "topk"

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device) -> SparseTargets:
        return SparseTargets(*(None if t is None else t.to(device) for t in (self.ids, self.logp, self.tail)))

    def _flat(self, keep: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """[n, k] ids, [n, k] logp, [n] tail of the kept positions (all when ``keep`` is None)."""
        ids = self.ids.reshape(-1, self.k)
        logp = None if self.logp is None else self.logp.reshape(-1, self.k)
        tail = None if self.tail is None else self.tail.reshape(-1)
        if keep is None:
            return ids, logp, tail
        return ids[keep], None if logp is None else logp[keep], None if tail is None else tail[keep]


def _vocab(rows: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return rows
    if not 0 < vocab_size <= rows:
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{rows}")
    return vocab_size


@torch.no_grad()
def sparse_targets_from_logits(
    teacher_logits: Tensor,
    *,
    mode: str = "sampled",
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> SparseTargets:
    """Sparse targets from teacher logits [..., V]; rows past ``vocab_size`` (padding) get no probability."""
    if mode not in MODES:
        raise ValueError(f"unknown sparse KD mode {mode!r}; choose one of {list(MODES)}")
    vocab_size = _vocab(teacher_logits.shape[-1], vocab_size)
    if k < 1 or (mode == "topk" and k > vocab_size):
        raise ValueError(f"k must be in 1..{vocab_size if mode == 'topk' else 'any'} for {mode}, got {k}")
    lead = teacher_logits.shape[:-1]
    log_t = log_probs(teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab_size], temperature)
    if mode == "sampled":
        if log_t.shape[0] == 0:
            return SparseTargets(torch.zeros(*lead, k, dtype=torch.long, device=log_t.device))
        ids = torch.multinomial(log_t.exp(), k, replacement=True, generator=generator)
        return SparseTargets(ids.reshape(*lead, k))
    logp, ids = log_t.topk(k, dim=-1)
    # The tail straight from the other tokens' log-probs: no 1 − Σp cancellation when the top-k hold ~all mass.
    tail = torch.logsumexp(log_t.scatter(-1, ids, float("-inf")), dim=-1)
    return SparseTargets(ids.reshape(*lead, k), logp.reshape(*lead, k), tail.reshape(lead))


def _student_tail(log_p: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{i∉ids} p_i per row. The ids are filled with the most negative finite value, not −inf, so
    that k = V gives a finite tail (and no NaN gradient through logsumexp) instead of −inf."""
    return torch.logsumexp(log_p.scatter(-1, ids, torch.finfo(log_p.dtype).min), dim=-1)


def _per_position(log_p: Tensor, ids: Tensor, logp: Tensor | None, tail: Tensor | None) -> Tensor:
    """Loss per row of student log-probs ``log_p`` [n, V] against flat sparse targets."""
    picked = log_p.gather(-1, ids)
    if logp is None:  # cross-entropy against the empirical distribution of the k draws
        return -picked.mean(-1)
    log_q, log_qt = logp.to(log_p.dtype), tail.to(log_p.dtype)
    q, qt = log_q.exp(), log_qt.exp()
    zero = log_p.new_zeros(())
    kl = torch.where(q > 0, q * (log_q - picked), zero).sum(-1)  # 0·log 0 = 0
    return kl + torch.where(qt > 0, qt * (log_qt - _student_tail(log_p, ids)), zero)


def _check(positions: torch.Size, targets: SparseTargets, mask: Tensor | None) -> Tensor | None:
    """Validate shapes; return the flat boolean mask of kept positions (None keeps all)."""
    if targets.ids.shape[:-1] != positions:
        raise ValueError(f"targets {tuple(targets.ids.shape)} do not match positions {tuple(positions)}")
    if mask is None:
        return None
    if mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(positions)}")
    return mask.reshape(-1).to(torch.bool)


def sparse_kd_loss(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Sparse KD loss of ``student_logits`` [..., V] at ``temperature``, summed over masked positions / normalizer.

    sampled: mean over the k draws of −log p_student(id); top-k: KL over the k tokens plus the tail bucket.
    ``normalizer`` defaults to the number of kept positions (at least 1); pass the global count when
    accumulating gradients. Logit rows past ``vocab_size`` are padding and get no probability.
    """
    vocab_size = _vocab(student_logits.shape[-1], vocab_size)
    keep = _check(student_logits.shape[:-1], targets, mask)
    z = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab_size]
    if keep is not None:
        keep = keep.to(z.device)
        z = z[keep]
    ids, logp, tail = targets.to(z.device)._flat(keep)
    log_p = log_probs(z, temperature)
    total = _per_position(log_p, ids, logp, tail).sum()
    return total * normalizer_scale(normalizer, z.shape[0], total.dtype, total.device)


def _chunk_value_and_grad(log_p: Tensor, ids, logp, tail, temperature: float, want_grad: bool):
    """Summed loss of a chunk and its gradient w.r.t. the student logits; ``log_p`` is consumed (in place)."""
    value = _per_position(log_p, ids, logp, tail).sum()
    if not want_grad:
        return value, None
    p = log_p.exp()
    if logp is None:  # d/dz −(1/k)Σ log p_id = (p − counts/k)/T
        grad = p.scatter_add_(-1, ids, p.new_full(ids.shape, -1.0 / ids.shape[-1]))
        return value, grad.div_(temperature)
    # d/dz of Σq_j(log q_j − log p_j) + q_t(log q_t − log p_t), with s = Σq_j + q_t (≈1, not exactly in fp16):
    #   (s·p_i − q_i·[i∈K] − q_t·p_i/p_t·[i∉K]) / T, where p_i/p_t = exp(log p_i − log p_t) ≤ 1.
    q, qt = logp.to(p.dtype).exp(), tail.to(p.dtype).exp()
    tail_s = _student_tail(log_p, ids)
    in_tail = log_p.sub_(tail_s[:, None]).exp_().mul_(qt[:, None]).scatter_(-1, ids, 0.0)
    grad = p.mul_((q.sum(-1) + qt)[:, None]).sub_(in_tail)
    del in_tail
    return value, grad.scatter_add_(-1, ids, -q).div_(temperature)


def _sampled_terms(head: HeadOperands, h_c: Tensor, ids: Tensor, on, labels, kd_weight: float, ce_weight: float,
                   temperature: float, scale: Tensor, want_grad: bool):  # fmt: skip
    """Sampled KD (of the rows ``on``, None: all) and, at T = 1, next-token cross-entropy of ``labels`` [n, 1] from one
    softmax of a chunk's logits ``z = h_c @ head`` (bf16 logits are read once, into a float32 buffer). Returns the
    summed KD and CE values and ``scale · (kd_weight·∂KD/∂z + ce_weight·∂CE/∂z)`` in float32 (None unless
    ``want_grad``; a reused buffer, valid until the next chunk).

    The log-probs are only needed at the k sampled ids and the label, so they are read off ``z`` before the
    softmax overwrites it in place: one exp over [n, V] instead of a log-softmax, its exp and a second log-softmax.
    ∂KD/∂z = (p − counts/k)/T and ∂CE/∂z = p − onehot share ``p`` (the reason CE needs T = 1 here). The k + 1
    entries that the counts and the label change are computed apart and written over ``p``'s (no cancellation order
    issue with duplicates)."""
    if labels is not None and temperature != 1:
        raise ValueError("the shared softmax of sampled KD and cross-entropy needs temperature 1")
    z = head.logits_in_workspace(h_c)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    top = z.amax(-1, keepdim=True).to(acc)
    picked = z.gather(-1, ids).to(acc)
    label_logit = None if labels is None else z.gather(-1, labels).to(acc)
    # the logits' buffer is overwritten in place, or (bf16) read once into a float32 one; both are reused by every chunk
    e = z if z.dtype == acc else head.workspace("float32 logits", tuple(z.shape), acc).copy_(z)
    e.sub_(top)
    if temperature != 1:
        e.div_(temperature)
    total = e.exp_().sum(-1, keepdim=True)
    lse = top / temperature + total.log()  # log Σ exp(z/T), per row
    kd_rows = -(picked / temperature - lse).mean(-1)
    kd_value = (kd_rows if on is None else kd_rows[on]).sum()
    ce_value = None if labels is None else -(label_logit - lse).sum()
    if not want_grad:
        return kd_value, ce_value, None
    kd_row = torch.full((e.shape[0], 1), kd_weight / temperature, dtype=acc, device=e.device)
    if on is not None:
        kd_row[~on] = 0.0
    kd_row.mul_(scale)
    k = ids.shape[-1]
    # the entries the targets move: the k ids (each −kd_row/k) and the label (−ce), duplicates summed
    index, minus = ids, (kd_row / k).expand(ids.shape)
    if labels is not None:
        ce = ce_weight * scale
        index, minus = torch.cat([ids, labels], -1), torch.cat([minus, ce.expand(labels.shape)], -1)
    coefficient = (kd_row + (ce if labels is not None else 0.0)) / total  # p = e / total
    same = index[:, :, None] == index[:, None, :]
    targeted = e.gather(-1, index) * coefficient - (same * minus[:, None, :]).sum(-1)
    return kd_value, ce_value, e.mul_(coefficient).scatter_(-1, index, targeted)


class _FusedLinearSparseKD(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, h, w, b, ids, logp, tail, scale, temperature, vocab_size, chunk_size, needs):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        head = HeadOperands(w, b, vocab_size, matmul_dtype(h))
        grads = gradient_buffers(h, w, b, needs, acc)
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h_c = h[rows]
            if logp is None:  # sampled (and cross-entropy): one softmax, read in the matmul's dtype
                value, _, g = _sampled_terms(head, h_c, ids[rows], None, None, 1.0, 0.0, temperature, scale, any(needs))
                g_scale = None  # already scaled
            else:
                value, g = _chunk_value_and_grad(
                    log_probs(head.logits(h_c, acc), temperature), ids[rows], logp[rows], tail[rows], temperature,
                    any(needs),
                )  # fmt: skip
                g_scale = scale
            total += value
            if g is not None:
                fold_chunk_gradient(g, g_scale, h_c, head, rows, grads, vocab_size)
        save_gradients(ctx, grads, w, b)
        return total * scale

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad_out):
        return *saved_gradients(ctx, grad_out), *([None] * 8)


def _kept_positions(student_hidden: Tensor, student_head: Tensor, targets: SparseTargets, mask, chunk_size, vocab_size):
    """What the chunked losses work on: the hidden states [n, H] of the kept positions, the flat mask that kept them
    (None: all), their flat targets (ids, logp, tail) and the vocabulary size; bad arguments raise."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab_size = _vocab(student_head.shape[0], vocab_size)
    keep = _check(student_hidden.shape[:-1], targets, mask)
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    if keep is not None:
        keep = keep.to(h.device)
        h = h[keep]
    return h, keep, targets.to(h.device)._flat(keep), vocab_size


def chunked_sparse_kd_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
) -> Tensor:
    """``sparse_kd_loss(student_hidden @ student_head.T + bias, ...)`` without the [N, V] logits.

    Only the masked positions are gathered, then processed ``chunk_size`` at a time; gradients w.r.t. the
    hidden states, the head and the bias are folded in during the forward (see ``distill.losses.chunked``).
    """
    kept = _kept_positions(student_hidden, student_head, targets, mask, chunk_size, vocab_size)
    h, _, (ids, logp, tail), vocab_size = kept
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    needs = grad_needs(h, student_head, student_bias)
    return _FusedLinearSparseKD.apply(
        h,
        student_head,
        student_bias,
        ids,
        logp,
        tail,
        normalizer_scale(normalizer, h.shape[0], acc, h.device),
        temperature,
        vocab_size,
        chunk_size,
        needs,
    )


def chunked_cross_entropy(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
) -> Tensor:
    """Next-token cross-entropy without [N, V] logits: the sparse loss with the label as its one sample."""
    hard = SparseTargets(ids=labels.clamp(min=0).unsqueeze(-1), logp=None, tail=None)
    return chunked_sparse_kd_loss(
        student_hidden,
        student_head,
        hard,
        temperature=1.0,
        mask=mask,
        normalizer=normalizer,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        student_bias=student_bias,
    )


class _FusedLinearSparseKDCE(torch.autograd.Function):
    """The sparse KD term and next-token cross-entropy from one pass over the head: each chunk's logits are made
    once, both gradients w.r.t. them summed (weighted), and that sum folded into the hidden states, head and bias
    once. Returns the weighted total (differentiable) and the two terms (for logging)."""

    @staticmethod
    def forward(ctx, h, w, b, ids, logp, tail, labels, distilled, scale, kd_weight, ce_weight, temperature, vocab_size,
                chunk_size, needs):  # fmt: skip
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        head = HeadOperands(w, b, vocab_size, matmul_dtype(h))
        grads = gradient_buffers(h, w, b, needs, acc)
        kd_total = torch.zeros((), dtype=acc, device=h.device)
        ce_total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h_c, labels_c = h[rows], labels[rows, None]
            if logp is None and temperature == 1:  # sampled KD and CE share one softmax
                kd_value, ce_value, g = _sampled_terms(
                    head, h_c, ids[rows], None if distilled is None else distilled[rows], labels_c, kd_weight,
                    ce_weight, temperature, scale, any(needs),
                )  # fmt: skip
                kd_total += kd_value
                ce_total += ce_value
                if g is not None:
                    fold_chunk_gradient(g, None, h_c, head, rows, grads, vocab_size)
                continue
            z = head.logits(h_c, acc)
            on = slice(None) if distilled is None else distilled[rows]  # the rows the KD term covers
            kd_value, g_kd = _chunk_value_and_grad(
                log_probs(z[on], temperature),
                ids[rows][on],
                None if logp is None else logp[rows][on],
                None if tail is None else tail[rows][on],
                temperature,
                any(needs),
            )
            kd_total += kd_value
            log_p = torch.log_softmax(z, dim=-1)
            del z
            ce_total -= log_p.gather(-1, labels_c).sum()
            if g_kd is None:
                continue
            g = log_p.exp_().scatter_add_(-1, labels_c, log_p.new_full(labels_c.shape, -1.0)).mul_(ce_weight)
            g[on] += g_kd.mul_(kd_weight)
            del g_kd
            fold_chunk_gradient(g, scale, h_c, head, rows, grads, vocab_size)
        save_gradients(ctx, grads, w, b)
        kd, ce = kd_total * scale, ce_total * scale
        ctx.mark_non_differentiable(kd, ce)
        return kd_weight * kd + ce_weight * ce, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_kd, _grad_ce):
        return *saved_gradients(ctx, grad_out), *([None] * 12)


def chunked_sparse_kd_with_ce(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    *,
    kd_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    distilled: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``kd_weight·KD + ce_weight·CE`` with one pass over the head, and the two terms (detached): KD is
    ``chunked_sparse_kd_loss`` over the positions in ``mask`` and ``distilled`` (default: all of ``mask``), CE is
    ``chunked_cross_entropy`` of ``labels`` over ``mask``, both divided by ``normalizer``. Two separate calls make
    the [chunk, V] logits and fold their gradient into the [V, H] head twice; this makes and folds them once."""
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match positions {tuple(student_hidden.shape[:-1])}")
    kept = _kept_positions(student_hidden, student_head, targets, mask, chunk_size, vocab_size)
    h, keep, (ids, logp, tail), vocab_size = kept
    labels = labels.reshape(-1).clamp(min=0).to(h.device)
    on = None if distilled is None else distilled.reshape(-1).to(device=h.device, dtype=torch.bool)
    if keep is not None:
        labels, on = labels[keep], None if on is None else on[keep]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return _FusedLinearSparseKDCE.apply(
        h,
        student_head,
        student_bias,
        ids,
        logp,
        tail,
        labels,
        on,
        normalizer_scale(normalizer, h.shape[0], acc, h.device),
        kd_weight,
        ce_weight,
        temperature,
        vocab_size,
        chunk_size,
        grad_needs(h, student_head, student_bias),
    )
