"""Issue 37: under bf16 autocast the chunked and sparse losses run the head's matmuls in bfloat16 and accumulate the
log-sum-exp, the loss and the head's gradient in float32.

The reference is float64 and mirrors the one rounding that is meant to happen: the logits are those of the bf16-rounded
hidden states and head (``bf16_logits``: the product rounded once to bf16, as the CPU's bf16 GEMM returns it after
accumulating in float32). Everything after the logits is float64. Tolerances:
- values: the loss is a float32 log-sum-exp over bf16 logits, so it matches that reference to float32 round-off
  (rel 1e-5); a float32 run (no autocast) is ~2^-9·|z| away from it, far outside that tolerance — the test tells the
  two apart, so it fails if the head silently stays in float32.
- gradients: the loss's gradient w.r.t. a chunk's logits is rounded once to bf16 before its two matmuls, and their
  products are rounded once more (unit round-off u = 2^-8 each), so an entry may be off by ~2u of the largest entry
  of its tensor: atol = 2^-6 · max|reference| leaves a factor of 2 for the float32 sums across chunks.
"""

import pytest
import torch

from distill.losses.chunked import chunked_distillation_loss, full_logits_distillation_loss, matmul_dtype
from distill.losses.sparse import (
    chunked_cross_entropy,
    chunked_sparse_kd_loss,
    chunked_sparse_kd_with_ce,
    sparse_kd_loss,
    sparse_targets_from_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N, H, V, CHUNK = 21, 32, 300, 4
BF16 = torch.bfloat16


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(BF16).to(torch.float64)


def bf16_logits(h, w, b=None) -> torch.Tensor:
    """float64 logits of the bf16-rounded operands, rounded once to bf16: what the bf16 head returns."""
    z = bf16(h) @ bf16(w).T + (0 if b is None else bf16(b))
    return bf16(z).requires_grad_()


def operands(seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).requires_grad_() if bias else None
    return h, w, b


def reference_grads(loss_of_logits, h, w, b):
    """float64 gradients: autograd through the mirrored logits, then the two head matmuls on the rounded operands."""
    z = bf16_logits(h, w, b)
    value = loss_of_logits(z)
    (g,) = torch.autograd.grad(value, z)
    grads = [g @ bf16(w), g.T @ bf16(h)] + ([g.sum(0)] if b is not None else [])
    return value.detach(), grads


def assert_bf16_close(got_value, got_grads, want_value, want_grads, float32_value):
    assert got_value.dtype == torch.float32
    assert got_value.item() == pytest.approx(want_value.item(), rel=1e-5)
    assert abs(float32_value - want_value.item()) > 10 * abs(got_value.item() - want_value.item())  # bf16 ran
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == torch.float32  # the parameters' dtype: accumulated in float32, not bf16
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2**-6 * want.abs().max().item())


def under_bf16(fn, *params):
    with torch.autocast("cpu", dtype=BF16):
        value = fn()
    return value, torch.autograd.grad(value, [p for p in params if p is not None])


@pytest.mark.parametrize("divergence,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3})])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_divergence_head_in_bf16(divergence, kw, temperature):
    h, w, b = operands(0)
    th, tw, _ = operands(1, bias=False)
    args = dict(divergence=divergence, temperature=temperature, **kw)

    def fn():
        return chunked_distillation_loss(h, w, th, tw, chunk_size=CHUNK, student_bias=b, **args)

    got, got_grads = under_bf16(fn, h, w, b)
    teacher_z = bf16_logits(th, tw).detach()
    want, want_grads = reference_grads(
        lambda z: full_logits_distillation_loss(z, torch.eye(V, dtype=z.dtype), teacher_z, torch.eye(V, dtype=z.dtype),
                                                **args),  # fmt: skip
        h, w, b,
    )  # fmt: skip
    float32 = chunked_distillation_loss(h, w, th, tw, chunk_size=CHUNK, student_bias=b, **args).item()
    assert_bf16_close(got, got_grads, want, want_grads, float32)


@pytest.mark.parametrize("mode,k", [("sampled", 8), ("topk", 5)])
def test_sparse_kd_head_in_bf16(mode, k):
    h, w, b = operands(2)
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    targets = sparse_targets_from_logits(teacher, mode=mode, k=k, temperature=2.0,
                                         generator=torch.Generator().manual_seed(4))  # fmt: skip
    got, got_grads = under_bf16(
        lambda: chunked_sparse_kd_loss(h, w, targets, temperature=2.0, chunk_size=CHUNK, student_bias=b), h, w, b
    )
    want, want_grads = reference_grads(lambda z: sparse_kd_loss(z, targets, temperature=2.0), h, w, b)
    float32 = chunked_sparse_kd_loss(h, w, targets, temperature=2.0, chunk_size=CHUNK, student_bias=b).item()
    assert_bf16_close(got, got_grads, want, want_grads, float32)


def test_fused_kd_and_cross_entropy_head_in_bf16():
    h, w, _ = operands(5, bias=False)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(6))
    teacher = torch.randn(N, V, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    targets = sparse_targets_from_logits(teacher, mode="sampled", k=16, generator=torch.Generator().manual_seed(8))

    def fn():
        return chunked_sparse_kd_with_ce(h, w, targets, labels, kd_weight=0.5, ce_weight=0.5, chunk_size=CHUNK)[0]

    got, got_grads = under_bf16(fn, h, w)

    def loss_of_logits(z):
        return 0.5 * sparse_kd_loss(z, targets) + 0.5 * torch.nn.functional.cross_entropy(z, labels)

    want, want_grads = reference_grads(loss_of_logits, h, w, None)
    float32 = chunked_sparse_kd_with_ce(h, w, targets, labels, kd_weight=0.5, ce_weight=0.5, chunk_size=CHUNK)[0]
    assert_bf16_close(got, got_grads, want, want_grads, float32.item())
    # and the cross-entropy alone, the baseline's loss
    got_ce, _ = under_bf16(lambda: chunked_cross_entropy(h, w, labels, chunk_size=CHUNK), h, w)
    want_ce = torch.nn.functional.cross_entropy(bf16_logits(h, w), labels)
    assert got_ce.item() == pytest.approx(want_ce.item(), rel=1e-5)


def test_matmul_dtype_follows_autocast_only_for_float32():
    x32, x64, x16 = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=BF16)
    assert [matmul_dtype(x) for x in (x32, x64, x16)] == [torch.float32, torch.float64, BF16]
    with torch.autocast("cpu", dtype=BF16):
        assert [matmul_dtype(x) for x in (x32, x64, x16)] == [BF16, torch.float64, BF16]


def test_float32_without_autocast_is_unchanged():
    """No autocast: the head stays float32, bit for bit the float32 loss of materialised logits' chunks."""
    h, w, b = operands(9)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(10))
    got = chunked_cross_entropy(h, w, labels, chunk_size=N, student_bias=b)
    want = torch.nn.functional.cross_entropy(h @ w.T + b, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
