"""The 1.0611 record's optimiser and schedule as options: Muon (Polar Express, row-normalised, weight decay)
and AdamW against independent float64 references written here, the parameter split, the wall-clock LR
schedule (flat, linear, floor), the depth-recurrence switch, grad clipping and EMA in the trainer.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/test_record_optim.py   (~20 s, no shared data)
"""

from __future__ import annotations

import types
import typing

import numpy as np
import pytest
import torch

from distill.shards import write_shard
from student.config import OptimConfig, load_config
from student.model import GPT, ModelConfig
from student.muon import Muon, build_optimizers, ns_coefficients, split_params, zeropower_via_newtonschulz5

# Polar Express (a, b, c) per Newton–Schulz iteration, as published (modded-nanogpt / parameter-golf #1344)
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
RECORD_OPTIM = {"tied_embed_lr": 0.03, "matrix_lr": 0.026, "scalar_lr": 0.02, "beta2": 0.99, "muon_momentum": 0.97,
                "muon_coeffs": "polar_express", "muon_row_normalize": True, "muon_wd": 0.095, "embed_wd": 0.085,
                "scalar_wd": 0.02}


# ------------------------------------------------------------------------------ independent references
def ref_muon(w: torch.Tensor, grads: list[torch.Tensor], lr: float, mom: float, wd: float, coeffs,
             row_norm: bool) -> torch.Tensor:
    """Nesterov momentum -> unit rows -> Frobenius-normalise -> NS iterations -> shape scale, decoupled wd."""
    w, buf = w.double(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = mom * buf + g
        u = g + mom * buf
        if row_norm:
            u = u / u.norm(dim=1, keepdim=True)
        tall = u.shape[0] > u.shape[1]
        x = (u.T if tall else u) / u.norm()
        for a, b, c in coeffs:
            gram = x @ x.T
            x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
        x = x.T if tall else x
        w = w * (1 - lr * wd) - lr * max(1.0, w.shape[0] / w.shape[1]) ** 0.5 * x
    return w


def ref_adamw(w: torch.Tensor, grads: list[torch.Tensor], lr: float, b1: float, b2: float, eps: float,
              wd: float) -> torch.Tensor:
    w = w.double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


# ------------------------------------------------------------------------------ Muon + AdamW
def test_polar_express_coefficients_and_tighter_orthogonalisation():
    assert ns_coefficients("polar_express", 5) == tuple(PE)
    assert ns_coefficients("polar_express", 7)[5:] == (tuple(PE[-1]),) * 2  # past 5: the converged tuple
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    dev = {k: (torch.linalg.svdvals(zeropower_via_newtonschulz5(g, 5, coeffs=ns_coefficients(k, 5))) - 1).abs().max()
           for k in ("quintic", "polar_express")}
    assert dev["polar_express"] < 0.15 and dev["quintic"] > 0.3
    stack = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(1))  # batched == one by one
    pe = ns_coefficients("polar_express", 5)
    one = torch.stack([zeropower_via_newtonschulz5(m, 5, coeffs=pe) for m in stack])
    torch.testing.assert_close(zeropower_via_newtonschulz5(stack, 5, coeffs=pe), one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(48, 16), (16, 40)])
def test_muon_record_options_two_steps_match_reference(shape):
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(*shape, generator=gen) * 0.1
    grads = [torch.randn(*shape, generator=gen) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.026, momentum=0.97, weight_decay=0.095, row_normalize=True, coeffs="polar_express")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = ref_muon(w0, grads, 0.026, 0.97, 0.095, PE, row_norm=True)
    assert (p.detach().double() - ref).abs().max() < 2e-6
    assert (ref - w0.double()).abs().max() > 1e-2  # the step moved the weights far beyond the tolerance


def test_muon_defaults_are_the_baseline_quintic():
    gen = torch.Generator().manual_seed(3)
    w0, g = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.04, momentum=0.95)
    p.grad = g
    opt.step()
    ref = ref_muon(w0, [g], 0.04, 0.95, 0.0, [(3.4445, -4.7750, 2.0315)] * 5, row_norm=False)
    assert (p.detach().double() - ref).abs().max() < 2e-6


def test_record_split_and_one_step_of_every_group_matches_references():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    # a stand-in for the record's extra small tensors (gates, lambdas) at the root and in a block
    model.smear_gate = torch.nn.Parameter(torch.randn(1, 12))
    model.blocks[0].attn_gate_w = torch.nn.Parameter(torch.randn(2, 12))
    groups = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["embed"]] == ["tok_emb.weight"]
    assert all(p.ndim == 2 and min(p.shape) >= 16 for p in groups["matrix"]) and len(groups["matrix"]) == 12
    assert {"smear_gate", "blocks.0.attn_gate_w", "skip_weights", "blocks.0.resid_mix"} <= {
        names[id(p)] for p in groups["scalar"]}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))

    o = OptimConfig(**RECORD_OPTIM)
    opts = build_optimizers(model, o, tied=True)
    assert [type(x).__name__ for x in opts] == ["AdamW", "Muon", "AdamW"]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    for x in opts:
        x.step()
    group_of = {id(p): k for k, ps in groups.items() for p in ps}
    for n, p in model.named_parameters():
        k = group_of[id(p)]
        if k == "matrix":
            ref = ref_muon(w0[n], [grads[n]], o.matrix_lr, o.muon_momentum, o.muon_wd, PE, row_norm=True)
        else:
            lr, wd = (o.tied_embed_lr, o.embed_wd) if k == "embed" else (o.scalar_lr, o.scalar_wd)
            ref = ref_adamw(w0[n], [grads[n]], lr, o.beta1, o.beta2, o.adam_eps, wd)
        assert (p.detach().double() - ref).abs().max() < 2e-6, n


# ------------------------------------------------------------------------------ schedule
def _sched(overrides: list[str], step: int, train_ms: float) -> float:
    from student.train import Trainer

    cfg = load_config(None, overrides)
    return Trainer.lr_scale(types.SimpleNamespace(cfg=cfg, step=step, train_ms=train_ms))


@pytest.mark.parametrize("frac", [0.05, 0.15, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_wallclock_schedule_flat_linear_floor(frac):
    """The record: lr x 1 until 15 % of the wall clock, then (1 - frac) / 0.85, never below 0.1."""
    rec = ["--train.warmdown_frac", "0.85", "--train.min_lr_scale", "0.1", "--train.max_wallclock_s", "600",
           "--train.max_steps", "20000"]
    want = 1.0 if frac <= 0.15 else max((1 - frac) / 0.85, 0.1)
    assert _sched(rec, step=1000, train_ms=frac * 600_000) == pytest.approx(want, abs=1e-9)
    # with no wall-clock cap the fraction is step / max_steps
    steps = ["--train.warmdown_frac", "0.85", "--train.min_lr_scale", "0.1", "--train.max_wallclock_s", "0",
             "--train.max_steps", "1000"]
    assert _sched(steps, step=round(frac * 1000), train_ms=1.0) == pytest.approx(
        1.0 if round(frac * 1000) <= 150 else max((1 - round(frac * 1000) / 1000) / 0.85, 0.1), abs=1e-9)


def test_baseline_schedule_has_no_floor():
    base = ["--train.max_steps", "1000", "--train.max_wallclock_s", "0"]  # warmdown_steps 1200 > budget
    assert _sched(base, step=999, train_ms=1.0) == pytest.approx(1 / 1200)
    assert _sched(base, step=1000, train_ms=1.0) == 0.0


# ------------------------------------------------------------------------------ trainer: loop, clip, EMA
class LoopGPT(GPT):
    """Stand-in for a recurrent model: `looping_active` (True after construction), each forward logged."""

    seen: typing.ClassVar[list[bool]] = []

    def __init__(self, cfg):
        super().__init__(cfg)
        self.looping_active = True

    def forward(self, input_ids):
        LoopGPT.seen.append(bool(self.looping_active))
        flag, self.looping_active = self.looping_active, False  # no real loop configured: run the plain order
        try:
            return super().forward(input_ids)
        finally:
            self.looping_active = flag


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_shard(d / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 64, 40_000).astype(np.uint16))
    return d


def _trainer(shards, tmp_path, *extra: str, model_cls=GPT, monkeypatch=None):
    import student.train as st

    if monkeypatch is not None:
        monkeypatch.setattr(st, "GPT", model_cls)
    cfg = load_config(None, [
        "--model.vocab_size", "64", "--model.num_layers", "2", "--model.model_dim", "32", "--model.num_heads", "2",
        "--model.num_kv_heads", "1", "--train.batch_tokens", "256", "--train.seq_len", "32",
        "--train.max_wallclock_s", "0", "--train.warmdown_steps", "0", "--data.train_shards",
        f"{shards}/fineweb_train_*.bin", "--data.val_shards", "", "--data.tokenizer", "", "--eval.final_eval",
        "false", "--train.plot", "false", "--train.device", "cpu", *extra])
    return st.Trainer(cfg, out_dir=tmp_path / "run", log=False)


def test_recurrence_off_until_loop_enable_frac_then_stays_on(shards, tmp_path, monkeypatch):
    LoopGPT.seen = []
    tr = _trainer(shards, tmp_path, "--train.max_steps", "10", "--train.loop_enable_frac", "0.35",
                  "--train.compile_warmup_steps", "2", model_cls=LoopGPT, monkeypatch=monkeypatch)
    assert LoopGPT.seen == [False, False, True, True]  # compile warm-up: n steps plain, n with the loop
    assert tr.model.looping_active is False and tr.step == 0  # ... then rolled back, loop off
    LoopGPT.seen = []
    tr.run()
    # progress = step / 10 before each step: steps 0..3 (< 0.35) plain, from step 4 (0.4) on with the loop
    assert LoopGPT.seen == [False] * 4 + [True] * 6
    assert [bool(r.get("looping")) for r in tr.rows] == [False] * 4 + [True] * 6
    assert tr.model.looping_active is True  # kept on for evaluation and saving
    assert all(isinstance(r["loss"], float) for r in tr.rows)  # device-side losses read back for the log


def test_grad_clip_scales_the_global_norm(shards, tmp_path):
    seen = {}
    for clip in (0.0, 0.3):
        torch.manual_seed(0)
        tr = _trainer(shards, tmp_path / str(clip), "--train.max_steps", "2", "--train.grad_clip_norm", str(clip))
        opt = tr.optimizers[0]
        step = opt.step

        def spy(*a, _tr=tr, _step=step, _clip=clip, **k):
            seen[_clip] = [p.grad.detach().clone() for p in _tr.model.parameters()]
            return _step(*a, **k)

        opt.step = spy
        tr.train_step()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0.0]]))
    assert norm > 0.3  # the clip binds
    for raw, clipped in zip(seen[0.0], seen[0.3], strict=True):
        torch.testing.assert_close(clipped, raw * (0.3 / norm), atol=1e-7, rtol=1e-5)


def test_ema_is_the_records_decay_average_of_live_weights(shards, tmp_path):
    d = 0.9965
    tr = _trainer(shards, tmp_path, "--train.max_steps", "3", "--train.ema", "true", "--train.ema_decay", str(d))
    ref = [p.detach().double().clone() for p in tr.model.parameters()]
    for _ in range(3):
        tr.train_step()
        ref = [d * e + (1 - d) * p.detach().double() for e, p in zip(ref, tr.model.parameters(), strict=True)]
    for e, r in zip(tr.ema, ref, strict=True):
        assert (e.double() - r).abs().max() < 1e-6
    saved = tr.saved_state()
    names = [n for n, _ in tr.model.named_parameters()]
    assert torch.equal(saved[names[0]], tr.ema[0])


def test_ema_warmup_uses_the_smaller_early_decay_and_forgets_the_init(shards, tmp_path):
    """ema_warmup: update t (0-based) uses min(decay, (1 + t) / (10 + t)) -- recomputed here in float64."""
    d = 0.997
    tr = _trainer(shards, tmp_path, "--train.max_steps", "5", "--train.ema", "true", "--train.ema_decay", str(d),
                  "--train.ema_warmup", "true")
    ref = [p.detach().double().clone() for p in tr.model.parameters()]
    for t in range(5):
        tr.train_step()
        dt = min(d, (1 + t) / (10 + t))
        ref = [dt * e + (1 - dt) * p.detach().double() for e, p in zip(ref, tr.model.parameters(), strict=True)]
    for e, r in zip(tr.ema, ref, strict=True):
        assert (e.double() - r).abs().max() < 1e-6
    assert tr.ema_decay_now() == pytest.approx(6 / 15)  # after 5 steps: (1 + 5) / (10 + 5) < 0.997


# ------------------------------------------------------------------------------ the fast step
def test_ce_loss_inside_one_graph_and_no_host_read(shards, tmp_path):
    from distill.losses import ce_loss
    from student.train import TrainForward

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    fwd = TrainForward(model)
    explained = torch._dynamo.explain(fwd)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1  # forward + CE: one graph
    assert torch.equal(fwd(x, y), ce_loss(model(x).reshape(-1, 64), y.reshape(-1)))

    tr = _trainer(shards, tmp_path, "--train.max_steps", "3")
    row = tr.train_step(sync=False)  # the run loop's step: the loss stays a device tensor until logged
    assert row["loss"] is None and isinstance(row["_sums"], torch.Tensor)
    tr.write_metrics()
    assert isinstance(row["loss"], float) and "_sums" not in row
