"""Muon for 2-D block matrices + Adam(W) for the rest, with the challenge baseline's parameter split.

Muon (Keller Jordan; modded-nanogpt; openai/parameter-golf train_gpt.py): SGD momentum (nesterov) whose
update is orthogonalised by 5 Newton–Schulz iterations, scaled by sqrt(max(1, rows/cols)). Defaults are the
baseline's: the fixed quintic (3.4445, −4.7750, 2.0315), no weight decay; under DDP the gradients are
already averaged, each rank orthogonalises every world_size-th matrix and one all-reduce of the flat
updates shares the results.

Options the 1.0611 record uses (each off by default):
- `coeffs="polar_express"`: a different (a, b, c) per iteration, minimax-optimal for pushing singular values
  to 1 (Amsel et al. 2025, "The Polar Express"; modded-nanogpt). Tighter than the fixed quintic in 5 steps.
- `row_normalize`: each row of the momentum update is scaled to unit L2 norm before orthogonalising, so no
  row (output unit) dominates the Frobenius normalisation inside Newton–Schulz.
- `weight_decay`: decoupled, p <- p * (1 - lr * wd) before the update (lr = the scheduled lr).
- `sharded`: the record's communication scheme. Matrices of one shape form a stack; the stack's gradients
  are reduce-scattered (mean) so each rank holds 1/world of them, the rank keeps momentum for its slice only,
  orthogonalises it in one batched call, and an all-gather brings every update back. Gradients must NOT be
  averaged beforehand (the trainer skips DDP for them in this mode).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distill.errors import DistillError

# the baseline keeps these tensors on Adam even when they are 2-D (resid_mix is 2 x d)
CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
# Wider net for the record's small tensors (skip gates, attention output gates, the smear gate and its
# lambda, parallel-lane mixes): gates read a handful of dims and lambdas are per-channel mixes, so none is
# a matrix Muon should orthogonalise. A name containing any of these goes to the scalar Adam group.
SCALAR_PATTERNS = CONTROL_PATTERNS + ("gate", "lambda", "smear", "lane", "mix", "scale", "skip")

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express per-iteration coefficients for 5 steps (modded-nanogpt; parameter-golf PR #1344)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each Newton–Schulz iteration; Polar Express repeats its last (converged) tuple."""
    if kind == "quintic":
        return (NS_COEFFS,) * steps
    if kind == "polar_express":
        pe = POLAR_EXPRESS_COEFFS
        return tuple(pe[min(i, len(pe) - 1)] for i in range(steps))
    raise DistillError(f"optim.muon_coeffs: must be quintic or polar_express, got {kind!r}")


def zeropower_via_newtonschulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                coeffs: tuple | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix, or each matrix of a (n, rows, cols) stack (U V^T of its SVD,
    singular values pushed near 1).

    bf16 on CUDA (tensor cores, as the baseline); float32 elsewhere (CPU bf16 matmuls are slow)."""
    coeffs = coeffs or (NS_COEFFS,) * steps
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / ((x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)) + eps)
    transposed = g.size(-2) > g.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    for a, b, c in coeffs:
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.mT if transposed else x


def _row_normalize(u: torch.Tensor) -> torch.Tensor:
    return u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95, backend_steps: int = 5,
                 nesterov: bool = True, weight_decay: float = 0.0, row_normalize: bool = False,
                 coeffs: str = "quintic", sharded: bool = False):
        ns_coefficients(coeffs, backend_steps)  # validate early
        super().__init__(params, {"lr": lr, "momentum": momentum, "backend_steps": backend_steps,
                                  "nesterov": nesterov, "weight_decay": weight_decay,
                                  "row_normalize": row_normalize, "coeffs": coeffs})
        self.sharded = sharded
        self.orthogonalize = zeropower_via_newtonschulz5  # train.py may swap in a torch.compile'd one

    def _update(self, g: torch.Tensor, buf: torch.Tensor, group: dict) -> torch.Tensor:
        """Momentum (in place on buf) -> nesterov -> optional row-normalise -> orthogonalise."""
        buf.mul_(group["momentum"]).add_(g)
        u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if group["row_normalize"]:
            u = _row_normalize(u)
        return self.orthogonalize(u, steps=group["backend_steps"],
                                  coeffs=ns_coefficients(group["coeffs"], group["backend_steps"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            if not group["params"]:
                continue
            if self.sharded and world > 1:
                self._step_sharded(group, world, rank)
            else:
                self._step_replicated(group, world, rank, distributed)
        return loss

    def _step_replicated(self, group: dict, world: int, rank: int, distributed: bool) -> None:
        """The baseline's scheme: averaged grads everywhere, round-robin orthogonalisation, one all-reduce."""
        params = group["params"]
        dev = params[0].device
        # gloo has no bf16 all-reduce on every build; float32 off-GPU costs little at CPU sizes
        flat_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        flat = torch.zeros(sum(p.numel() for p in params), device=dev, dtype=flat_dtype)
        offset = 0
        for i, p in enumerate(params):
            if i % world == rank and p.grad is not None:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                u = self._update(p.grad, state["momentum_buffer"], group)
                u = u * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                flat[offset : offset + p.numel()] = u.reshape(-1).to(flat_dtype)
            offset += p.numel()
        if distributed and world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        lr, wd = group["lr"], group["weight_decay"]
        offset = 0
        for p in params:
            if wd > 0:
                p.mul_(1.0 - lr * wd)
            p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-lr)
            offset += p.numel()

    def _step_sharded(self, group: dict, world: int, rank: int) -> None:
        """Reduce-scatter each same-shape stack of grads, orthogonalise the local slice, all-gather."""
        stacks: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is not None:
                stacks.setdefault(tuple(p.shape), []).append(p)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        pending = []  # every reduce-scatter is in flight before the first orthogonalisation
        for shape, ps in stacks.items():
            comm = torch.bfloat16 if ps[0].is_cuda else torch.float32  # as the record: bf16 wire on GPU
            n_pad = -(-len(ps) // world) * world
            full = torch.zeros(n_pad, *shape, device=ps[0].device, dtype=comm)
            full[: len(ps)] = torch.stack([p.grad for p in ps]).to(comm)
            shard = torch.empty(n_pad // world, *shape, device=ps[0].device, dtype=comm)
            pending.append((ps, full, shard, reduce_scatter(shard, full, op=dist.ReduceOp.AVG, async_op=True)))
        gathers = []
        for ps, full, shard, work in pending:
            work.wait()
            state = self.state[ps[0]]  # the stack's slice momentum lives with its first matrix
            if "shard_momentum" not in state:
                state["shard_momentum"] = torch.zeros_like(shard)
            u = self._update(shard, state["shard_momentum"], group).to(full.dtype).contiguous()
            gathers.append((ps, full, all_gather(full, u, async_op=True)))
        lr, wd = group["lr"], group["weight_decay"]
        for ps, full, work in gathers:
            work.wait()
            scale = max(1.0, ps[0].size(-2) / ps[0].size(-1)) ** 0.5
            for p, u in zip(ps, full):
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr * scale)


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Optimizer groups by name and shape. token embedding -> "embed"; untied lm_head -> "head"; a tensor
    of 2+ dims whose name matches no SCALAR_PATTERNS -> "matrix" (Muon); everything else (vectors, scalars,
    gates, mixes, skip weights) -> "scalar" (Adam). Block parameters come first, in module order, so the
    baseline's groups (and hence its numerics) are unchanged."""
    special = {id(model.tok_emb.weight)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        special.add(id(head.weight))
    in_blocks = {id(p) for p in model.blocks.parameters()}
    named = [(n, p) for n, p in model.blocks.named_parameters()]
    named += [(n, p) for n, p in model.named_parameters() if id(p) not in in_blocks and id(p) not in special]
    matrix, scalar = [], []
    for name, p in named:
        is_matrix = p.ndim >= 2 and not any(pat in name for pat in SCALAR_PATTERNS)
        (matrix if is_matrix else scalar).append(p)
    groups = {"embed": [model.tok_emb.weight], "matrix": matrix, "scalar": scalar}
    if head is not None:
        groups["head"] = [head.weight]
    return groups


def build_optimizers(model: nn.Module, optim_cfg, tied: bool) -> list[torch.optim.Optimizer]:
    """[embed Adam, (head Adam), Muon, scalar Adam]; every param group carries its `base_lr`. A group with
    weight decay > 0 uses AdamW (decoupled decay, as the record); with 0 it is the baseline's plain Adam."""
    groups = split_params(model)
    o = optim_cfg
    fused = next(model.parameters()).is_cuda  # fused Adam is a CUDA kernel

    def adam(params, lr, wd=0.0):
        cls, extra = (torch.optim.AdamW, {"weight_decay": wd}) if wd > 0 else (torch.optim.Adam, {})
        return cls([{"params": params, "lr": lr, "base_lr": lr}], betas=(o.beta1, o.beta2),
                   eps=o.adam_eps, fused=fused or None, **extra)

    opts = [adam(groups["embed"], o.tied_embed_lr if tied else o.embed_lr, o.embed_wd)]
    if "head" in groups:
        opts.append(adam(groups["head"], o.head_lr))
    muon = Muon(groups["matrix"], lr=o.matrix_lr, momentum=o.muon_momentum, backend_steps=o.muon_backend_steps,
                nesterov=o.muon_nesterov, weight_decay=o.muon_wd, row_normalize=o.muon_row_normalize,
                coeffs=o.muon_coeffs, sharded=o.muon_sharded)
    for g in muon.param_groups:
        g["base_lr"] = o.matrix_lr
    opts.append(muon)
    if groups["scalar"]:
        opts.append(adam(groups["scalar"], o.scalar_lr, o.scalar_wd))
    return opts


def matrix_modules(model: nn.Module) -> list[nn.Linear]:
    """The nn.Linear modules whose weights Muon trains (the late-QAT targets; gates stay float)."""
    muon = {id(p) for p in split_params(model)["matrix"]}
    return [m for m in model.blocks.modules() if isinstance(m, nn.Linear) and id(m.weight) in muon]
