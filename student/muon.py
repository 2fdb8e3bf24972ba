"""Muon for 2-D block matrices + Adam for the rest, with the challenge baseline's parameter split.

Muon (Keller Jordan; modded-nanogpt; openai/parameter-golf train_gpt.py): SGD momentum (nesterov) whose
update is orthogonalised by 5 Newton–Schulz iterations of the quintic (3.4445, −4.7750, 2.0315), scaled by
sqrt(max(1, rows/cols)). Under DDP the gradients are already averaged; each rank orthogonalises every
world_size-th matrix and one all-reduce of the flat updates shares the results (the baseline's scheme).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# the baseline keeps these tensors on Adam even when they are 2-D (resid_mix is 2 x d)
CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (U V^T of its SVD, singular values pushed near 1).

    bf16 on CUDA (tensor cores, as the baseline); float32 elsewhere (CPU bf16 matmuls are slow)."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95, backend_steps: int = 5,
                 nesterov: bool = True):
        super().__init__(params, {"lr": lr, "momentum": momentum, "backend_steps": backend_steps, "nesterov": nesterov})
        self.orthogonalize = zeropower_via_newtonschulz5  # train.py may swap in a torch.compile'd one

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
            params = group["params"]
            if not params:
                continue
            dev = params[0].device
            # gloo has no bf16 all-reduce on every build; float32 off-GPU costs little at CPU sizes
            flat_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            flat = torch.zeros(sum(p.numel() for p in params), device=dev, dtype=flat_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=group["momentum"])
                    u = self.orthogonalize(g, steps=group["backend_steps"])
                    u = u * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = u.reshape(-1).to(flat_dtype)
                offset += p.numel()
            if distributed and world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
        return loss


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The baseline's split: block matrices -> Muon; block vectors/control tensors + U-Net skip weights ->
    scalar Adam; token embedding -> embed Adam; untied lm_head -> head Adam."""
    matrix, scalar = [], []
    for name, p in model.blocks.named_parameters():
        if p.ndim == 2 and not any(pat in name for pat in CONTROL_PATTERNS):
            matrix.append(p)
        else:
            scalar.append(p)
    if getattr(model, "skip_weights", None) is not None:
        scalar.append(model.skip_weights)
    groups = {"embed": [model.tok_emb.weight], "matrix": matrix, "scalar": scalar}
    if getattr(model, "lm_head", None) is not None:
        groups["head"] = [model.lm_head.weight]
    return groups


def build_optimizers(model: nn.Module, optim_cfg, tied: bool) -> list[torch.optim.Optimizer]:
    """[embed Adam, (head Adam), Muon, scalar Adam]; every param group carries its `base_lr`."""
    groups = split_params(model)
    o = optim_cfg
    fused = next(model.parameters()).is_cuda  # fused Adam is a CUDA kernel

    def adam(params, lr):
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}], betas=(o.beta1, o.beta2),
                                eps=o.adam_eps, fused=fused or None)

    opts = [adam(groups["embed"], o.tied_embed_lr if tied else o.embed_lr)]
    if "head" in groups:
        opts.append(adam(groups["head"], o.head_lr))
    muon = Muon(groups["matrix"], lr=o.matrix_lr, momentum=o.muon_momentum, backend_steps=o.muon_backend_steps,
                nesterov=o.muon_nesterov)
    for g in muon.param_groups:
        g["base_lr"] = o.matrix_lr
    opts.append(muon)
    if groups["scalar"]:
        opts.append(adam(groups["scalar"], o.scalar_lr))
    return opts


def matrix_modules(model: nn.Module) -> list[nn.Linear]:
    """The nn.Linear modules whose weights Muon trains (the late-QAT targets)."""
    return [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
