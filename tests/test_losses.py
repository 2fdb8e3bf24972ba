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
    """Float64, dense: buckets built with a one-hot [N,k,V] membership tensor (no gather tricks).
    τ != 1: the in/out split of the stored set S at τ = 1, the split within S tempered on both sides, × τ²."""
    z = logits.double()
    q, r = probs.double(), residual.double()
    ce = -torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    member = F.one_hot(ids, z.shape[1]).double() * (q > 0)[..., None]  # (N, k, V)
    ps = torch.softmax(z, -1)
    p_top = (member * ps[:, None, :]).sum(-1)  # (N, k)
    outside = member.sum(1) == 0  # (N, V): ids not among the row's present stored ids
    p_res = (ps * outside).sum(-1).clamp_min(1e-300)  # the mass outside, summed (no 1 − Σ cancellation)
    safe = lambda a: torch.where(a > 0, a, torch.ones_like(a))
    if temperature == 1.0:
        kl = (q * (safe(q).log() - safe(p_top).log())).sum(-1) + r * (safe(r).log() - p_res.log())
    else:
        big_q, big_p = q.sum(-1), p_top.sum(-1)
        split = big_q * (safe(big_q).log() - safe(big_p).log()) + r * (safe(r).log() - p_res.log())
        q_hat = torch.where(q > 0, q, torch.ones_like(q)) ** (1 / temperature) * (q > 0)
        q_hat = q_hat / q_hat.sum(-1, keepdim=True).clamp_min(1e-300)
        pt = (member * torch.softmax(z / temperature, -1)[:, None, :]).sum(-1)
        p_hat = pt / pt.sum(-1, keepdim=True).clamp_min(1e-300)
        within = (q_hat * (safe(q_hat).log() - safe(p_hat).log())).sum(-1)
        kl = split + temperature**2 * big_q * within
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


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_temperature_keeps_a_student_that_matches_the_cache_at_zero_kl(gen, tau):
    """A student whose stored-id probabilities equal the cache's q and whose other ids share the residual r
    matches the teacher on everything the cache knows: its KD term is 0 at any τ (the pre-12-03 rule, which
    tempered the student's tail against an untempered r, gave it a large KL at τ = 2 and trained over-confident
    students)."""
    ids, probs, residual, _ = _teacher(gen)
    z = torch.empty(N, V, dtype=torch.float64)
    for i in range(N):
        z[i] = math.log(residual[i].item() / (V - K))
        z[i, ids[i]] = probs[i].double().log()
    targets = torch.randint(0, V, (N,), generator=gen)
    _, _, kd = kd_loss(z.float(), targets, ids, probs, residual, alpha=1.0, temperature=tau)
    assert abs(kd.item()) < 2e-5 * tau**2
    z2 = z.clone()
    z2[torch.arange(N), ids[:, 0]] += 0.5  # move mass within S: the KL is positive
    _, _, kd2 = kd_loss(z2.float(), targets, ids, probs, residual, alpha=1.0, temperature=tau)
    assert kd2.item() > 1e-4


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


# ----------------------------------------------------------------------------- bf16 autocast (the GPU run)

def _confident_student(gen: torch.Generator, p_res: torch.Tensor, ids: torch.Tensor, v: int = V) -> torch.Tensor:
    """bf16 logits of a student that puts mass ≈ 1 − p_res[i] on row i's stored ids (spread over them) and
    ≈ p_res[i] on the rest of the vocabulary."""
    n, k = ids.shape
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 0.5
    member = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True)
    # shift the stored logits so that the outside mass is p_res: lse_S − lse_rest = log((1 − p_res) / p_res)
    lse_rest = torch.logsumexp(z.masked_fill(member, -math.inf), -1)
    lse_s = torch.logsumexp(z.masked_fill(~member, -math.inf), -1)
    shift = (torch.log((1 - p_res) / p_res) - (lse_s - lse_rest)).unsqueeze(1)
    return torch.where(member, z + shift, z).bfloat16()


def _autocast_case(device: str, gen: torch.Generator):
    n = 40
    ids, probs, residual, _ = _teacher(gen, n=n)
    p_res = torch.logspace(-1, -5, n, dtype=torch.float64)  # students with p_res from 0.1 down to 1e-5
    z = _confident_student(gen, p_res, ids)
    targets = ids[:, 0].clone()
    targets[::3] = torch.randint(0, V, (len(targets[::3]),), generator=gen)
    return z, targets, ids, probs, residual


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_under_bf16_autocast_matches_float64_reference(gen, device, temperature):
    """The training step calls the loss inside torch.autocast(bfloat16) with bf16 logits. Values and
    gradients must equal the float64 reference on the same (bf16) logits, including students whose
    residual mass is down to 1e-5 — where 1 − Σ p in bf16 is pure rounding noise."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z, targets, ids, probs, residual = _autocast_case(device, gen)
    x = z.to(device).detach().requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = kd_loss(x, targets.to(device), ids.to(device), probs.to(device), residual.to(device), alpha=0.5,
                      temperature=temperature)
    got[0].backward()
    x64 = z.double().requires_grad_(True)
    ref = _reference(x64, targets, ids, probs, residual, 0.5, temperature)
    ref[0].backward()
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert abs(g.item() - r.item()) < 1e-5 * max(1.0, abs(r.item())), (g.item(), r.item())
    assert x.grad.dtype == torch.bfloat16  # the gradient reaching bf16 logits is stored in bf16 ...
    grad = x.grad.double().cpu()
    # ... so it can only match to bf16 rounding (2^-8 relative); the broken bf16 residual was 90-99 % off
    assert torch.allclose(grad, x64.grad, atol=1e-9, rtol=8e-3), ((grad - x64.grad).abs() / x64.grad.abs()).max()


def test_student_residual_exact_down_to_1e_minus_5(gen):
    """Per row, the KL's residual term r·log p_res tracks log p_res to float32 precision, not to the
    ~1e-3 absolute noise that 1 − Σ p would give a confident student."""
    from distill.losses import _student_buckets, prepare_targets

    z, targets, ids, probs, residual = _autocast_case("cpu", gen)
    t = prepare_targets(targets, ids, probs, residual)
    _, _, log_p_res = _student_buckets(z.float(), t)
    zz = z.double()
    member = torch.zeros_like(zz, dtype=torch.bool).scatter_(1, ids, True)
    want = torch.logsumexp(zz.masked_fill(member, -math.inf), -1) - torch.logsumexp(zz, -1)
    assert want.exp().min() < 2e-5  # the case really reaches p_res ~ 1e-5
    assert torch.allclose(log_p_res.double(), want, atol=1e-5)


def test_loss_compiles_without_graph_breaks(gen):
    """kd_loss_prepared goes into the compiled training graph (model + loss): no graph breaks."""
    from distill.losses import kd_loss_prepared, prepare_targets

    ids, probs, residual, _ = _teacher(gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    t = prepare_targets(targets, ids, probs, residual)
    z = torch.randn(N, V, generator=gen, requires_grad=True)

    def step(logits):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return kd_loss_prepared(logits, t, 0.5)[0]

    explain = torch._dynamo.explain(step)(z)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_loss_compiles_with_targets_and_alpha_as_inputs(gen):
    """The trainer compiles kd_loss_prepared on CUDA and passes the targets and α (a 0-dim tensor, so an
    annealed α does not recompile) as inputs: one graph, no breaks, the same values as eager."""
    from distill.losses import kd_loss_prepared, prepare_targets

    ids, probs, residual, _ = _teacher(gen)
    t = prepare_targets(torch.randint(0, V, (N,), generator=gen), ids, probs, residual)
    z = torch.randn(N, V, generator=gen)
    alpha = torch.tensor(0.3)
    explain = torch._dynamo.explain(kd_loss_prepared)(z, t, alpha)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    for got, want in zip(kd_loss_prepared(z, t, alpha), kd_loss_prepared(z, t, 0.3)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("frac", [0.25, 0.5, 1.0])
def test_select_rows_keeps_kd_on_the_highest_teacher_entropy_rows(gen, frac):
    """Selective KD against the float64 reference on a teacher whose unselected rows were zeroed by hand:
    the kept rows are the ⌈frac·N⌉ rows of highest bucket entropy −Σq log q − r log r, computed here in float64."""
    from distill.losses import kd_loss_prepared, prepare_targets, select_rows

    ids, probs, residual, _ = _teacher(gen)
    probs[3] = 0.0  # a row without a target is never selected
    residual[3] = 1.0
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    q, r = probs.double(), residual.double()
    ent = -(torch.xlogy(q, q).sum(-1) + torch.xlogy(r, r))
    ent[3] = -math.inf
    keep = torch.zeros(N, dtype=torch.bool)
    keep[ent.argsort(descending=True)[: math.ceil(frac * N)]] = True
    keep[3] = False
    p_sel = torch.where(keep[:, None], probs, 0.0)
    r_sel = torch.where(keep, residual, 1.0)
    want = _reference(logits, targets, ids, p_sel, r_sel, alpha=0.6)
    t = select_rows(prepare_targets(targets, ids, probs, residual), frac)
    assert torch.equal(t.has.bool(), keep)
    got = kd_loss_prepared(logits, t, 0.6)
    for g, w in zip(got, want):
        assert abs(g.item() - w.item()) < 1e-5


def test_alpha_anneal_window():
    """kd.alpha_anneal_end < 1 hands α over to alpha_final before the end of the budget, then holds it."""
    from types import SimpleNamespace

    from student.config import KDConfig
    from student.train import Trainer

    k = KDConfig(alpha=0.9, alpha_schedule="anneal", alpha_anneal_frac=0.4, alpha_anneal_end=0.7, alpha_final=0.1)
    at = lambda p: Trainer.alpha(SimpleNamespace(cfg=SimpleNamespace(kd=k), progress=lambda: p))
    assert at(0.0) == pytest.approx(0.9) and at(0.3) == pytest.approx(0.9)
    assert at(0.5) == pytest.approx(0.9 - 0.8 * 0.5)  # halfway through [0.3, 0.7]
    assert at(0.7) == pytest.approx(0.1) and at(1.0) == pytest.approx(0.1)
    k.alpha_anneal_end, k.alpha_anneal_frac = 1.0, 0.2  # the default window: the last 20 %
    assert at(0.8) == pytest.approx(0.9) and at(0.9) == pytest.approx(0.5)
