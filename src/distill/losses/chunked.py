"""Token-level distillation loss from hidden states in bounded memory (the "fused linear" trick).

Computing logits first costs [N, V] per copy — for 4096 tokens and a 152k vocabulary that is 2.5 GB
in float32, and the loss keeps several copies (teacher and student logits, log-probabilities and
their gradients). Here only the distilled positions are gathered and processed ``chunk_size`` at a
time: for each chunk we compute both logits, the divergence and its gradient w.r.t. the student
logits, and fold that gradient straight into the gradients of the hidden states and of the LM head,
as Liger-Kernel does for cross-entropy. Only those gradients live on until backward, so memory is
O(chunk_size·V + V·H) instead of O(N·V), and the matmuls are the same ones autograd would do.

``full_logits_distillation_loss`` is the plain version (materialised logits + ``divergences.divergence``).

Under autocast (``mixed_precision: bf16``) the head's matmuls — the logits, and the gradients of the hidden states and
of the head — run in the autocast dtype, as autograd's ``F.linear`` would, while the log-sum-exp, the divergence, its
gradient and the head's gradient summed over chunks stay in float32 (``matmul_dtype``, ``HeadOperands``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.losses import divergences
from distill.losses.divergences import PER_POSITION, log_probs

# Positions per chunk. Live memory is about 4 float32 [chunk, V] buffers (~1.2 GB at V=152k) on top of
# the head's gradient; on CPU, smaller chunks cost time (the [V, H] gradient is re-read per chunk).
# Measured with bench/lm_memory.py.
DEFAULT_CHUNK_SIZE = 512


def _chunk_divergence(
    student_logits: Tensor, log_t: Tensor, name: str, temperature: float, kwargs: dict, want_grad: bool
):
    """Summed divergence of a chunk and its gradient w.r.t. the student logits (None unless ``want_grad``).

    ``student_logits`` must be the only reference to that tensor, so that it can be freed early.
    """
    if name == "forward_kl":
        # Written out, in place where possible: about 4 [chunk, V] buffers live instead of 8.
        log_q = log_probs(student_logits, temperature)
        del student_logits
        p = log_t.exp()
        terms = (log_t - log_q).mul_(p)
        value = terms.masked_fill_(p == 0, 0.0).sum()  # 0·log 0 = 0, as in divergences._kl_terms
        del terms
        # d/dz Σ p·(log p − log q) = (q − p)/T
        return value, log_q.exp_().sub_(p).div_(temperature) if want_grad else None
    if not want_grad:
        return PER_POSITION[name](log_probs(student_logits, temperature), log_t, **kwargs).sum(), None
    # Every other divergence: a local graph over this chunk only, so any PER_POSITION entry works.
    with torch.enable_grad():
        z = student_logits.requires_grad_()
        value = PER_POSITION[name](log_probs(z, temperature), log_t, **kwargs).sum()
        (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def matmul_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype of the head's matmuls: the autocast dtype when autocast is on for ``tensor``'s device and ``tensor`` is
    float32 (bf16 on a CPU with ``mixed_precision: bf16``), else ``tensor``'s own. float64 stays float64."""
    kind = tensor.device.type
    if tensor.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return tensor.dtype


class HeadOperands:
    """A head's rows (and bias) up to ``vocab_size``, cast once to the matmul dtype; ``logits`` of a chunk come back in
    ``acc`` (float32: its log-sum-exp and everything after it accumulate there).

    ``workspace`` hands out [chunk, V]-sized buffers that live for the whole call and are reused by every chunk: a
    fresh buffer of that size is a fresh mapping from the OS, and faulting its pages in cost as much as the
    elementwise work on it (bench/lm_step.py)."""

    def __init__(self, w: Tensor, b: Tensor | None, vocab_size: int, dtype: torch.dtype):
        self.dtype = dtype
        self.w = w[:vocab_size].to(dtype)  # padded head rows never produce logits, so their gradient stays 0
        self.b = None if b is None else b[:vocab_size].to(dtype)
        self.buffers: dict[str, Tensor] = {}

    def logits(self, h: Tensor, acc: torch.dtype) -> Tensor:
        return F.linear(h.to(self.dtype), self.w, self.b).to(acc)

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A reusable buffer of ``shape`` (the first chunk's size sets it; a shorter last chunk gets its first rows)."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:] or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.w.device)
        return buffer[: shape[0]]

    def logits_in_workspace(self, h: Tensor) -> Tensor:
        """A chunk's logits in the matmul dtype, written into the reused ``logits`` buffer (overwritten next chunk)."""
        out = self.workspace("logits", (h.shape[0], self.w.shape[0]), self.dtype)
        h = h.to(self.dtype)
        return torch.mm(h, self.w.T, out=out) if self.b is None else torch.addmm(self.b, h, self.w.T, out=out)

    def to_matmul(self, g: Tensor) -> Tensor:
        """``g`` in the matmul dtype: itself, or a copy in the reused ``gradient`` buffer."""
        return g if g.dtype == self.dtype else self.workspace("gradient", tuple(g.shape), self.dtype).copy_(g)


def grad_needs(hidden: Tensor, head: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of hidden states, head and bias the fused backward must produce gradients for."""
    on = torch.is_grad_enabled()
    return on and hidden.requires_grad, on and head.requires_grad, on and bias is not None and bias.requires_grad


def gradient_buffers(h: Tensor, w: Tensor, b: Tensor | None, needs, acc: torch.dtype) -> list:
    """Where the fused forward accumulates the gradients of hidden states, head (in ``acc``) and bias."""
    need_h, need_w, need_b = needs
    head = torch.empty if h.shape[0] else torch.zeros  # the first chunk's fold writes every row (fold_chunk_gradient)
    return [
        torch.empty_like(h) if need_h else None,
        head(w.shape, dtype=acc, device=w.device) if need_w else None,
        torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None,
    ]


def normalizer_scale(normalizer, count: int, dtype: torch.dtype, device) -> Tensor:
    """1 / normalizer (default: the number of distilled positions, at least 1), kept out of autograd."""
    if normalizer is None:
        normalizer = max(count, 1)
    return torch.as_tensor(normalizer, dtype=dtype, device=device).detach().reciprocal()


def fold_chunk_gradient(
    g: Tensor, scale: Tensor | None, h_c: Tensor, head: HeadOperands, rows: slice, grads: list, vocab: int
):
    """Fold a chunk's loss gradient w.r.t. its logits into the gradients of hidden states, head and bias (``g`` times
    ``scale``; None: ``g`` is scaled already)."""
    grad_h, grad_w, grad_b = grads
    g = g if scale is None else g.mul_(scale)
    g_in = head.to_matmul(g)  # matmuls in the head's dtype (the input's, or autocast's), as autograd would
    if grad_h is not None:
        grad_h[rows] = g_in @ head.w
    if grad_w is not None:
        h_in = h_c.to(head.dtype)
        if grad_w.dtype == head.dtype:  # float32 (or float64) throughout: straight into the accumulator
            if rows.start == 0:  # the first chunk: no zeros to add to (the padded rows' gradient is 0)
                grad_w[vocab:].zero_()
                torch.mm(g_in.T, h_in, out=grad_w[:vocab])
            else:
                grad_w[:vocab].addmm_(g_in.T, h_in)
        else:  # a low-precision product, rounded once, summed over chunks in float32
            product = torch.mm(g_in.T, h_in, out=head.workspace("head gradient", tuple(head.w.shape), head.dtype))
            if rows.start == 0:
                grad_w[vocab:].zero_()
                grad_w[:vocab].copy_(product)
            else:
                grad_w[:vocab] += product
    if grad_b is not None:
        grad_b[:vocab] += g.sum(0, dtype=grad_b.dtype)


def save_gradients(ctx, grads: list, w: Tensor, b: Tensor | None) -> None:
    """Keep the accumulated gradients for backward, head and bias back in their parameters' dtype."""
    grad_h, grad_w, grad_b = grads
    ctx.save_for_backward(
        grad_h, None if grad_w is None else grad_w.to(w.dtype), None if grad_b is None else grad_b.to(b.dtype)
    )


def saved_gradients(ctx, grad_out: Tensor) -> list:
    """The gradients folded in during forward, times the incoming gradient (usually 1: no [V, H] copy)."""
    grads = list(ctx.saved_tensors)
    if not torch.equal(grad_out, torch.ones_like(grad_out)):
        grads = [None if g is None else g * grad_out for g in grads]
    return grads


class _FusedLinearDivergence(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, scale, name, temperature, vocab_size, chunk_size, needs, kwargs):
        acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        student = HeadOperands(w_s, b_s, vocab_size, matmul_dtype(h_s))
        teacher = HeadOperands(w_t, b_t, vocab_size, matmul_dtype(h_t))
        grads = gradient_buffers(h_s, w_s, b_s, needs, acc)
        total = torch.zeros((), dtype=acc, device=h_s.device)
        for start in range(0, h_s.shape[0], chunk_size):
            hs_c, ht_c = h_s[start : start + chunk_size], h_t[start : start + chunk_size]
            with torch.no_grad():  # the teacher is a constant (forward runs without grad anyway; be explicit)
                log_t = log_probs(teacher.logits(ht_c, acc), temperature)
            value, g = _chunk_divergence(student.logits(hs_c, acc), log_t, name, temperature, kwargs, any(needs))
            total += value
            if g is not None:
                fold_chunk_gradient(g, scale, hs_c, student, slice(start, start + chunk_size), grads, vocab_size)
        save_gradients(ctx, grads, w_s, b_s)
        return total * scale

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad_out):
        return *saved_gradients(ctx, grad_out), *([None] * 10)


def _check(student_hidden, student_head, teacher_hidden, teacher_head, divergence, mask, vocab_size) -> int:
    if divergence not in PER_POSITION:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(PER_POSITION)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "differ in leading dims"
        )
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(student_hidden.shape[:-1])}")
    if vocab_size is None:
        if student_head.shape[0] != teacher_head.shape[0]:
            raise ValueError(
                f"student head has {student_head.shape[0]} rows and teacher head {teacher_head.shape[0]}; "
                "pass vocab_size"
            )
        return student_head.shape[0]
    if not 0 < vocab_size <= min(student_head.shape[0], teacher_head.shape[0]):
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{min(student_head.shape[0], teacher_head.shape[0])}")
    return vocab_size


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **divergence_kwargs: float,
) -> Tensor:
    """``divergences.divergence`` of ``student_hidden @ student_head.T`` from the teacher's, without the logits.

    Hidden states are [..., H] with matching leading dims; heads are [V, H] (rows past ``vocab_size``
    are padding and get no probability). The per-position divergences of the positions where ``mask``
    is true are summed and divided by ``normalizer`` (default: how many there are, at least 1 — give
    the global count when accumulating over micro-batches or processes). Peak extra memory is about
    ``chunk_size × V`` floats times a few, plus the head's gradient.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab_size = _check(student_hidden, student_head, teacher_hidden, teacher_head, divergence, mask, vocab_size)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:  # gather the distilled positions; the others cost nothing
        keep = mask.reshape(-1).to(device=h_s.device, dtype=torch.bool)
        h_s, h_t = h_s[keep], h_t[keep]
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    scale = normalizer_scale(normalizer, h_s.shape[0], acc, h_s.device)
    needs = grad_needs(h_s, student_head, student_bias)
    return _FusedLinearDivergence.apply(
        h_s,
        student_head,
        student_bias,
        h_t,
        teacher_head.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        scale,
        divergence,
        temperature,
        vocab_size,
        chunk_size,
        needs,
        divergence_kwargs,
    )


def full_logits_distillation_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    vocab_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **divergence_kwargs: float,
) -> Tensor:
    """The plain reference: materialise both [..., V] logits and call ``divergences.divergence``."""
    vocab_size = _check(student_hidden, student_head, teacher_hidden, teacher_head, divergence, mask, vocab_size)
    student = F.linear(
        student_hidden, student_head[:vocab_size], None if student_bias is None else student_bias[:vocab_size]
    )
    with torch.no_grad():
        teacher = F.linear(
            teacher_hidden, teacher_head[:vocab_size], None if teacher_bias is None else teacher_bias[:vocab_size]
        )
    loss = divergences.divergence(divergence, student, teacher, temperature=temperature, mask=mask, **divergence_kwargs)
    if normalizer is None:
        return loss
    count = student_hidden.shape[:-1].numel() if mask is None else mask.sum().clamp(min=1)
    return loss * count / normalizer
