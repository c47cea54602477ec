"""Sparse-target KD (sampled / top-k) against float64 references written out here, plus the chunked version."""

import numpy as np
import pytest
import torch

from distill.losses.sparse import SparseTargets, chunked_sparse_kd_loss, sparse_kd_loss, sparse_targets_from_logits

TEMP = 2.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest.py)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_topk(student, teacher, k, temp):
    """Per-position KL over k+1 buckets, float64 numpy, via 1 − Σp for both tails."""
    ls, lt = np_log_softmax(student / temp), np_log_softmax(teacher / temp)
    out = []
    for s, t in zip(ls.reshape(-1, ls.shape[-1]), lt.reshape(-1, lt.shape[-1]), strict=True):
        top = np.argsort(-t)[:k]
        q, p = np.exp(t[top]), np.exp(s[top])
        qt, pt = 1 - q.sum(), 1 - p.sum()
        tail = qt * (np.log(qt) - np.log(pt)) if k < len(t) else 0.0  # k = V: no tail (1 − Σ is round-off)
        out.append((q * (np.log(q) - np.log(p))).sum() + tail)
    return np.array(out)


def ref_sampled(student, ids, temp):
    ls = np_log_softmax(student / temp).reshape(-1, student.shape[-1])
    return np.array([-ls[i, row].mean() for i, row in enumerate(ids.reshape(-1, ids.shape[-1]))])


def logits(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_topk_targets_match_numpy():
    t = logits(3, 4, 20, seed=1)
    tg = sparse_targets_from_logits(t, mode="topk", k=5, temperature=TEMP)
    lt = np_log_softmax(t.numpy() / TEMP)
    order = np.argsort(-lt, axis=-1)[..., :5]
    assert tg.mode == "topk" and tg.ids.shape == (3, 4, 5)
    np.testing.assert_array_equal(tg.ids.numpy(), order)
    np.testing.assert_allclose(tg.logp.numpy(), np.take_along_axis(lt, order, -1), rtol=1e-12)
    tail = np.log1p(-np.exp(np.take_along_axis(lt, order, -1)).sum(-1))
    np.testing.assert_allclose(tg.tail.numpy(), tail, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_value_matches_reference(k):
    s, t = logits(2, 5, 20, seed=2, scale=2.0), logits(2, 5, 20, seed=3, scale=2.0)
    tg = sparse_targets_from_logits(t, mode="topk", k=k, temperature=TEMP)
    got = sparse_kd_loss(s, tg, temperature=TEMP)
    want = ref_topk(s.numpy(), t.numpy(), k, TEMP).mean()
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    if k == 20:  # all of the vocabulary: the full forward KL, and a finite gradient despite the empty tail
        lt, ls = np_log_softmax(t.numpy() / TEMP), np_log_softmax(s.numpy() / TEMP)
        assert got.item() == pytest.approx((np.exp(lt) * (lt - ls)).sum(-1).mean(), rel=1e-9)
        s.requires_grad_()
        (g,) = torch.autograd.grad(sparse_kd_loss(s, tg, temperature=TEMP), s)
        assert torch.isfinite(g).all()


def test_sampled_value_matches_reference():
    s, t = logits(2, 5, 30, seed=4), logits(2, 5, 30, seed=5)
    tg = sparse_targets_from_logits(
        t, mode="sampled", k=7, temperature=TEMP, generator=torch.Generator().manual_seed(0)
    )
    assert tg.mode == "sampled" and tg.logp is None and tg.ids.shape == (2, 5, 7)
    got = sparse_kd_loss(s, tg, temperature=TEMP)
    assert got.item() == pytest.approx(ref_sampled(s.numpy(), tg.ids.numpy(), TEMP).mean(), rel=1e-12)


def test_sampled_is_deterministic_and_follows_the_teacher():
    t = logits(1, 6, seed=6).expand(20000, 6)

    def draw():
        gen = torch.Generator().manual_seed(9)
        return sparse_targets_from_logits(t, mode="sampled", k=4, temperature=TEMP, generator=gen).ids

    a = draw()
    assert torch.equal(a, draw())
    freq = torch.bincount(a.reshape(-1), minlength=6).double() / a.numel()
    q = torch.softmax(t[0] / TEMP, -1)
    assert torch.allclose(freq, q, atol=5 * (0.25 / a.numel()) ** 0.5)


def full_kd_grad(s, t, temp):
    """d/ds of Σ_positions KL(teacher_T || student_T), float64 autograd of the written-out KL."""
    s = s.clone().requires_grad_()
    q = torch.softmax(t / temp, -1)
    kl = (q * (q.log() - torch.log_softmax(s / temp, -1))).sum()
    return torch.autograd.grad(kl, s)[0]


def test_sampled_gradient_is_unbiased_and_small_topk_is_not():
    # Three (teacher, student) pairs, each repeated R times: the mean gradient over the copies is a
    # Monte-Carlo average over R independent draws of k samples.
    V, R, k = 12, 4000, 16
    t0, s0 = logits(3, V, seed=7, scale=0.5), logits(3, V, seed=8)  # a flat-ish teacher
    t, s = t0.repeat_interleave(R, 0), s0.repeat_interleave(R, 0).requires_grad_()
    tg = sparse_targets_from_logits(
        t, mode="sampled", k=k, temperature=TEMP, generator=torch.Generator().manual_seed(1)
    )
    (g,) = torch.autograd.grad(sparse_kd_loss(s, tg, temperature=TEMP, normalizer=1.0), s)
    mc = g.reshape(3, R, V).mean(1)
    want = full_kd_grad(s0, t0, TEMP)
    # Per component the estimate is (p − counts/k)/T averaged over R·k draws: std sqrt(q(1−q)/(R·k))/T.
    q = torch.softmax(t0 / TEMP, -1)
    sigma = (q * (1 - q) / (R * k)).sqrt() / TEMP
    assert ((mc - want).abs() <= 5 * sigma).all()  # 5σ: false-alarm odds ~1e-6 per component, fixed seed anyway

    # Top-2 has no noise but a bias: inside the tail only the total mass is matched, not its shape.
    top = sparse_targets_from_logits(t0, mode="topk", k=2, temperature=TEMP)
    s0 = s0.clone().requires_grad_()
    (g_top,) = torch.autograd.grad(sparse_kd_loss(s0, top, temperature=TEMP, normalizer=1.0), s0)
    bias = (g_top - want).abs().max()
    assert bias > 5 * (5 * sigma).max(), (bias, sigma.max())  # 25σ: no draw of the noise explains it


def make_chunk_inputs(seed, n=(3, 7), H=8, rows=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, H, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(rows, H, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = torch.randn(rows, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(*n, rows, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(n, generator=g) > 0.3
    return h, w, b, teacher, mask


@pytest.mark.parametrize("mode,k", [("sampled", 5), ("topk", 4), ("topk", 36)])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_matches_materialised(mode, k, chunk_size, use_mask):
    vocab = 36  # head has 40 rows: 4 padding rows
    h, w, b, teacher, mask = make_chunk_inputs(seed=k + chunk_size)
    mask = mask if use_mask else None
    tg = sparse_targets_from_logits(
        teacher, mode=mode, k=k, temperature=TEMP, vocab_size=vocab, generator=torch.Generator().manual_seed(3)
    )
    kw = dict(temperature=TEMP, mask=mask, vocab_size=vocab)
    plain = sparse_kd_loss(h @ w.T + b, tg, **kw)
    chunked = chunked_sparse_kd_loss(h, w, tg, chunk_size=chunk_size, student_bias=b, **kw)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, c in zip(
        torch.autograd.grad(3 * plain, (h, w, b)), torch.autograd.grad(3 * chunked, (h, w, b)), strict=True
    ):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    assert chunked.dtype == torch.float64


def test_chunked_without_bias_and_only_some_grads():
    h, w, _, teacher, mask = make_chunk_inputs(seed=11)
    tg = sparse_targets_from_logits(teacher, mode="topk", k=3, temperature=1.0)
    w0 = w.detach()
    plain = sparse_kd_loss(h @ w0.T, tg, mask=mask, normalizer=5.0)
    chunked = chunked_sparse_kd_loss(h, w0, tg, mask=mask, normalizer=5.0, chunk_size=3)
    torch.testing.assert_close(torch.autograd.grad(chunked, h)[0], torch.autograd.grad(plain, h)[0])


def test_float32_inputs_accumulate_in_float32():
    s = logits(4, 10, seed=12).float().requires_grad_()
    tg = sparse_targets_from_logits(logits(4, 10, seed=13).half(), mode="topk", k=3, temperature=TEMP)
    tg = SparseTargets(tg.ids, tg.logp.half(), tg.tail.half())  # as read back from a float16 cache
    loss = sparse_kd_loss(s, tg, temperature=TEMP)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_mask_and_normalizer():
    s, t = logits(2, 6, 15, seed=14), logits(2, 6, 15, seed=15)
    tg = sparse_targets_from_logits(t, mode="topk", k=4, temperature=TEMP)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = mask[1, 5] = True
    per = ref_topk(s.numpy(), t.numpy(), 4, TEMP).reshape(2, 6)
    kept = per[mask.numpy()]
    assert sparse_kd_loss(s, tg, temperature=TEMP, mask=mask).item() == pytest.approx(kept.mean(), rel=1e-10)
    # A global normalizer (gradient accumulation): the sum over this micro-batch divided by it.
    got = sparse_kd_loss(s, tg, temperature=TEMP, mask=mask, normalizer=torch.tensor(10.0))
    assert got.item() == pytest.approx(kept.sum() / 10, rel=1e-10)
    # Masked-out positions get no gradient.
    s.requires_grad_()
    (g,) = torch.autograd.grad(sparse_kd_loss(s, tg, temperature=TEMP, mask=mask), s)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_empty_mask_gives_zero_and_zero_grads(mode):
    h, w, b, teacher, _ = make_chunk_inputs(seed=16)
    tg = sparse_targets_from_logits(teacher, mode=mode, k=3, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(teacher.shape[:-1], dtype=torch.bool)
    for loss in (
        sparse_kd_loss(h @ w.T + b, tg, mask=empty),
        chunked_sparse_kd_loss(h, w, tg, mask=empty, student_bias=b),
    ):
        assert loss.item() == 0.0
        for g in torch.autograd.grad(loss, (h, w, b)):
            assert not g.isnan().any() and (g == 0).all()


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_padded_vocab_rows_get_nothing(mode):
    t = logits(50, 10, seed=17)
    t[:, 8:] = 50.0  # the padding rows would win every draw if they were not cut off
    tg = sparse_targets_from_logits(t, mode=mode, k=6, vocab_size=8, generator=torch.Generator().manual_seed(2))
    assert tg.ids.max() < 8
    if mode == "topk":
        assert torch.allclose(
            torch.logsumexp(torch.cat([tg.logp, tg.tail[:, None]], -1), -1), torch.zeros(50, dtype=torch.float64)
        )
    s = logits(50, 10, seed=18).requires_grad_()
    loss = sparse_kd_loss(s, tg, vocab_size=8)
    (g,) = torch.autograd.grad(loss, s)
    assert (g[:, 8:] == 0).all()
    assert loss.item() == pytest.approx(sparse_kd_loss(s[:, :8], tg).item(), rel=1e-12)


def test_bad_inputs():
    s = logits(2, 3, 10)
    tg = sparse_targets_from_logits(s, mode="topk", k=2)
    with pytest.raises(ValueError, match="mask shape"):
        sparse_kd_loss(s, tg, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match positions"):
        sparse_kd_loss(s[:1], tg)
    with pytest.raises(ValueError, match="mode"):
        sparse_targets_from_logits(s, mode="dense", k=2)
    with pytest.raises(ValueError, match="k must be"):
        sparse_targets_from_logits(s, mode="topk", k=11)
    with pytest.raises(ValueError, match="both logp and tail"):
        SparseTargets(tg.ids, tg.logp, None)


@pytest.mark.parametrize("mode,k", [("sampled", 5), ("topk", 4)])
@pytest.mark.parametrize("temperature", [1.0, TEMP])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("some_distilled", [False, True])
def test_kd_with_ce_in_one_pass_matches_the_two_terms(mode, k, temperature, chunk_size, some_distilled):
    """Issue 19: KD + CE from one pass over the head equals the two terms computed apart — value against a float64
    NumPy reference, gradients against autograd through materialised logits — with KD on a subset of the trained
    positions (recorded teachers score some) and padded vocabulary rows."""
    from distill.losses.sparse import chunked_sparse_kd_with_ce

    vocab = 36
    h, w, b, teacher, mask = make_chunk_inputs(seed=k + chunk_size)
    labels = torch.randint(0, vocab, mask.shape, generator=torch.Generator().manual_seed(5))
    labels[~mask] = -100  # ignored positions carry the ignore index, as the data does
    distilled = torch.rand(mask.shape, generator=torch.Generator().manual_seed(6)) > 0.4 if some_distilled else None
    tg = sparse_targets_from_logits(
        teacher, mode=mode, k=k, temperature=temperature, vocab_size=vocab, generator=torch.Generator().manual_seed(3)
    )
    kd_weight, ce_weight = 0.5 * temperature**2, 0.5
    total, kd, ce = chunked_sparse_kd_with_ce(
        h, w, tg, labels, kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, mask=mask,
        distilled=distilled, chunk_size=chunk_size, vocab_size=vocab, student_bias=b,
    )  # fmt: skip
    # float64 NumPy reference of both terms
    z = (h @ w.T + b).detach().numpy()[..., :vocab]
    on = mask.numpy() & (True if distilled is None else distilled.numpy())
    per_kd = (
        ref_sampled(z, tg.ids.numpy(), temperature)
        if mode == "sampled"
        else ref_topk(z, teacher.numpy()[..., :vocab], k, temperature)
    )
    per_ce = -np.take_along_axis(np_log_softmax(z), labels.clamp(min=0).numpy()[..., None], -1)[..., 0]
    n = mask.sum().item()
    assert kd.item() == pytest.approx(per_kd[on.reshape(-1)].sum() / n, rel=1e-10)
    assert ce.item() == pytest.approx(per_ce[mask.numpy()].sum() / n, rel=1e-10)
    assert total.item() == pytest.approx(kd_weight * kd.item() + ce_weight * ce.item(), rel=1e-12)
    # gradients: autograd through the materialised logits, the two terms apart
    logits_ = h @ w.T + b
    kd_mask = mask if distilled is None else mask & distilled
    plain_kd = sparse_kd_loss(logits_, tg, temperature=temperature, mask=kd_mask, normalizer=n, vocab_size=vocab)
    plain_ce = (
        torch.nn.functional.cross_entropy(
            logits_[..., :vocab].reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / n
    )
    plain = kd_weight * plain_kd + ce_weight * plain_ce
    for a, c in zip(torch.autograd.grad(plain, (h, w, b)), torch.autograd.grad(total, (h, w, b)), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
