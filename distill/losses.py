"""The distillation loss: (1−α)·CE(y) + α·KL(q ‖ p_S) over k_s stored ids + one residual bucket.

Targets come from the teacher cache (distill/cache.py), one row per predicted token: `ids [N,k]` student
ids, `probs [N,k]` the teacher's probabilities at those ids and `residual [N]` = 1 − Σ probs (the mass the
cache did not keep). The student side is folded into the same k+1 buckets: its probabilities gathered at
the stored ids, plus a residual bucket p_res = Σ over the other ids (= 1 − Σ gathered, computed without
the subtraction). Keeping the residual bucket (instead of
renormalising the top-k) keeps the target unbiased (Sparse Logit Sampling, ACL 2025).

- float32 math whatever the logits' dtype and whatever autocast says (autocast is switched off inside the
  loss; bf16 reductions made the residual bucket move in steps of ~0.004). The student's log-sum-exp is
  assembled once from two parts — over the stored ids and over the rest of the vocabulary — and shared by
  CE, the gathered log-probabilities and the residual bucket log p_res = lse_rest − lse, which is exact
  however confident the student is (no 1 − Σ p cancellation).
- Rows without a target (probs sum 0; the cache writes residual 1) contribute CE only.
- Slots with probability 0 (padding in rows with fewer than k candidates) are ignored on both sides, so a
  repeated padding id cannot double-count student mass.
- Everything that depends only on the teacher (masks, tempered q, Σ q log q + r log r, the gather index
  [target | ids]) is prepared once by `prepare_targets` — the loader does it in its background thread — so
  the step itself runs one masked log-sum-exp over [N, V], ONE gather and a handful of [N, k] ops. On a busy CPU every
  extra op costs a thread-pool round trip, which is what made a naive version 3x slower than CE.
- Rows are processed in chunks of `chunk_rows`, so the float32 upcast of the logits is bounded to
  [chunk_rows, V] at a time (bf16 logits on GPU) — results equal the unchunked computation.

Temperature τ on TRUNCATED targets (our choice, documented): the cache knows the teacher's mass on the
stored set S (Q = 1 − r) and its split within S, but not how the tail r is spread, so τ acts only where both
sides are known. The k+1-bucket KL splits exactly (chain rule) into the in/out split and the split within S:
    KL = [Q log(Q/P) + r log(r/p_res)] + Q · KL(q̂ ‖ p̂),   q̂ = q/Q, p̂ = p_S/P within S, P = Σ_S p_S;
with τ the first term stays at τ = 1 and the second is tempered on both sides, q̂^τ ∝ q̂^{1/τ}, p̂^τ ∝
exp(z/τ) within S, and multiplied by τ² (Hinton et al., so gradient scale does not depend on τ). τ = 1 is
exactly the plain k+1-bucket KL; with nothing truncated (r = 0, S = V) it is the textbook τ²·KL(q^τ ‖ p^τ).
(The rule before 12-03 tempered the student's full softmax but kept the target's residual at its τ = 1 mass:
at τ = 2 over 1,024 ids the student's tempered tail is large, the KL pushed it down to r, and the τ = 1 student
came out over-confident — +0.236 bpb at 2 passes, docs/RESULTS.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

LOG_RESIDUAL_FLOOR = -69.0  # log(1e-30): the student residual's floor, reached only when the stored ids cover V
_MASKED_LOGIT = -1e30  # stands for −inf in the masked log-sum-exp (finite: a fully masked row must not give NaN)


@dataclass
class KDTargets:
    """Teacher-side tensors for N rows, ready for the loss (see prepare_targets)."""

    index: torch.Tensor  # (N, k+1) int64: [target | stored ids] — one gather serves CE and KL
    q: torch.Tensor  # (N, k) float32 target probabilities (tempered when τ != 1), 0 at absent slots
    mask: torch.Tensor  # (N, k) float32 1 at slots that are part of the target
    r: torch.Tensor  # (N,) float32 teacher residual mass (1 for rows without a target)
    has: torch.Tensor  # (N,) float32 1 for rows with a target
    neg_entropy: torch.Tensor  # (N,) float32 Σ q log q + r log r (the KL's student-free part)
    temperature: float = 1.0

    def _tensors(self):
        return [getattr(self, f.name) for f in fields(self) if f.name != "temperature"]

    def map(self, fn) -> KDTargets:
        return KDTargets(*(fn(t) for t in self._tensors()), temperature=self.temperature)

    def to(self, device, non_blocking: bool = False) -> KDTargets:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def split(self, rows: int) -> list[KDTargets]:
        parts = [t.split(rows) for t in self._tensors()]
        return [KDTargets(*p, temperature=self.temperature) for p in zip(*parts)]


@torch.no_grad()
def prepare_targets(targets: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, residual: torch.Tensor,
                    temperature: float = 1.0, top_k: int = 0, target_temperature: float = 1.0) -> KDTargets:
    """Teacher rows -> KDTargets. Slots with probability 0 (padding in rows with fewer than k candidates)
    are masked out on both sides, so a repeated padding id cannot double-count student mass.
    `top_k` > 0 keeps only each row's top_k most probable stored ids and moves the rest of their mass into
    the residual bucket: one cache at k serves every k_s <= k (the k_s sweep).
    `target_temperature` != 1 smooths the TARGET only (the student stays at τ = 1): the stored mass is
    tempered within itself, q_j ∝ q_j^{1/τ_t} with Σ q_j kept, the residual unchanged."""
    if temperature <= 0 or target_temperature <= 0:
        raise ValueError(f"temperatures must be positive, got {temperature}, {target_temperature}")
    if top_k and top_k < ids.shape[1]:
        q_all = probs.float()
        q_keep, pos = torch.topk(q_all, int(top_k), dim=1)
        residual = residual.float() + (q_all.sum(dim=1) - q_keep.sum(dim=1))
        ids, probs = ids.gather(1, pos), q_keep
    q = probs.float()
    present = q > 0
    has = present.any(dim=1)
    r = torch.where(has, residual.float().clamp(0.0, 1.0), torch.ones_like(residual, dtype=torch.float32))
    for tau in (target_temperature, temperature):  # temper the stored mass within itself; the residual keeps its
        if tau != 1.0:                            # mass (see top)
            qt = torch.where(present, q, torch.ones_like(q)).pow(1.0 / tau) * present
            q = qt / qt.sum(dim=1, keepdim=True).clamp_min(1e-30) * q.sum(dim=1, keepdim=True)
    neg_entropy = torch.xlogy(q, q).sum(dim=1) + torch.xlogy(r, r)
    index = torch.cat((targets.long().reshape(-1, 1), ids.long()), dim=1)
    return KDTargets(index, q, present.float(), r, has.float(), neg_entropy, temperature)


@torch.no_grad()
def select_rows(t: KDTargets, frac: float) -> KDTargets:
    """Keep the KD term only on the ⌈frac·n⌉ of the n rows with the highest teacher entropy (rows without a
    target never count as selected); the others become CE-only rows (has 0, r 1, no stored mass).
    Teacher entropy of the k+1 buckets is −neg_entropy, already prepared. Selective KD (SE-KD, arXiv
    2602.01395): where the teacher is sure, its soft target says little beyond the label; where it is unsure,
    the spread is the information. Teacher-only and O(n log n) on n rows: cheap beside the step."""
    if frac >= 1.0:
        return t
    has = t.has > 0
    n_keep = int(math.ceil(frac * has.shape[0]))  # from the shape: no host sync
    score = torch.where(has, -t.neg_entropy, torch.full_like(t.neg_entropy, -math.inf))
    keep = torch.zeros_like(has)
    if n_keep > 0:
        keep[torch.topk(score, n_keep, sorted=False).indices] = True
    keep &= has
    k = keep.unsqueeze(1)
    return KDTargets(t.index, torch.where(k, t.q, 0.0), torch.where(k, t.mask, 0.0),
                     torch.where(keep, t.r, 1.0), keep.float(), torch.where(keep, t.neg_entropy, 0.0),
                     t.temperature)


class _StudentBuckets(torch.autograd.Function):
    """(lse, z at index, log p_res) of float32 logits z (n, V), with a hand-written backward.

    Forward: e = exp(z − m) once; lse = m + log Σ e; the residual is the sum of e over the ids outside the
    row's stored set S, taken directly (e with S zeroed by a k-wide scatter) — a sum of positive terms, so
    log p_res is exact to float32 rounding however confident the student (no 1 − Σ p cancellation).
    Backward (d/dz_v of the three outputs, weighted by their incoming grads G_lse, G_z, G_res):
        G_lse·p_v + G_res·(p_v·[v ∉ S] / p_res − p_v) + Σ_j G_z[j]·[index_j = v]
      = p_v·a  (v ∉ S),  p_v·b  (v ∈ S),  plus the scatter of G_z,   a = G_lse − G_res + G_res / p_res, b = G_lse − G_res.
    Three passes over (n, V) each way instead of the ~10 of the autograd graph of a masked log-sum-exp —
    the KD step's extra cost over CE on CPU, and memory traffic on GPU."""

    @staticmethod
    def forward(ctx, z, index, zero_idx, zero_src_keep):
        m = z.detach().amax(dim=-1, keepdim=True)
        e = (z - m).exp_()
        total = e.sum(dim=-1)
        # zero the stored ids (absent slots point at a stored id of their row, or write back their own value)
        e.scatter_(1, zero_idx, e.gather(1, zero_idx) * zero_src_keep)
        rest = e.sum(dim=-1)
        lse = m.squeeze(1) + total.log()
        log_p_res = (rest.log() - total.log()).clamp_min(LOG_RESIDUAL_FLOOR)  # floor: S covers the vocab
        ctx.save_for_backward(z, index, zero_idx, zero_src_keep, lse, log_p_res, rest > 0)
        return lse, z.gather(1, index), log_p_res

    @staticmethod
    def backward(ctx, g_lse, g_z, g_res):
        z, index, zero_idx, keep, lse, log_p_res, has_rest = ctx.saved_tensors
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
        g_res = torch.zeros_like(lse) if g_res is None else g_res
        inv_p_res = torch.where(has_rest, (-log_p_res).exp(), torch.zeros_like(log_p_res))
        b = g_lse - g_res
        a = b + g_res * inv_p_res
        p = (z - lse.unsqueeze(1)).exp_()
        grad = p.mul_(a.unsqueeze(1))
        # stored ids: p·b instead of p·a (absent slots rewrite p·a: the value already there)
        pz = (z.gather(1, zero_idx) - lse.unsqueeze(1)).exp()
        grad.scatter_(1, zero_idx, torch.where(keep > 0, grad.gather(1, zero_idx), pz * b.unsqueeze(1)))
        if g_z is not None:
            grad.scatter_add_(1, index, g_z)
        return grad, None, None, None


def _student_buckets(z: torch.Tensor, t: KDTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student side of the k+1 buckets from float32 logits z (n, V), computed without cancellation:
    (lse (n,), z at [target | stored ids] (n, k+1), log p_res (n,)).

    The residual bucket is NOT 1 − Σ p: when the student is confident on a stored id that difference cancels
    (float32: absolute error ~k·6e-8, so p_res = 1e-5 would be ~1 % wrong; under bf16 autocast, steps of 0.004).
    Instead the exponentials of the logits OUTSIDE the stored set are summed directly (_StudentBuckets). A
    stored id repeated within a row (padding) counts once; absent slots (probability 0) are not in the set."""
    ids = t.index[:, 1:]
    present = t.mask > 0
    with torch.no_grad():
        # absent slots: point at the row's first present id (zeroing it twice is harmless); rows with no
        # present id keep their ids and write back the value already there (keep = 1)
        first = ids.gather(1, present.float().argmax(dim=1, keepdim=True))
        zero_idx = torch.where(present, ids, first)
        row_has = present.any(dim=1, keepdim=True)
        keep = (~row_has).expand_as(ids).float()
    return _StudentBuckets.apply(z, t.index, zero_idx, keep)


def _chunk_sums(logits: torch.Tensor, t: KDTargets, alpha: float) -> tuple[torch.Tensor, ...]:
    """(mixed-loss sum, CE sum, KL sum) over one chunk of rows, in float32 whatever autocast says.

    mixed = Σ (1 − α·has)·CE + α·Σ KL, with KL = Σq log q + r log r − Σ q log p − r log p_res. Both the CE
    and the −Σ q log p parts are linear in the gathered log-probs g, so they are one weighted sum
    −Σ g·W with W = [1 − α·has | α·q]; only the residual bucket needs its own few ops.
    Autocast is switched off inside: under bf16 autocast, reductions such as dot/vecdot would otherwise run in
    bf16 (8 bits of mantissa) and the residual bucket, the KL and its gradient would be wrong."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float()
        lse, zi, log_p_res = _student_buckets(z, t)
        g = zi - lse.unsqueeze(1)  # (n, k+1): log p_S(target), log p_S(stored ids)
        tau = t.temperature
        res = (t.r * log_p_res).sum()  # Σ r log p_res (rows without a target: r = 1, p_res = 1 -> 0)
        ent = t.neg_entropy.sum()  # Σ q log q + r log r
        if tau == 1.0:
            w = torch.cat(((1.0 - alpha * t.has).unsqueeze(1), alpha * t.q), dim=1)
            mixed = -(g * w).sum() + alpha * (ent - res)
            with torch.no_grad():  # the reported parts: forward-only, nothing for backward to do
                kl_sum = ent - (g[:, 1:] * t.q).sum() - res
        else:
            # in/out split at τ = 1, the split within S tempered (see top); t.q = Q·q̂^τ, prepared
            present = t.mask > 0
            zs = zi[:, 1:]
            log_p_in = torch.logsumexp(torch.where(present, zs, _MASKED_LOGIT), dim=1) - lse  # log P
            zt = zs / tau
            log_hat = zt - torch.logsumexp(torch.where(present, zt, _MASKED_LOGIT), dim=1, keepdim=True)
            big_q = t.q.sum(dim=1)
            xq, xr = torch.xlogy(big_q, big_q).sum(), torch.xlogy(t.r, t.r).sum()
            split = xq + xr - (big_q * log_p_in).sum() - res
            within = (ent - xr) - xq - (t.q * log_hat).sum()
            kl = split + tau**2 * within
            mixed = -(g[:, 0] * (1.0 - alpha * t.has)).sum() + alpha * kl
            kl_sum = kl.detach()
        with torch.no_grad():
            ce_sum = -g[:, 0].sum()
    return mixed, ce_sum, kl_sum


def kd_loss_prepared(logits: torch.Tensor, t: KDTargets, alpha: float,
                     chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_loss on prepared targets (the training step's path)."""
    n = logits.shape[0]
    step = n if not chunk_rows or chunk_rows <= 0 else int(chunk_rows)
    if step >= n:
        mixed, ce_sum, kl_sum = _chunk_sums(logits, t, alpha)
    else:
        # split (not slicing): autograd then concatenates the chunk gradients once instead of scattering
        # every chunk into its own full-size zero tensor
        sums = [_chunk_sums(z, tc, alpha) for z, tc in zip(logits.split(step), t.split(step))]
        mixed, ce_sum, kl_sum = (torch.stack(c).sum() for c in zip(*sums))
    denom = max(n, 1)
    return mixed / denom, ce_sum / denom, kl_sum / t.has.sum().clamp_min(1.0)


def kd_loss(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
            residual: torch.Tensor, alpha: float, temperature: float = 1.0,
            chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd), all scalars averaged over rows.

    logits [N,V] (any float dtype), targets [N] int, ids [N,k] int, probs [N,k], residual [N].
    loss = mean over rows of (1−α)·CE + α·KL for rows with a target, CE for rows without one.
    ce = mean CE over all rows; kd = mean KL over rows with a target (0 when there are none).
    """
    t = prepare_targets(targets, ids, probs, residual, temperature).to(logits.device)
    return kd_loss_prepared(logits, t, alpha, chunk_rows)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (the CE-only path; same numerics as kd_loss's CE)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.long())
