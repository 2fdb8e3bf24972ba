"""distill.losses.kd_loss against a dense float64 reference.

Run: python -m pytest -q tests/test_losses.py      (pure tensors, ~2 s)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import ce_loss, kd_loss

N, V, K = 24, 50, 6


def _teacher(gen: torch.Generator, n: int = N, v: int = V, k: int = K):
    """A real top-k truncation of a dense teacher distribution: (ids, probs, residual, dense P)."""
    p = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64) * 2.0, dim=-1)
    probs, ids = p.topk(k, dim=-1)
    return ids, probs.float(), (1.0 - probs.sum(-1)).float(), p


def _reference(logits, targets, ids, probs, residual, alpha, temperature=1.0):
    """Float64, dense: buckets built with a one-hot [N,k,V] membership tensor (no gather tricks)."""
    z = logits.double()
    q, r = probs.double(), residual.double()
    ce = -torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    member = F.one_hot(ids, z.shape[1]).double() * (q > 0)[..., None]  # (N, k, V)
    ps = torch.softmax(z / temperature, -1)
    p_top = (member * ps[:, None, :]).sum(-1)  # (N, k)
    p_res = (1.0 - p_top.sum(-1)).clamp_min(1e-6)
    if temperature != 1.0:
        qt = torch.where(q > 0, q, torch.ones_like(q)) ** (1 / temperature) * (q > 0)
        q = qt / qt.sum(-1, keepdim=True).clamp_min(1e-30) * q.sum(-1, keepdim=True)
    safe = lambda a: torch.where(a > 0, a, torch.ones_like(a))
    kl = (q * (safe(q).log() - safe(p_top).log())).sum(-1) + r * (safe(r).log() - p_res.log())
    kl = kl * temperature**2
    has = (probs > 0).any(-1).double()
    loss = ((ce * (1 - alpha * has)) + alpha * kl * has).mean()
    kd = (kl * has).sum() / has.sum().clamp_min(1.0)
    return loss, ce.mean(), kd


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_identical_distributions_give_zero_kl(gen):
    ids, probs, residual, p = _teacher(gen)
    logits = p.log().float()  # the student IS the teacher
    targets = torch.randint(0, V, (N,), generator=gen)
    loss, ce, kd = kd_loss(logits, targets, ids, probs, residual, alpha=0.7)
    assert abs(kd.item()) < 1e-5
    assert torch.allclose(loss, 0.3 * ce, atol=1e-5)


def test_all_rows_masked_is_pure_ce(gen):
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    ids = torch.randint(0, V, (N, K), generator=gen)
    probs, residual = torch.zeros(N, K), torch.ones(N)
    loss, ce, kd = kd_loss(logits, targets, ids, probs, residual, alpha=0.5)
    ref = F.cross_entropy(logits, targets)
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(ce, ref, atol=1e-6)
    assert kd.item() == 0.0
    assert torch.allclose(ce_loss(logits, targets), ref)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (1.0, 1.0), (0.3, 2.0), (0.5, 0.7)])
def test_matches_float64_reference_values_and_gradients(gen, alpha, temperature):
    ids, probs, residual, _ = _teacher(gen)
    probs[3] = 0.0  # one row without a target
    residual[3] = 1.0
    probs[5, -2:] = 0.0  # a row with padded slots: repeated id, probability 0
    ids[5, -2:] = ids[5, 0]
    residual[5] = 1.0 - probs[5].sum()
    targets = torch.randint(0, V, (N,), generator=gen)
    base = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3.0

    x32 = base.float().requires_grad_(True)
    got = kd_loss(x32, targets, ids, probs, residual, alpha=alpha, temperature=temperature)
    got[0].backward()
    x64 = base.clone().requires_grad_(True)
    ref = _reference(x64, targets, ids, probs, residual, alpha, temperature)
    ref[0].backward()
    for g, r in zip(got, ref):
        assert abs(g.item() - r.item()) < 2e-5 * max(1.0, abs(r.item()))
    assert torch.allclose(x32.grad.double(), x64.grad, atol=2e-6, rtol=1e-4)


def test_full_distribution_temperature_equals_dense_tempered_kl(gen):
    """k = V (nothing truncated, residual 0): the documented temperature rule is the textbook one."""
    p = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64), -1)
    ids = torch.arange(V).repeat(N, 1)
    teacher_logits = p.log()
    z = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    tau = 2.0
    _, _, kd = kd_loss(z, targets, ids, p.float(), torch.zeros(N), alpha=1.0, temperature=tau)
    qt = torch.softmax(teacher_logits / tau, -1)
    dense = (qt * (qt.log() - torch.log_softmax(z.double() / tau, -1))).sum(-1).mean() * tau**2
    assert abs(kd.item() - dense.item()) < 1e-4


def test_chunked_equals_unchunked(gen):
    ids, probs, residual, _ = _teacher(gen, n=37)
    targets = torch.randint(0, V, (37,), generator=gen)
    base = torch.randn(37, V, generator=gen)
    grads, vals = [], []
    for chunk in (None, 5, 16, 37, 100):
        x = base.clone().requires_grad_(True)
        out = kd_loss(x, targets, ids, probs, residual, alpha=0.4, chunk_rows=chunk)
        out[0].backward()
        vals.append(torch.stack([t.detach() for t in out]))
        grads.append(x.grad)
    for v, g in zip(vals[1:], grads[1:]):
        assert torch.allclose(v, vals[0], atol=1e-6)
        assert torch.allclose(g, grads[0], atol=1e-7)


def test_bf16_logits_computed_in_float32(gen):
    ids, probs, residual, _ = _teacher(gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    z = torch.randn(N, V, generator=gen).bfloat16()
    loss, _, _ = kd_loss(z, targets, ids, probs, residual, alpha=0.5)
    ref = _reference(z.float(), targets, ids, probs, residual, 0.5)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), ref[0].item(), rel_tol=1e-5)


def test_top_k_truncation_equals_a_cache_of_fewer_ids(gen):
    """prepare_targets(top_k=k_s) on a k-id cache == the loss on a k_s-id cache of the same teacher
    (shuffled slot order: the truncation must pick by probability, not by position)."""
    from distill.losses import kd_loss_prepared, prepare_targets

    ids, probs, residual, p = _teacher(gen, k=K)
    perm = torch.randperm(K, generator=gen)
    ids_s, probs_s = ids[:, perm], probs[:, perm]
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    k_s = 3
    want = _reference(logits, targets, ids[:, :k_s], probs[:, :k_s], (1.0 - probs[:, :k_s].double().sum(-1)).float(), 0.7)
    t = prepare_targets(targets, ids_s, probs_s, residual, top_k=k_s)
    got = kd_loss_prepared(logits, t, 0.7)
    assert t.q.shape == (N, k_s)
    for g, w in zip(got, want):
        assert abs(float(g) - float(w)) < 1e-5
    full = kd_loss_prepared(logits, prepare_targets(targets, ids_s, probs_s, residual, top_k=K), 0.7)
    ref_full = _reference(logits, targets, ids, probs, residual, 0.7)
    assert abs(float(full[0]) - float(ref_full[0])) < 1e-5


def test_target_temperature_smooths_the_teacher_only(gen):
    """target_temperature τ_t: the loss equals the plain (student τ = 1) loss on a cache whose stored
    probabilities were tempered by τ_t within their own mass (float64, by hand), residual unchanged;
    the target gets flatter (higher entropy) and its stored mass is kept."""
    from distill.losses import kd_loss_prepared, prepare_targets

    ids, probs, residual, _p = _teacher(gen)
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    q = probs.double()
    qt = q ** 0.5
    q_smooth = (qt / qt.sum(-1, keepdim=True) * q.sum(-1, keepdim=True)).float()
    want = _reference(logits, targets, ids, q_smooth, residual, 0.6)
    t = prepare_targets(targets, ids, probs, residual, target_temperature=2.0)
    got = kd_loss_prepared(logits, t, 0.6)
    for g, w in zip(got, want):
        assert abs(float(g) - float(w)) < 1e-5
    assert torch.allclose(t.q.sum(-1), probs.sum(-1), atol=1e-6)
    ent = lambda a: -(a * a.clamp_min(1e-30).log()).sum(-1)
    assert bool((ent(t.q.double()) >= ent(probs.double()) - 1e-6).all())
    assert t.temperature == 1.0
