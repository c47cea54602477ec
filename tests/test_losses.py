"""Losses against an independent float64 NumPy reference, plus properties and gradchecks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import divergences as losses

# ---- independent float64 reference (NumPy, written from the definitions) ----


def ref_softmax(z, t):
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def ref_divergence(name, s, t, temperature=1.0, **kw):
    p, q = ref_softmax(t, temperature), ref_softmax(s, temperature)
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return b * ref_kl(p, m) + (1 - b) * ref_kl(q, m)
    if name == "skew_kl":
        a = kw["alpha"]
        return ref_kl(p, a * p + (1 - a) * q)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise AssertionError(name)


def ref_mean(values, mask):
    if mask is None:
        return values.mean()
    return values[mask].sum() / max(mask.sum(), 1)


CASES = [
    ("forward_kl", losses.forward_kl, {}),
    ("reverse_kl", losses.reverse_kl, {}),
    ("jsd", losses.jsd, {"beta": 0.5}),
    ("jsd", losses.jsd, {"beta": 0.1}),
    ("jsd", losses.jsd, {"beta": 0.9}),
    ("skew_kl", losses.skew_kl, {"alpha": 0.1}),
    ("skew_kl", losses.skew_kl, {"alpha": 0.5}),
    ("tvd", losses.tvd, {}),
]
IDS = [f"{n}-{kw}" for n, _, kw in CASES]


def logits(shape, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_matches_float64_reference(name, fn, kw, temperature):
    s, t = logits((3, 5, 17), seed=1), logits((3, 5, 17), seed=2)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    got = fn(s, t, temperature=temperature, mask=mask, **kw)
    want = ref_mean(ref_divergence(name, s.numpy(), t.numpy(), temperature, **kw), mask.numpy())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
def test_float64_input_stays_float64_and_exact(name, fn, kw):
    s, t = logits((4, 9), seed=4, dtype=torch.float64), logits((4, 9), seed=5, dtype=torch.float64)
    got = fn(s, t, temperature=2.0, **kw)
    assert got.dtype == torch.float64
    want = ref_divergence(name, s.numpy(), t.numpy(), 2.0, **kw).mean()
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = logits((6, 11), seed=6), logits((6, 11), seed=7)
    assert losses.jsd(s, t, beta=0.0) == pytest.approx(losses.forward_kl(s, t).item())
    assert losses.jsd(s, t, beta=1.0) == pytest.approx(losses.reverse_kl(s, t).item())
    # The endpoints are the limits of the normalised divergence.
    s64, t64 = s.double(), t.double()
    eps = 1e-8
    near0 = losses.jsd(s64, t64, beta=eps) / eps
    near1 = losses.jsd(s64, t64, beta=1 - eps) / eps
    assert near0.item() == pytest.approx(losses.forward_kl(s64, t64).item(), rel=1e-4)
    assert near1.item() == pytest.approx(losses.reverse_kl(s64, t64).item(), rel=1e-4)
    # beta=0.5 is the symmetric JSD, bounded by log 2.
    sym = losses.jsd(s, t, beta=0.5)
    assert sym.item() == pytest.approx(losses.jsd(t, s, beta=0.5).item(), rel=1e-5)
    assert sym.item() <= math.log(2) + 1e-6


def test_skew_kl_alpha_zero_is_forward_kl_and_bad_params_fail():
    s, t = logits((6, 11), seed=8), logits((6, 11), seed=9)
    assert losses.skew_kl(s, t, alpha=0.0).item() == pytest.approx(losses.forward_kl(s, t).item())
    with pytest.raises(ValueError, match="alpha"):
        losses.skew_kl(s, t, alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        losses.forward_kl(s, t[:, :5])


# ---- properties ----

finite = st.floats(-30, 30, allow_nan=False, width=32)


@st.composite
def logit_pairs(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    s = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    t = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    mask = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    shape = (rows, cols)
    return torch.tensor(s).reshape(shape), torch.tensor(t).reshape(shape), torch.tensor(mask)


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
@given(pair=logit_pairs(), temperature=st.sampled_from([0.1, 1.0, 20.0]))
@settings(max_examples=40, deadline=None)
def test_nonnegative_and_zero_when_equal(name, fn, kw, pair, temperature):
    s, t, mask = pair
    assert fn(s, t, temperature=temperature, mask=mask, **kw).item() >= -1e-6
    assert abs(fn(t, t, temperature=temperature, mask=mask, **kw).item()) < 1e-6


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
@given(pair=logit_pairs(), garbage=st.floats(-1e4, 1e4, allow_nan=False))
@settings(max_examples=30, deadline=None)
def test_masked_positions_have_no_effect(name, fn, kw, pair, garbage):
    s, t, mask = pair
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = garbage
    t2[~mask] = -garbage
    s2.requires_grad_(True)
    s.requires_grad_(True)
    a, b = fn(s, t, mask=mask, **kw), fn(s2, t2, mask=mask, **kw)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    b.backward()
    assert torch.all(s2.grad[~mask] == 0)


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
def test_all_masked_gives_zero_not_nan(name, fn, kw):
    s = logits((3, 4, 7), seed=10).requires_grad_(True)
    t = logits((3, 4, 7), seed=11)
    out = fn(s, t, mask=torch.zeros(3, 4, dtype=torch.bool), **kw)
    out.backward()
    assert out.item() == 0.0
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


@pytest.mark.parametrize(("name", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_finite_gradients_at_extreme_logits(name, fn, kw, scale, temperature):
    s = logits((5, 13), scale=scale, seed=12).requires_grad_(True)
    t = logits((5, 13), scale=scale, seed=13)
    out = fn(s, t, temperature=temperature, **kw)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(("name", "fn", "kw"), CASES[:-1], ids=IDS[:-1])
def test_gradcheck_float64(name, fn, kw):
    s = logits((3, 6), seed=14, dtype=torch.float64).requires_grad_(True)
    t = logits((3, 6), seed=15, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=1.7, mask=mask, **kw), (s, t))


def test_gradcheck_tvd_away_from_kinks():
    # |p - q| is not differentiable where p == q; random logits keep every coordinate away from it.
    s = logits((3, 6), seed=16, dtype=torch.float64).requires_grad_(True)
    t = logits((3, 6), seed=17, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: losses.tvd(a, t, temperature=1.3), (s,))


# ---- the soft/hard mix ----


def test_distillation_loss_mixes_per_example_and_scales_by_t_squared():
    s, t = logits((6, 10), seed=18, dtype=torch.float64), logits((6, 10), seed=19, dtype=torch.float64)
    labels = torch.tensor([3, -100, 1, -100, 9, 0])
    temperature, alpha = 4.0, 0.3
    out = losses.distillation_loss(s, t, labels, temperature=temperature, alpha=alpha)
    kd = ref_divergence("forward_kl", s.numpy(), t.numpy(), temperature)
    logq = np.log(ref_softmax(s.numpy(), 1.0))
    labeled = labels.numpy() != -100
    ce = np.where(labeled, -logq[np.arange(6), np.where(labeled, labels.numpy(), 0)], 0.0)
    per = np.where(labeled, (1 - alpha) * temperature**2 * kd + alpha * ce, temperature**2 * kd)
    assert out["loss"].item() == pytest.approx(per.mean(), rel=1e-12)
    assert out["kd"].item() == pytest.approx(kd.mean(), rel=1e-12)
    assert out["ce"].item() == pytest.approx(ce[labeled].mean(), rel=1e-12)
    plain = losses.distillation_loss(s, t, labels, temperature=temperature, alpha=alpha, t2_scaling=False)
    per_plain = np.where(labeled, (1 - alpha) * kd + alpha * ce, kd)
    assert plain["loss"].item() == pytest.approx(per_plain.mean(), rel=1e-12)


def test_distillation_loss_unlabeled_batch_is_pure_soft_targets():
    s, t = logits((4, 5), seed=20), logits((4, 5), seed=21)
    out = losses.distillation_loss(s, t, None, temperature=2.0, alpha=0.7, divergence_name="reverse_kl")
    assert out["loss"].item() == pytest.approx(4.0 * losses.reverse_kl(s, t, temperature=2.0).item(), rel=1e-6)
    assert out["ce"].item() == 0.0
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.distillation_loss(s, t, None, divergence_name="kl_typo")
