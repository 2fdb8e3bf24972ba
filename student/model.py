"""The golf GPT family: the Parameter Golf baseline architecture, plus every technique of the 1.0611 record as
an option (all sizes configurable).

Baseline (the defaults; `configs/baseline_sp1024.toml` = the official train_gpt.py, 17,059,912 parameters):
GQA attention with RoPE and QK-RMSNorm (learned per-head query gain), ReLU^2 MLP, weightless RMSNorm, residual
mixing with the embedding stream x0, U-Net skips between the first and second half of the blocks, tied
embeddings, logit soft-cap.

Record options (openai/parameter-golf records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_
9HpStack_1.0611; PR numbers from its README; `configs/record_sp8192.toml` turns them all on, 35,945,671 params):
  mlp_act="leaky_relu2"   LeakyReLU(0.5)^2: negative pre-activations keep a gradient (#493)
  layer_input_scale       each block's normed inputs x 1/sqrt(i+1), i = PHYSICAL layer: deep blocks start quiet (#315)
  rope_dims               partial RoPE: rotate only the first rope_dims of each head, the rest is position-free (#315)
  xsa_last_n              XSA: remove from each head's output its component along its own value vector (#478)
  attn_gate_window        sparse output gate: head h's output x sigmoid(scale * W_h . x[:window]) (#1787)
  smear_gate_window       SmearGate: x_t += lam * sigmoid(W . x_t[:window]) * x_{t-1} on the embedding,
                          masked where token t is BOS so documents do not leak into each other (#1667 + record)
  skip_gates              U-Net skips mixed in by a learned sigmoid gate: x = lerp(w * skip, x, sigmoid(g)) (#289)
  parallel_start_layer    two-lane decoder from this layer: attention and MLP read separate lanes and write both
                          through a learned 2x2 mix; the output is the lanes' mean (#1530)
  loop_start/end/count    depth recurrence: layers loop_start..loop_end run loop_count times while
                          `GPT.looping_active` (#1344); the U-Net pairs the unrolled sequence
  init="orthogonal"       orthogonal q/k/v/MLP-in, zero output projections, as the record
  doc_attention           attention stays inside documents (they start at bos_id; cut every doc_max_len tokens),
                          derived from input_ids: the record's varlen flash-attention, as a mask here

Per-document attention runs through flex_attention on CUDA and an explicit boolean mask through SDPA elsewhere
(same maths). Grouped K/V heads go to SDPA/flex natively (enable_gqa), no K/V copies. The forward has no host
syncs, so the whole model compiles as one graph (tests/test_record_model.py checks with torch._dynamo.explain).

This file is SELF-CONTAINED (imports only torch and the standard library): `distill pack` embeds its source in
every artifact as the code that runs the weights, and its bytes count toward the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

try:  # flex_attention: the fused per-document kernel on CUDA (torch >= 2.5)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the SDPA mask path serves every device
    create_block_mask = flex_attention = None


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
    # ---- the 1.0611 record's techniques (see the module docstring); defaults = the baseline
    mlp_act: str = "relu2"  # "relu2" | "leaky_relu2"
    mlp_leaky_slope: float = 0.5  # negative slope of leaky_relu2
    layer_input_scale: bool = False  # 1/sqrt(i+1) on block i's normed inputs
    rope_dims: int = 0  # rotated dims per head; 0 = all
    xsa_last_n: int = 0  # XSA on the last N layers; 0 = off
    attn_gate_window: int = 0  # sparse attention output gate reads x[:window]; 0 = off
    attn_gate_scale: float = 1.0  # gate pre-activation scale (record: 0.5)
    smear_gate_window: int = 0  # SmearGate reads x_t[:window]; 0 = off
    skip_gates: bool = False  # sigmoid gates on the U-Net skips
    parallel_start_layer: int = 0  # two-lane decoder from this physical layer; 0 = off
    parallel_final_lane: str = "mean"  # "mean" | "attn" | "mlp": which lane feeds the final norm
    loop_start: int = 0  # first layer of the recurrent segment
    loop_end: int = 0  # last layer of the segment (inclusive)
    loop_count: int = 0  # passes through the segment while looping (record: 3); 0 = no recurrence
    init: str = "default"  # "default" (nn.Linear init, the baseline) | "orthogonal" (the record)
    doc_attention: bool = False  # attention restricted to each document
    bos_id: int = 1  # the token that starts a document (SmearGate mask, doc_attention)
    doc_max_len: int = 2048  # documents longer than this are cut into pieces for attention; 0 = never

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """ValueError (one line) for an inconsistent config; GPT() calls it."""
        L, hd = self.num_layers, self.model_dim // max(self.num_heads, 1)
        problems = []
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            problems.append("model_dim % num_heads and num_heads % num_kv_heads must be 0")
        if self.mlp_act not in ("relu2", "leaky_relu2"):
            problems.append(f"mlp_act must be relu2 or leaky_relu2, got {self.mlp_act!r}")
        if self.init not in ("default", "orthogonal"):
            problems.append(f"init must be default or orthogonal, got {self.init!r}")
        if self.parallel_final_lane not in ("mean", "attn", "mlp"):
            problems.append(f"parallel_final_lane must be mean, attn or mlp, got {self.parallel_final_lane!r}")
        if self.rope_dims < 0 or self.rope_dims % 2 or self.rope_dims > hd:
            problems.append(f"rope_dims must be even and in [0, head_dim={hd}], got {self.rope_dims}")
        for name in ("attn_gate_window", "smear_gate_window"):
            if not 0 <= getattr(self, name) <= self.model_dim:
                problems.append(f"{name} must be in [0, model_dim], got {getattr(self, name)}")
        if not 0 <= self.xsa_last_n <= L:
            problems.append(f"xsa_last_n must be in [0, num_layers], got {self.xsa_last_n}")
        if not 0 <= self.parallel_start_layer < max(L, 1):
            problems.append(f"parallel_start_layer must be in [0, num_layers), got {self.parallel_start_layer}")
        if self.loop_count < 0 or self.loop_count == 1:
            problems.append(f"loop_count must be 0 (off) or >= 2, got {self.loop_count}")
        if self.loop_count and not 0 <= self.loop_start <= self.loop_end < L:
            problems.append(f"loop layers {self.loop_start}..{self.loop_end} must lie in 0..{L - 1}")
        if self.doc_max_len < 0:
            problems.append(f"doc_max_len must be >= 0, got {self.doc_max_len}")
        if problems:
            raise ValueError("; ".join(problems))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, rot_dims: int, base: float):
        super().__init__()
        # frequencies span the rotated dims only (partial RoPE keeps the full frequency range on fewer dims)
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dims, 2, dtype=torch.float32) / rot_dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, T: int, device, dtype):
        t = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]  # (1, 1, T, rd/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def doc_segments(input_ids: torch.Tensor, bos_id: int, max_len: int) -> torch.Tensor:
    """(B, T) -> (B, T) int64: the position where each token's attention segment starts. A segment starts at
    the row start, at every BOS, and every `max_len` tokens into a document (0 = no cut); two tokens may attend
    iff their segment starts are equal. Computed on the device: no host sync, compiles."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    is_start = (input_ids == bos_id) | (pos == 0)
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=-1).values  # latest document start
    if max_len > 0:
        start = start + (pos - start) // max_len * max_len
    return start


def doc_attention_mask(seg: torch.Tensor, use_flex: bool):
    """Segment starts (B, T) -> what `attend` takes: a flex BlockMask, or a (B, 1, T, T) bool mask for SDPA."""
    B, T = seg.shape
    if use_flex:
        def same_doc_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])

        return create_block_mask(same_doc_causal, B, None, T, T, device=seg.device)
    pos = torch.arange(T, device=seg.device)
    causal = pos[:, None] >= pos[None, :]
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Causal attention, q (B, nh, T, hd), k/v (B, nkv, T, hd) with nkv | nh -> (B, nh, T, hd). `mask`: None
    (plain causal), a bool tensor (SDPA) or a flex BlockMask. Query head h reads K/V head h // (nh/nkv)."""
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive self-attention: y (B, T, nh, hd) minus its projection on the unit value vector v (B, T, nkv,
    hd) of the head's own token (grouped: query head h uses value head h // (nh/nkv))."""
    B, T, H, D = y.shape
    nkv = v.size(2)
    yg = y.reshape(B, T, nkv, H // nkv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)  # (B, T, nkv, 1, D)
    return (yg - (yg * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
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
        self.rope_dims = cfg.rope_dims or self.hd
        self.rotary = Rotary(self.rope_dims, cfg.rope_base)
        self.use_xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.gate_window, self.gate_scale = cfg.attn_gate_window, cfg.attn_gate_scale
        if self.gate_window:  # zero init: every head starts at half strength, attn_scale compensates
            self.attn_gate_w = nn.Parameter(torch.zeros(nh, self.gate_window))

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.c_k(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.c_v(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device, q.dtype)
        if self.rope_dims == self.hd:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:  # partial RoPE: the trailing dims match on content alone
            r = self.rope_dims
            q = torch.cat((apply_rotary(q[..., :r], cos, sin), q[..., r:]), dim=-1)
            k = torch.cat((apply_rotary(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = attend(q, k, v, mask).transpose(1, 2)  # (B, T, nh, hd)
        if self.use_xsa:
            y = xsa(y, v.transpose(1, 2))
        if self.gate_window:
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_window], self.attn_gate_w.to(x.dtype)))
            y = y * g[..., None]  # (B, T, nh, 1): one gate per head
        return self.proj(y.reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = nn.Linear(cfg.model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.leaky_slope = cfg.mlp_leaky_slope if cfg.mlp_act == "leaky_relu2" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.relu(h) if self.leaky_slope is None else F.leaky_relu(h, negative_slope=self.leaky_slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # learned mix of the running stream x and the embedding stream x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.in_scale = 1.0 / math.sqrt(layer + 1) if cfg.layer_input_scale else 1.0

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x)
        return x * self.in_scale if self.in_scale != 1.0 else x

    def forward(self, x: torch.Tensor, x0: torch.Tensor, mask=None) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))

    def forward_lanes(self, lane0, lane1, x0, resid, post, mask=None):
        """Two-lane form: attention reads lane0 (mixed with x0), the MLP reads lane1, in parallel; each output
        goes to both lanes by post[0] (attn -> lane0, lane1) and post[1] (mlp -> ...); resid scales each lane."""
        mix = self.resid_mix.to(lane0.dtype)
        a = self.attn_scale.to(lane0.dtype) * self.attn(self.norm(mix[0] * lane0 + mix[1] * x0), mask)
        m = self.mlp_scale.to(lane1.dtype) * self.mlp(self.norm(lane1))
        resid, post = resid.to(lane0.dtype), post.to(lane0.dtype)
        lane0 = resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m
        lane1 = resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m
        return lane0, lane1


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        L, d = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        # layer order with the loop off, and with it on (the segment unrolled loop_count times); the U-Net
        # splits each sequence in half, and its skip count comes from the longest (unrolled) sequence
        self.num_encoder = L // 2 if cfg.unet_skips else 0
        self.plain_order = (list(range(self.num_encoder)), list(range(self.num_encoder, L)))
        self.loop_order = None
        if cfg.loop_count:
            seq = list(range(cfg.loop_start)) + list(range(cfg.loop_start, cfg.loop_end + 1)) * cfg.loop_count
            seq += list(range(cfg.loop_end + 1, L))
            n_enc = len(seq) // 2 if cfg.unet_skips else 0
            self.loop_order = (seq[:n_enc], seq[n_enc:])
        # TRUE whenever a loop is configured, so eval/pack/score run the model as trained; the trainer turns
        # it off for the first part of training (a plain bool: flipping it costs one recompile)
        self.looping_active = self.loop_order is not None
        enc, dec = self.loop_order or self.plain_order
        num_skips = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, d)) if num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, d)) if num_skips and cfg.skip_gates else None
        if cfg.parallel_start_layer:  # per physical layer: lane residual scales, and the 2x2 output mix
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        if cfg.smear_gate_window:  # zero init: the smear starts switched off
            self.smear_gate = nn.Linear(cfg.smear_gate_window, 1, bias=False)
            nn.init.zeros_(self.smear_gate.weight)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
            nn.init.zeros_(self.lm_head.weight)
        if cfg.init == "orthogonal":
            for b in self.blocks:  # output projections are already zero
                for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                    nn.init.orthogonal_(lin.weight)

    def _smear(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """SmearGate: x_t += lam * sigmoid(W . x_t[:window]) * x_{t-1}, except where token t is BOS."""
        g = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, : self.config.smear_gate_window]))
        keep = (input_ids[:, 1:] != self.config.bos_id).to(x.dtype).unsqueeze(-1)
        return torch.cat((x[:, :1], x[:, 1:] + g * x[:, :-1] * keep), dim=1)

    def _skip(self, x: torch.Tensor, j: int, skip: torch.Tensor) -> torch.Tensor:
        s = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + s
        return torch.lerp(s, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))  # gate 1: keep x, 0: the skip

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, D)."""
        cfg = self.config
        x = self.tok_emb(input_ids)
        if cfg.smear_gate_window:
            x = self._smear(x, input_ids)
        x = rms_norm(x)
        x0, skips = x, []
        mask = None
        if cfg.doc_attention:
            use_flex = input_ids.is_cuda and flex_attention is not None
            mask = doc_attention_mask(doc_segments(input_ids, cfg.bos_id, cfg.doc_max_len), use_flex)
        enc, dec = self.loop_order if self.looping_active else self.plain_order
        for i in enc:
            x = self.blocks[i](x, x0, mask)
            skips.append(x)
        lanes = None
        psl = cfg.parallel_start_layer
        for j, i in enumerate(dec):
            if psl and i >= psl and lanes is None:
                lanes = (x, x)
            if skips and self.skip_weights is not None and j < self.skip_weights.size(0):
                # U-Net: decoder step j reads the mirrored encoder output (into lane 0 when split)
                if lanes is None:
                    x = self._skip(x, j, skips.pop())
                else:
                    lanes = (self._skip(lanes[0], j, skips.pop()), lanes[1])
            if lanes is None:
                x = self.blocks[i](x, x0, mask)
            else:
                lanes = self.blocks[i].forward_lanes(*lanes, x0, self.parallel_resid_lambdas[i],
                                                     self.parallel_post_lambdas[i], mask)
        if lanes is not None:
            final = cfg.parallel_final_lane
            x = lanes[0] if final == "attn" else lanes[1] if final == "mlp" else 0.5 * (lanes[0] + lanes[1])
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
