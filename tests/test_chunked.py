"""Chunked (fused-linear) distillation loss against the plain materialised-logits loss."""

import pytest
import torch

from distill.losses import divergences as losses
from distill.losses.chunked import chunked_distillation_loss, full_logits_distillation_loss

B, T, H_S, H_T, V = 2, 7, 16, 24, 50
N = B * T

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("skew_kl", {"alpha": 0.1}),
    ("tvd", {}),
]
IDS = [f"{n}-{kw}" for n, kw in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest.py)


def test_cases_cover_every_divergence():
    assert {n for n, _ in CASES} == set(losses.PER_POSITION)


def inputs(seed=0, dtype=torch.float64, rows=V, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = {
        "student_hidden": rand(B, T, H_S).requires_grad_(),
        "student_head": rand(rows, H_S, scale=0.7).requires_grad_(),
        "teacher_hidden": rand(B, T, H_T),
        "teacher_head": rand(rows, H_T, scale=0.7),
    }
    if bias:
        x["student_bias"] = rand(rows).requires_grad_()
        x["teacher_bias"] = rand(rows)
    return x


def loss_and_grads(fn, x, wrt=("student_hidden", "student_head"), **kw):
    loss = fn(**x, **kw)
    return loss.detach(), torch.autograd.grad(loss, [x[k] for k in wrt])


def assert_same(x, rel=1e-10, atol=1e-9, wrt=("student_hidden", "student_head"), **kw):
    chunk_kw = {"chunk_size": kw.pop("chunk_size", 4)}
    got, got_grads = loss_and_grads(chunked_distillation_loss, x, wrt, **kw, **chunk_kw)
    want, want_grads = loss_and_grads(full_logits_distillation_loss, x, wrt, **kw)
    assert got.dtype == want.dtype
    assert got.item() == pytest.approx(want.item(), rel=rel, abs=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    return got, got_grads


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_matches_plain(name, kw, temperature):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) > 0.3
    for m in (None, mask):
        assert_same(inputs(), divergence=name, temperature=temperature, mask=m, **kw)


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_chunk_sizes_not_dividing_positions(chunk_size):
    assert_same(inputs(1), divergence="jsd", beta=0.5, temperature=2.0, chunk_size=chunk_size)


def test_only_masked_in_positions_are_computed_a_chunk_at_a_time(monkeypatch):
    rows, linear = [], torch.nn.functional.linear

    def spy(x, w, b=None):
        rows.append(x.shape[0])
        return linear(x, w, b)

    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(12)) > 0.5
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    chunked_distillation_loss(**inputs(), mask=mask, chunk_size=3).backward()
    assert max(rows) <= 3 and sum(rows) == 2 * mask.sum().item()  # student + teacher, each position once


def test_any_leading_dims():
    x = inputs(13)
    flat = {
        k: (v.detach().flatten(0, -2).requires_grad_(v.requires_grad) if "hidden" in k else v) for k, v in x.items()
    }
    extra = {k: (v.detach()[None].requires_grad_(v.requires_grad) if "hidden" in k else v) for k, v in x.items()}
    assert_same(flat, divergence="tvd", chunk_size=5)
    assert_same(extra, divergence="tvd", mask=torch.rand(1, B, T) > 0.5, chunk_size=5)


def test_matches_plain_with_bias():
    wrt = ("student_hidden", "student_head", "student_bias")
    assert_same(inputs(2, bias=True), wrt=wrt, divergence="reverse_kl", temperature=1.5)


@pytest.mark.parametrize("name", ["forward_kl", "tvd"])
def test_all_masked_is_zero_with_zero_grads(name):
    x = inputs(3)
    loss, grads = assert_same(x, divergence=name, mask=torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_masked_positions_get_no_gradient():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    _, (grad_h, _) = assert_same(inputs(4), divergence="skew_kl", alpha=0.1, mask=mask)
    assert not grad_h[1, 4:].any() and grad_h[0].abs().sum() > 0


def test_explicit_normalizer_divides_the_sum():
    x, mask = inputs(5), torch.rand(B, T, generator=torch.Generator().manual_seed(6)) > 0.5
    mean = chunked_distillation_loss(**x, mask=mask, chunk_size=3)
    for normalizer in (37.0, torch.tensor(37)):
        got, _ = assert_same(x, mask=mask, normalizer=normalizer, chunk_size=3)
        assert got.item() == pytest.approx(mean.item() * mask.sum().item() / 37.0, rel=1e-12)


def test_padded_vocab_uses_only_the_first_vocab_size_rows():
    x = inputs(7, rows=V + 6)
    _, (_, grad_w) = assert_same(x, divergence="jsd", beta=0.5, vocab_size=V, temperature=2.0, chunk_size=5)
    assert not grad_w[V:].any() and grad_w[:V].abs().sum() > 0
    # ...and the padded rows do not matter at all: same as heads cut to V rows.
    cut = {k: (v.detach()[:V].requires_grad_(v.requires_grad) if "head" in k else v) for k, v in x.items()}
    assert chunked_distillation_loss(**x, vocab_size=V).item() == pytest.approx(
        full_logits_distillation_loss(**cut).item(), rel=1e-12
    )


def test_student_head_without_grad():
    x = inputs(8)
    x["student_head"].requires_grad_(False)
    assert_same(x, wrt=("student_hidden",), divergence="reverse_kl", chunk_size=5)


def test_no_grad_mode_gives_the_value():
    x = inputs(9)
    with torch.no_grad():
        got = chunked_distillation_loss(**x, divergence="tvd", chunk_size=3)
    assert not got.requires_grad
    assert got.item() == pytest.approx(full_logits_distillation_loss(**x, divergence="tvd").item(), rel=1e-10)


def test_bfloat16_close_to_float32_plain():
    x32 = inputs(10, dtype=torch.float32)
    x16 = {k: v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad) for k, v in x32.items()}
    got, got_grads = loss_and_grads(chunked_distillation_loss, x16, divergence="forward_kl", chunk_size=4)
    want, want_grads = loss_and_grads(full_logits_distillation_loss, x32, divergence="forward_kl")
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=0.05)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.02 * b.abs().max().item())


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(11)
    h_s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = (
        torch.randn(2, 3, 5, generator=g, dtype=torch.float64),
        torch.randn(9, 5, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def fn(h, w):
        return chunked_distillation_loss(
            h, w, h_t, w_t, divergence="jsd", beta=0.3, temperature=1.7, mask=mask, chunk_size=2, vocab_size=7
        )

    assert torch.autograd.gradcheck(fn, (h_s, w_s))


def test_rejects_bad_arguments():
    x = inputs()
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_distillation_loss(**x, divergence="nope")
    with pytest.raises(ValueError, match="mask shape"):
        chunked_distillation_loss(**x, mask=torch.ones(T, B, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distillation_loss(**x, vocab_size=V + 1)
