"""The 1.0611 record's techniques as student/model.py options, each checked against an independent reference.

The reference below (`ref_logits`) is written from the techniques' definitions, one token / head / document at
a time in float64, sharing no code with student/model.py; every option is compared with it alone and all
together. Plus: the record config's parameter count, the baseline's unchanged parameters, per-document
attention == each document run alone, the flex-attention path == the SDPA mask path, and zero graph breaks.

Run: python -m pytest -q tests/test_record_model.py      (~30 s on one core)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from student.config import load_config
from student.model import GPT, ModelConfig, doc_attention_mask, doc_segments

REPO = Path(__file__).resolve().parents[1]
BOS = 1

# a record-shaped model, tiny: 5 layers x 32, 4 query / 2 KV heads of 8, every technique on
TINY_RECORD = dict(
    vocab_size=61, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4.0, qk_gain_init=5.0,
    mlp_act="leaky_relu2", layer_input_scale=True, rope_dims=4, xsa_last_n=5, attn_gate_window=6,
    attn_gate_scale=0.5, smear_gate_window=6, skip_gates=True, parallel_start_layer=3, loop_start=1, loop_end=2,
    loop_count=3, init="orthogonal", doc_attention=True, doc_max_len=8,
)
BASE_TINY = dict(vocab_size=61, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)
OPTIONS = {  # each technique alone, on top of the tiny baseline
    "leaky_relu2": dict(mlp_act="leaky_relu2"),
    "layer_input_scale": dict(layer_input_scale=True),
    "partial_rope": dict(rope_dims=4),
    "xsa": dict(xsa_last_n=2),
    "attn_gate": dict(attn_gate_window=6, attn_gate_scale=0.5),
    "smear_gate": dict(smear_gate_window=6),
    "skip_gates": dict(skip_gates=True),
    "parallel_lanes": dict(parallel_start_layer=3),
    "parallel_lanes_attn": dict(parallel_start_layer=2, parallel_final_lane="attn"),
    "recurrence": dict(loop_start=1, loop_end=2, loop_count=3),
    "doc_attention": dict(doc_attention=True, doc_max_len=8),
    "untied_no_unet": dict(tie_embeddings=False, unet_skips=False, mlp_act="leaky_relu2"),
    "all": TINY_RECORD,
}


# ------------------------------------------------------------------------------ the independent reference


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + torch.finfo(v.dtype).eps)


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def ref_segments(ids: list[int], max_len: int) -> list[int]:
    """Per token: where its attention segment starts (document start at row start / BOS, cut every max_len)."""
    out, doc = [], 0
    for t, tok in enumerate(ids):
        if t == 0 or tok == BOS:
            doc = t
        out.append(doc + ((t - doc) // max_len) * max_len if max_len else doc)
    return out


def ref_layer_order(c: ModelConfig, looping: bool) -> tuple[list[int], list[int]]:
    seq = list(range(c.num_layers))
    if looping and c.loop_count:
        seg = list(range(c.loop_start, c.loop_end + 1))
        seq = list(range(c.loop_start)) + seg * c.loop_count + list(range(c.loop_end + 1, c.num_layers))
    half = len(seq) // 2 if c.unet_skips else 0
    return seq[:half], seq[half:]


def ref_rope(v: torch.Tensor, pos: int, c: ModelConfig) -> torch.Tensor:
    """Rotate pairs (j, j + r/2) of the first r dims by pos * base^(-2j/r)."""
    hd = c.model_dim // c.num_heads
    r = c.rope_dims or hd
    out = v.clone()
    for j in range(r // 2):
        a = pos * c.rope_base ** (-2.0 * j / r)
        x1, x2 = v[j], v[j + r // 2]
        out[j] = x1 * math.cos(a) + x2 * math.sin(a)
        out[j + r // 2] = -x1 * math.sin(a) + x2 * math.cos(a)
    return out


def ref_attention(sd, c: ModelConfig, i: int, x: torch.Tensor, seg: list[int]) -> torch.Tensor:
    """Block i's attention on one row x (T, D), head by head and query by query."""
    T, D = x.shape
    H, KV = c.num_heads, c.num_kv_heads
    hd = D // H
    q_all = x @ sd[f"blocks.{i}.attn.c_q.weight"].T
    k_all = x @ sd[f"blocks.{i}.attn.c_k.weight"].T
    v_all = x @ sd[f"blocks.{i}.attn.c_v.weight"].T
    heads = []
    for h in range(H):
        g = h // (H // KV)  # the K/V head this query head shares
        q = [ref_rope(_rms(q_all[t, h * hd:(h + 1) * hd]), t, c) * sd[f"blocks.{i}.attn.q_gain"][h] for t in range(T)]
        k = [ref_rope(_rms(k_all[t, g * hd:(g + 1) * hd]), t, c) for t in range(T)]
        v = [v_all[t, g * hd:(g + 1) * hd] for t in range(T)]
        rows = []
        for t in range(T):
            keys = [s for s in range(t + 1) if not c.doc_attention or seg[s] == seg[t]]
            w = torch.softmax(torch.stack([q[t] @ k[s] for s in keys]) / math.sqrt(hd), 0)
            y = sum(w[n] * v[s] for n, s in enumerate(keys))
            if i >= c.num_layers - c.xsa_last_n:  # drop the component along the token's own value direction
                u = v[t] / v[t].norm()
                y = y - (y @ u) * u
            if c.attn_gate_window:
                y = y * _sig(c.attn_gate_scale * (sd[f"blocks.{i}.attn.attn_gate_w"][h] @ x[t, :c.attn_gate_window]))
            rows.append(y)
        heads.append(torch.stack(rows))
    return torch.cat(heads, dim=1) @ sd[f"blocks.{i}.attn.proj.weight"].T


def ref_mlp(sd, c: ModelConfig, i: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ sd[f"blocks.{i}.mlp.fc.weight"].T
    h = torch.where(h > 0, h, h * (c.mlp_leaky_slope if c.mlp_act == "leaky_relu2" else 0.0))
    return (h * h) @ sd[f"blocks.{i}.mlp.proj.weight"].T


def ref_row(sd, c: ModelConfig, ids: list[int], looping: bool) -> torch.Tensor:
    T = len(ids)
    emb = sd["tok_emb.weight"][ids]
    x = emb.clone()
    if c.smear_gate_window:  # x_t += lam * sigmoid(w . e_t[:W]) * e_{t-1}, not into a BOS
        for t in range(1, T):
            if ids[t] != BOS:
                gate = sd["smear_lambda"][0] * _sig(sd["smear_gate.weight"][0] @ emb[t, :c.smear_gate_window])
                x[t] = emb[t] + gate * emb[t - 1]
    x = _rms(x)
    x0 = x
    seg = ref_segments(ids, c.doc_max_len)
    enc, dec = ref_layer_order(c, looping)

    def norm_in(i, v):
        return _rms(v) * (1 / math.sqrt(i + 1) if c.layer_input_scale else 1.0)

    def skip_into(v, j, s):
        w = sd["skip_weights"][j] * s
        if not c.skip_gates:
            return v + w
        g = _sig(sd["skip_gates"][j])
        return g * v + (1 - g) * w

    skips = []
    for i in enc:
        mix = sd[f"blocks.{i}.resid_mix"]
        x = mix[0] * x + mix[1] * x0
        x = x + sd[f"blocks.{i}.attn_scale"] * ref_attention(sd, c, i, norm_in(i, x), seg)
        x = x + sd[f"blocks.{i}.mlp_scale"] * ref_mlp(sd, c, i, norm_in(i, x))
        skips.append(x)
    lane_a = lane_m = None
    for j, i in enumerate(dec):
        parallel = c.parallel_start_layer and i >= c.parallel_start_layer
        if parallel and lane_a is None:
            lane_a = lane_m = x
        if skips and j < sd["skip_weights"].shape[0]:
            if parallel:
                lane_a = skip_into(lane_a, j, skips.pop())
            else:
                x = skip_into(x, j, skips.pop())
        mix = sd[f"blocks.{i}.resid_mix"]
        if not parallel:
            x = mix[0] * x + mix[1] * x0
            x = x + sd[f"blocks.{i}.attn_scale"] * ref_attention(sd, c, i, norm_in(i, x), seg)
            x = x + sd[f"blocks.{i}.mlp_scale"] * ref_mlp(sd, c, i, norm_in(i, x))
            continue
        a = sd[f"blocks.{i}.attn_scale"] * ref_attention(sd, c, i, norm_in(i, mix[0] * lane_a + mix[1] * x0), seg)
        m = sd[f"blocks.{i}.mlp_scale"] * ref_mlp(sd, c, i, norm_in(i, lane_m))
        r, p = sd["parallel_resid_lambdas"][i], sd["parallel_post_lambdas"][i]  # p[source][destination lane]
        lane_a, lane_m = (r[0] * lane_a + p[0][0] * a + p[1][0] * m, r[1] * lane_m + p[0][1] * a + p[1][1] * m)
    if lane_a is not None:
        x = {"attn": lane_a, "mlp": lane_m}.get(c.parallel_final_lane, (lane_a + lane_m) / 2)
    logits = _rms(x) @ sd["tok_emb.weight" if c.tie_embeddings else "lm_head.weight"].T
    return c.logit_softcap * torch.tanh(logits / c.logit_softcap)


def ref_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() for k, v in model.state_dict().items()}
    return torch.stack([ref_row(sd, model.config, row.tolist(), model.looping_active) for row in ids])


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    """The model with every tensor perturbed (many start at 0 or 1, which would hide a wrong formula)."""
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 or p.shape[0] <= 8 else 0.1))
    return m


def packed_ids(seed: int = 0, T: int = 24) -> torch.Tensor:
    """Two rows packing several documents: one row starts mid-document, one holds a document > doc_max_len."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 61, (2, T), generator=g)
    ids[0, [5, 9, 10]] = BOS
    ids[1, [0, 13]] = BOS
    return ids


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_matches_reference(name):
    kw = OPTIONS[name]
    cfg = ModelConfig(**{**BASE_TINY, **kw}) if name != "all" else ModelConfig(**kw)
    m = randomized(cfg).double()
    ids = packed_ids()
    with torch.no_grad():
        got = m(ids)
    want = ref_logits(m, ids)
    assert torch.allclose(got.double(), want, atol=2e-6, rtol=0), (got.double() - want).abs().max()
    if cfg.loop_count:  # the loop switch: off runs each layer once, and still matches the reference
        m.looping_active = False
        with torch.no_grad():
            off = m(ids)
        assert torch.allclose(off.double(), ref_logits(m, ids), atol=2e-6, rtol=0)
        assert not torch.allclose(off, got, atol=1e-3)


def test_record_config_parameter_count_and_layout():
    cfg = load_config(REPO / "configs" / "record_sp8192.toml")
    m = GPT(cfg.model)
    assert m.num_params() == 35_945_671
    assert m.looping_active is True  # eval/pack/score run the saved model as the record evaluates it
    sd = m.state_dict()
    assert sd["skip_weights"].shape == sd["skip_gates"].shape == (8, 512)  # 17 unrolled layers: 8 + 9
    assert sd["blocks.0.attn.attn_gate_w"].shape == (8, 12) and sd["smear_gate.weight"].shape == (1, 12)
    assert sd["parallel_post_lambdas"].shape == (11, 2, 2) and sd["parallel_resid_lambdas"].shape == (11, 2)
    # orthogonal init: q rows orthonormal; output projections zero; q gain 5
    q = sd["blocks.4.attn.c_q.weight"]
    assert torch.allclose(q @ q.T, torch.eye(512), atol=1e-4)
    assert not sd["blocks.4.attn.proj.weight"].any() and not sd["blocks.4.mlp.proj.weight"].any()
    assert torch.equal(sd["blocks.0.attn.q_gain"], torch.full((8,), 5.0))
    assert m.loop_order == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])


def test_baseline_config_is_unchanged():
    """The defaults add nothing: the official baseline's 17,059,912 parameters under the official names."""
    m = GPT(load_config(REPO / "configs" / "baseline_sp1024.toml").model)
    assert m.num_params() == 17_059_912 and not m.looping_active
    per_block = ["attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight", "attn.c_k.weight",
                 "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"]
    want = {"tok_emb.weight", "skip_weights"} | {f"blocks.{i}.{n}" for i in range(9) for n in per_block}
    assert set(m.state_dict()) == want
    d = ModelConfig()
    assert (d.mlp_act, d.rope_dims, d.xsa_last_n, d.attn_gate_window, d.smear_gate_window, d.loop_count,
            d.parallel_start_layer, d.skip_gates, d.layer_input_scale, d.doc_attention, d.init) == \
           ("relu2", 0, 0, 0, 0, 0, 0, False, False, False, "default")


def test_doc_segments_match_a_scan():
    ids = packed_ids(T=40)
    ids[1, 13] = 7  # row 1: one 40-token document, cut every 8
    for max_len in (0, 8, 16):
        got = doc_segments(ids, BOS, max_len)
        want = torch.tensor([ref_segments(r.tolist(), max_len) for r in ids])
        assert torch.equal(got, want), max_len


def test_doc_attention_equals_each_document_alone():
    """A packed row's logits = each document's logits when it runs alone (BOS-masked smear included)."""
    cfg = ModelConfig(**{**TINY_RECORD, "doc_max_len": 0})
    m = randomized(cfg, seed=1)
    T = 30
    ids = torch.randint(2, 61, (1, T), generator=torch.Generator().manual_seed(2))
    starts = [0, 7, 8, 19]
    ids[0, starts] = BOS
    with torch.no_grad():
        packed = m(ids)[0]
        for a, b in zip(starts, starts[1:] + [T]):
            alone = m(ids[:, a:b])[0]
            assert torch.allclose(packed[a:b], alone, atol=2e-5, rtol=0), (a, (packed[a:b] - alone).abs().max())
    # and a long document cut every doc_max_len: each piece attends only within itself
    cut = ModelConfig(**{**BASE_TINY, "doc_attention": True, "doc_max_len": 8})
    m2 = randomized(cut, seed=3)
    one_doc = torch.randint(2, 61, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = m2(one_doc)[0]
        for a in (0, 8, 16):
            assert torch.allclose(whole[a:a + 8], m2(one_doc[:, a:a + 8])[0], atol=2e-5, rtol=0)


def test_flex_attention_path_equals_sdpa_mask():
    """The CUDA kernel path (flex_attention + block mask), run eagerly on CPU, = the boolean SDPA mask."""
    from student.model import attend, flex_attention

    if flex_attention is None:
        pytest.skip("this torch has no flex_attention")
    g = torch.Generator().manual_seed(0)
    ids = packed_ids(T=40)
    seg = doc_segments(ids, BOS, 16)
    q, k, v = (torch.randn(2, n, 40, 8, generator=g) for n in (4, 2, 2))
    dense = attend(q, k, v, doc_attention_mask(seg, use_flex=False))
    flex = attend(q, k, v, doc_attention_mask(seg, use_flex=True))
    assert torch.allclose(dense, flex, atol=1e-5, rtol=0)

    def flex_path(ids, q, k, v):  # what the compiled CUDA forward traces: block mask + kernel, one graph
        return attend(q, k, v, doc_attention_mask(doc_segments(ids, BOS, 16), use_flex=True)).sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(flex_path)(ids, q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("looping", [True, False])
def test_record_forward_and_loss_compile_without_graph_breaks(looping):
    torch._dynamo.reset()
    m = GPT(ModelConfig(**TINY_RECORD))
    m.looping_active = looping
    ids = packed_ids()

    def loss_fn(x, y):
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten())

    explained = torch._dynamo.explain(loss_fn)(ids, ids.roll(-1, 1))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_config_validation_is_one_line():
    for bad in (dict(mlp_act="gelu"), dict(rope_dims=5), dict(loop_count=1), dict(loop_count=3, loop_end=9),
                dict(parallel_start_layer=9), dict(init="xavier"), dict(xsa_last_n=10)):
        with pytest.raises(ValueError) as e:
            GPT(ModelConfig(**{**BASE_TINY, **bad}))
        assert "\n" not in str(e.value)
