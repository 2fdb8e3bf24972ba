"""The distillation loss: (1−α)·CE(y) + α·KL(q ‖ p_S) over k_s stored ids + one residual bucket.

Targets come from the teacher cache (distill/cache.py), one row per predicted token: `ids [N,k]` student
ids, `probs [N,k]` the teacher's probabilities at those ids and `residual [N]` = 1 − Σ probs (the mass the
cache did not keep). The student side is folded into the same k+1 buckets: its probabilities gathered at
the stored ids, plus a residual bucket p_res = 1 − Σ gathered. Keeping the residual bucket (instead of
renormalising the top-k) keeps the target unbiased (Sparse Logit Sampling, ACL 2025).

- float32 math whatever the logits' dtype; the student's log-sum-exp is computed once and shared by CE
  and the gathered log-probabilities.
- Rows without a target (probs sum 0; the cache writes residual 1) contribute CE only.
- Slots with probability 0 (padding in rows with fewer than k candidates) are ignored on both sides, so a
  repeated padding id cannot double-count student mass.
- Rows are processed in chunks of `chunk_rows`, so the float32 upcast of the logits is bounded to
  [chunk_rows, V] at a time (bf16 logits on GPU) — results equal the unchunked computation.

Temperature τ on TRUNCATED targets (our choice, documented): the stored top-k mass (1 − r) is tempered
within itself, q_j(τ) = (1 − r) · q_j^{1/τ} / Σ_i q_i^{1/τ}, and the residual bucket keeps its untempered mass
r. Tempering the bucket as if it were one token (r^{1/τ}) would be wrong: the tempered mass of a tail
depends on how the tail is spread, which the cache does not know. The student uses softmax(z/τ) with its
own residual bucket, and the KL is multiplied by τ² (Hinton et al.) so gradient scale does not depend on τ.
τ = 1 (the default) is exactly the plain k+1-bucket KL.
"""

from __future__ import annotations

import torch

RESIDUAL_EPS = 1e-6  # floor for the student's residual bucket: 1 − Σ p cancels in float32 near 1


def _chunk_terms(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                 residual: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE [n], KL [n] and has-target mask [n] (float32) for one chunk of rows."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (n,) shared by CE and, at τ = 1, by the KL's gathered log-probs
    ce = lse - z.gather(1, targets.long().unsqueeze(1)).squeeze(1)

    q = probs.float()
    r = residual.float()
    present = q > 0  # padding / underflowed slots are not part of the target
    has_target = present.any(dim=1)
    ids = ids.long()
    if temperature == 1.0:
        logp = z.gather(1, ids) - lse.unsqueeze(1)  # (n, k) student log-probs at the stored ids
    else:
        zt = z / temperature
        logp = zt.gather(1, ids) - torch.logsumexp(zt, dim=-1, keepdim=True)
        top_mass = q.sum(dim=1, keepdim=True)
        qt = torch.where(present, q, torch.ones_like(q)).pow(1.0 / temperature) * present
        q = qt / qt.sum(dim=1, keepdim=True).clamp_min(1e-30) * top_mass
    p = logp.exp() * present
    p_res = (1.0 - p.sum(dim=1)).clamp_min(RESIDUAL_EPS)
    # KL(q ‖ p) = Σ q (log q − log p) over the kept slots + r (log r − log p_res); xlogy makes 0·log 0 = 0
    kl_top = (torch.xlogy(q, q) - q * torch.where(present, logp, torch.zeros_like(logp))).sum(dim=1)
    kl_res = torch.xlogy(r, r) - r * p_res.log()
    kl = (kl_top + kl_res) * (temperature**2)
    return ce, torch.where(has_target, kl, torch.zeros_like(kl)), has_target.float()


def kd_loss(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
            residual: torch.Tensor, alpha: float, temperature: float = 1.0,
            chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd), all scalars averaged over rows.

    logits [N,V] (any float dtype), targets [N] int, ids [N,k] int, probs [N,k], residual [N].
    loss = mean over rows of (1−α)·CE + α·KL for rows with a target, CE for rows without one.
    ce = mean CE over all rows; kd = mean KL over rows with a target (0 when there are none).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = logits.shape[0]
    step = n if not chunk_rows or chunk_rows <= 0 else int(chunk_rows)
    ce_sum = kl_sum = mixed_sum = logits.new_zeros((), dtype=torch.float32)
    n_target = 0.0
    for s in range(0, n, step):
        e = min(s + step, n)
        ce, kl, has = _chunk_terms(logits[s:e], targets[s:e], ids[s:e], probs[s:e], residual[s:e], temperature)
        ce_sum = ce_sum + ce.sum()
        kl_sum = kl_sum + kl.sum()
        # rows without a target: pure CE (their kl is 0, and their CE weight stays 1)
        mixed_sum = mixed_sum + (ce * (1.0 - alpha * has) + alpha * kl).sum()
        n_target = n_target + has.sum()
    denom = max(n, 1)
    kd = kl_sum / n_target.clamp_min(1.0) if torch.is_tensor(n_target) else kl_sum
    return mixed_sum / denom, ce_sum / denom, kd


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (the CE-only path; same numerics as kd_loss's CE)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.long())
