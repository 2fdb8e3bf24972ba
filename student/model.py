"""The golf GPT family: the Parameter Golf baseline architecture, all sizes configurable.

GQA attention with RoPE and QK-RMSNorm (learned per-head query gain), ReLU^2 MLP, weightless RMSNorm,
residual mixing with the embedding stream x0, optional U-Net skips between the first and second half of
the blocks, tied embeddings, logit soft-cap.

This file is SELF-CONTAINED (imports only torch and the standard library): `distill pack` embeds its
source in every artifact as the code that runs the weights, and its bytes count toward the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    unet_skips: bool = True
    tied_embed_init_std: float = 0.005

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, T: int, device, dtype):
        t = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]  # (1, 1, T, hd/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, nh, nkv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        assert d % nh == 0 and nh % nkv == 0, "model_dim % num_heads and num_heads % num_kv_heads must be 0"
        self.nh, self.nkv, self.hd = nh, nkv, d // nh
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, nkv * self.hd, bias=False)
        self.c_v = nn.Linear(d, nkv * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity
        self.q_gain = nn.Parameter(torch.full((nh,), cfg.qk_gain_init))
        self.rotary = Rotary(self.hd, cfg.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.c_k(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.c_v(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        if self.nkv != self.nh:  # GQA: share each K/V head across nh/nkv query heads
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = nn.Linear(cfg.model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # learned mix of the running stream x and the embedding stream x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.num_encoder = cfg.num_layers // 2 if cfg.unet_skips else 0
        num_skips = min(self.num_encoder, cfg.num_layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim)) if num_skips else None
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
            nn.init.zeros_(self.lm_head.weight)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, D)."""
        x = rms_norm(self.tok_emb(input_ids))
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            if i < self.num_encoder:
                x = block(x, x0)
                skips.append(x)
            else:
                if skips:  # U-Net: decoder block j reads the mirrored encoder output
                    j = i - self.num_encoder
                    x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
                x = block(x, x0)
        return rms_norm(x)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, w.to(h.dtype)).float()
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c and c > 0 else logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, V) float32."""
        return self.logits_from_hidden(self.hidden(input_ids))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: dict) -> GPT:
    """Entry point used by packed artifacts: a model from its config dict."""
    return GPT(ModelConfig.from_dict(config))


if __name__ == "__main__":  # tiny self-check: shapes and parameter count of the baseline
    m = GPT(ModelConfig())
    print(m.num_params(), m(torch.zeros(1, 8, dtype=torch.long)).shape)
