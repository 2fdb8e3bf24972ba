"""Train a golf GPT student: CE or KD against a teacher cache, Muon + Adam, wall-clock capped.

    python -m student.train --config configs/demo_student.toml [--max-steps N] [--out DIR] [--resume]
    accelerate launch --cpu --num_processes 2 -m student.train --config ... (gloo DDP on CPU)
    accelerate launch --num_processes 8 -m student.train --config configs/baseline_sp1024.toml

Overrides: `--section.key value` for any config key, plus --max-steps, --out, --seed, --teacher-cache,
--kd-alpha. The output directory is the checkpoint (model.safetensors, config.json, config.toml,
metrics.jsonl, train.png, resume/). Schedules follow openai/parameter-golf train_gpt.py: Muon momentum
warm-up 0.85 -> 0.95 over 500 steps, LR warmdown over the last `warmdown_steps` (estimated from the mean
step time under the wall-clock cap), training time excluding evaluation. The 1.0611 record's recipe is
options: warmdown over a fraction of the budget down to a floor (`warmdown_frac`, `min_lr_scale`), depth
recurrence switched on at `loop_enable_frac`, the Muon/AdamW options of student.muon.

The hot path does not wait for the device: losses stay on it and are read (one sync for all pending
steps) only when a line is logged or metrics are written; the CE loss runs inside the compiled graph.
"""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin: on a shared CPU their spinning starved the main thread (a
# 4k-element op took 10 ms instead of 0.1 ms, and KD's small ops paid it many times per step). OpenMP reads
# this when torch loads, so it is set before any torch import; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import copy
import json
import math
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.fsutil import write_text_atomic
from distill.losses import ce_loss, kd_loss_prepared, select_rows
from student.checkpoint import load_resume, rng_state, save_checkpoint, save_resume, set_rng_state
from student.config import RunConfig, load_config
from student.loader import DistributedLoader
from student.model import GPT
from student.muon import build_optimizers, matrix_modules, zeropower_via_newtonschulz5


def run_meta(cfg: RunConfig, world: int, device: torch.device) -> dict:
    """What produced this run: versions, git state, world size (the golf habit: every log says it)."""
    import accelerate

    from distill import __version__

    repo = Path(__file__).resolve().parents[1]
    git = {}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=5, check=False)
        git = {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"distill": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "world_size": world, "device": str(device), "git": git}


def _qat_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the weight fake-quantized (straight-through) while `self._qat_on`."""
    w = self.weight
    if self._qat_on:
        from distill.quant import fake_quantize

        w = fake_quantize(w, self._qat_bits, self._qat_clip)
    return F.linear(x, w.to(x.dtype), self.bias)


class TrainForward(nn.Module):
    """model(x) -> logits; with targets, the mean CE. One module, so torch.compile fuses the loss into the
    forward's graph (the float32 (tokens x vocab) logits never round-trip memory) and DDP wraps one thing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(x)
        if y is None:
            return logits
        return ce_loss(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


class Trainer:
    """One training run; `train_step()` is one optimizer step (the overhead benchmark drives it too)."""

    def __init__(self, cfg: RunConfig, accelerator=None, out_dir: str | Path | None = None,
                 resume: bool = False, log: bool = True):
        from accelerate import Accelerator

        t = cfg.train
        self.cfg = cfg
        # cpu=True also when no CUDA exists: accelerate then runs gloo DDP under a torchrun-style launcher
        # (`accelerate launch --multi_gpu --num_processes 2` or torchrun on a CPU-only machine)
        self.acc = accelerator or Accelerator(cpu=t.device == "cpu" or not torch.cuda.is_available())
        self.device = self.acc.device
        if t.device == "cuda" and self.device.type != "cuda":
            raise DistillError("train.device: cuda requested but no CUDA device is available")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.log_enabled = log and self.main
        self.out = Path(out_dir or t.out)
        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and t.bf16 else contextlib.nullcontext()
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(t.seed)  # identical init on every rank; data order comes from the loader
        np.random.seed(t.seed + self.rank)
        self.model = GPT(cfg.model).to(self.device)
        if cuda and t.bf16 and t.bf16_embed:  # the baseline's .bfloat16() leaves only the embedding in bf16
            self.model.tok_emb.weight.data = self.model.tok_emb.weight.data.bfloat16()
        # depth recurrence: a model exposing `looping_active` trains without it until loop_enable_frac
        # (True after construction only when a loop is configured; the baseline has none)
        self.looping = bool(getattr(self.model, "looping_active", False))
        if self.looping:
            self.model.looping_active = False
        self.optimizers = build_optimizers(self.model, cfg.optim, tied=cfg.model.tie_embeddings)
        self.muon = next(o for o in self.optimizers if hasattr(o, "orthogonalize"))
        # optim.muon_sharded on several ranks: no DDP; Muon reduce-scatters its own grads and the rest are
        # averaged in one packed all-reduce after backward (the record's scheme)
        self.manual_sync = cfg.optim.muon_sharded and self.world > 1
        self.replicated = [p for o in self.optimizers if o is not self.muon for g in o.param_groups
                           for p in g["params"]]
        self.ema = [p.detach().float().clone() for p in self.model.parameters()] if t.ema else None
        if t.qat:
            for m in matrix_modules(self.model):
                m._qat_on, m._qat_bits, m._qat_clip = False, t.qat_bits, t.qat_clip
                m.forward = types.MethodType(_qat_forward, m)
        self.step, self.train_ms, self.tokens = 0, 0.0, 0
        self.rows: list[dict] = []
        loader_state = None
        if resume:
            loader_state = self._load_resume()
        fwd = TrainForward(self.model)
        self.kd_fn = kd_loss_prepared
        if cuda and t.compile:
            fwd = torch.compile(fwd, dynamic=False)
            self.muon.orthogonalize = torch.compile(zeropower_via_newtonschulz5)
            # the KD loss compiled too (one graph, no breaks: tests/test_losses.py); alpha goes in as a tensor
            # so the annealed schedule does not recompile it every step
            self.kd_fn = torch.compile(kd_loss_prepared, dynamic=False)
        self.fwd = fwd if self.manual_sync else self.acc.prepare(fwd)  # DDP when world > 1

        self.local_tokens = t.batch_tokens // (self.world * t.grad_accum_steps)
        if self.local_tokens * self.world * t.grad_accum_steps != t.batch_tokens:
            raise DistillError(f"train.batch_tokens: {t.batch_tokens} is not divisible by world_size "
                               f"{self.world} x grad_accum_steps {t.grad_accum_steps}")
        self.kd_on = bool(cfg.kd.teacher_cache)
        self.loader_args = {
            "pattern": cfg.data.train_shards, "seq_len": t.seq_len, "local_tokens": self.local_tokens,
            "rank": self.rank, "world_size": self.world, "vocab_size": cfg.model.vocab_size,
            "cache_dir": cfg.kd.teacher_cache or None, "tokenizer_path": cfg.data.tokenizer or None,
            "prefetch": cfg.data.prefetch, "pin_memory": cuda, "temperature": cfg.kd.temperature,
            "top_k": cfg.kd.top_k, "target_temperature": cfg.kd.target_temperature,
            "workers": cfg.data.loader_workers or (2 if cuda else 1), "packing": cfg.data.packing,
            "bos_id": cfg.data.bos_id}
        self.loader = DistributedLoader(**self.loader_args, state=loader_state)
        self.val_tokens, self.val_bytes, self.luts = self._load_val()
        if t.compile_warmup_steps > 0 and not resume:
            self._compile_warmup(t.compile_warmup_steps)

    # ---------------------------------------------------------------------------------- setup
    def _load_val(self):
        d = self.cfg.data
        if not d.val_shards:
            return None, None, None
        from distill.shards import load_val
        from distill.tokenizer import build_luts, load_tokenizer

        if not d.tokenizer:
            raise DistillError("data.tokenizer: needed for val bpb (or set data.val_shards = \"\")")
        sp = load_tokenizer(d.tokenizer)
        if int(sp.vocab_size()) != self.cfg.model.vocab_size:
            raise DistillError(f"{d.tokenizer}: tokenizer vocab {int(sp.vocab_size())} != model.vocab_size "
                               f"{self.cfg.model.vocab_size}")
        # val_bytes: per-token ORIGINAL-text byte counts when the shards have sidecars (CaseOps), else None
        tokens, byte_counts = load_val(d.val_shards, vocab_size=self.cfg.model.vocab_size)
        return tokens, byte_counts, build_luts(sp, self.cfg.model.vocab_size)

    def _load_resume(self) -> dict:
        st = load_resume(self.out, "state")
        if st["config"]["model"] != self.cfg.to_dict()["model"]:
            raise DistillError(f"{self.out}/resume: saved model config differs from --config's [model]")
        self.model.load_state_dict(st["model"])
        for opt, sd in zip(self.optimizers, st["optimizers"], strict=True):
            opt.load_state_dict(sd)
        if self.ema is not None and st.get("ema") is not None:
            self.ema = [e.to(self.device) for e in st["ema"]]
        self.step, self.train_ms, self.tokens = st["step"], st["train_ms"], st["tokens"]
        rng = load_resume(self.out, f"rng_rank{self.rank}", required=False)
        if rng is not None:
            set_rng_state(rng)
        mpath = self.out / "metrics.jsonl"
        if mpath.is_file():
            rows = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= self.step]
        return st["loader"]

    def _compile_warmup(self, n: int) -> None:
        """Run n steps to trigger compilation, then roll weights, optimizers and data back (the baseline).
        With depth recurrence, n more steps with the loop on compile that graph too (the record)."""
        snap_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        snap_opt = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        for _ in range(n):
            self.train_step(record=False)
        if self.looping:
            self.model.looping_active = True
            for _ in range(n):
                self.train_step(record=False)
            self.model.looping_active = False
        self.model.load_state_dict(snap_model)
        for o, sd in zip(self.optimizers, snap_opt):
            o.load_state_dict(sd)
        self.step, self.train_ms, self.tokens = 0, 0.0, 0
        if self.ema is not None:
            self.ema = [p.detach().float().clone() for p in self.model.parameters()]
        self.loader.close()
        self.loader = DistributedLoader(**self.loader_args)

    # ---------------------------------------------------------------------------------- schedules
    def progress(self) -> float:
        """Fraction of the budget used: max over the step budget and the wall-clock budget."""
        t = self.cfg.train
        p = self.step / t.max_steps
        if t.max_wallclock_s > 0:
            p = max(p, self.train_ms / (1000.0 * t.max_wallclock_s))
        return min(p, 1.0)

    def lr_scale(self) -> float:
        t = self.cfg.train
        remaining = float(t.max_steps - self.step)
        if t.max_wallclock_s > 0 and self.step > 0:  # steps left at the mean step time so far
            step_ms = self.train_ms / self.step
            remaining = min(remaining, max(1000.0 * t.max_wallclock_s - self.train_ms, 0.0) / step_ms)
        total = self.step + remaining
        warmdown = t.warmdown_frac * total if t.warmdown_frac > 0 else float(t.warmdown_steps)
        # linear to 0 at the end of the budget, floored at min_lr_scale (the record's MIN_LR)
        scale = max(min(1.0, remaining / warmdown), t.min_lr_scale) if warmdown > 0 else 1.0
        if t.lr_warmup_steps > 0:
            scale *= min(1.0, (self.step + 1) / t.lr_warmup_steps)
        return max(scale, 0.0)

    def ema_decay_now(self) -> float:
        """The EMA decay of the update after step `self.step` (0-based): ema_decay, or with ema_warmup the smaller
        (1 + t) / (10 + t) early on."""
        t = self.cfg.train
        return min(t.ema_decay, (1.0 + self.step) / (10.0 + self.step)) if t.ema_warmup else t.ema_decay

    def alpha(self) -> float:
        k = self.cfg.kd
        a, p = k.alpha, self.progress()
        if "warmup" in k.alpha_schedule and k.alpha_warmup_frac > 0:
            a *= min(1.0, p / k.alpha_warmup_frac)
        start = k.alpha_anneal_end - k.alpha_anneal_frac  # the anneal runs over [start, end] of the budget
        if "anneal" in k.alpha_schedule and p > start:
            frac = min(1.0, (p - start) / k.alpha_anneal_frac) if k.alpha_anneal_frac > 0 else 1.0
            a = (1.0 - frac) * a + frac * k.alpha_final
        return a

    def _set_looping(self) -> bool:
        """Depth recurrence on once progress reaches loop_enable_frac; it then stays on (eval, saving)."""
        if self.looping and not self.model.looping_active and self.progress() >= self.cfg.train.loop_enable_frac:
            self.model.looping_active = True
        return self.looping and bool(self.model.looping_active)

    def _set_qat(self) -> bool:
        t = self.cfg.train
        on = t.qat and self.progress() >= 1.0 - t.qat_frac
        if t.qat:
            for m in matrix_modules(self.model):
                m._qat_on = on
        return on

    # ---------------------------------------------------------------------------------- the step
    def train_step(self, record: bool = True, sync: bool = True) -> dict:
        """One optimizer step. sync=False (the run loop) leaves the losses on the device as row["_sums"]
        for `_materialize`, so the host never waits; step_ms is then host time (the device may lag)."""
        t, o = self.cfg.train, self.cfg.optim
        t0 = time.perf_counter()
        scale, alpha, qat_on = self.lr_scale(), self.alpha(), self._set_qat()
        looping = self._set_looping()
        frac = min(self.step / o.muon_momentum_warmup_steps, 1.0) if o.muon_momentum_warmup_steps > 0 else 1.0
        for g in self.muon.param_groups:
            g["momentum"] = (1 - frac) * o.muon_momentum_warmup_start + frac * o.muon_momentum
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        sums = torch.zeros(3, device=self.device)  # loss, ce, kd
        for micro in range(t.grad_accum_steps):
            batch = self.loader.next_batch().to(self.device)
            last = micro == t.grad_accum_steps - 1
            quiet = contextlib.nullcontext() if last or self.manual_sync else self.acc.no_sync(self.fwd)
            with quiet, self.autocast:
                if self.kd_on:
                    logits = self.fwd(batch.x).reshape(-1, self.cfg.model.vocab_size)
                    a = torch.full((), alpha, device=self.device) if self.kd_fn is not kd_loss_prepared else alpha
                    kt = batch.kd if self.cfg.kd.select_frac >= 1.0 else select_rows(batch.kd, self.cfg.kd.select_frac)
                    loss, ce, kd = self.kd_fn(logits, kt, a, self.cfg.kd.chunk_rows or None)
                else:
                    loss = ce = self.fwd(batch.x, batch.y)
                    kd = torch.zeros((), device=self.device)
                self.acc.backward(loss / t.grad_accum_steps)
            sums += torch.stack([loss.detach(), ce.detach(), kd.detach()]).float()
        if t.grad_clip_norm > 0:  # manual sync: each rank clips its own grads before averaging (the record)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip_norm)
        if self.manual_sync:
            self._average_replicated_grads()
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            params = [p.detach().float() for p in self.model.parameters()]
            torch._foreach_lerp_(self.ema, params, 1.0 - self.ema_decay_now())
        sums = (sums / t.grad_accum_steps).detach()
        if sync:
            sums = sums.cpu()  # waits for the device: step_ms is the real step time
        step_ms = 1000.0 * (time.perf_counter() - t0)
        self.step += 1
        self.tokens += t.batch_tokens
        self.train_ms += self._agree_max(step_ms)  # every rank stops (and schedules) on the same clock
        row = {"step": self.step, "loss": None, "step_ms": step_ms, "tokens": self.tokens,
               "lr": o.matrix_lr * scale, "lr_scale": scale, "elapsed_s": self.train_ms / 1000.0, "_sums": sums}
        if self.kd_on:
            row.update(ce=None, kd=None, alpha=alpha)
        if qat_on:
            row["qat"] = True
        if looping:
            row["looping"] = True
        if record:
            self.rows.append(row)
        if sync or not record:
            self._materialize([row])
        return row

    def _materialize(self, rows: list[dict] | None = None) -> None:
        """Device-side losses -> floats in their rows: one host sync for every pending step."""
        pending = [r for r in (self.rows if rows is None else rows) if "_sums" in r]
        if not pending:
            return
        vals = torch.stack([r.pop("_sums") for r in pending]).tolist()
        for r, v in zip(pending, vals, strict=True):
            r["loss"] = v[0]
            if "ce" in r:
                r["ce"], r["kd"] = v[1], v[2]

    def _average_replicated_grads(self) -> None:
        """Mean of the non-Muon grads over ranks, one all-reduce per dtype (Muon reduces its own)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.replicated:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, f in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(f.view_as(g))

    def _agree_max(self, x: float) -> float:
        if self.world > 1 and dist.is_initialized():
            tx = torch.tensor([x], dtype=torch.float64, device=self.device)
            dist.all_reduce(tx, op=dist.ReduceOp.MAX)
            return float(tx.item())
        return x

    # ---------------------------------------------------------------------------------- eval + save
    def saved_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: EMA when enabled, else the live weights (float32, CPU)."""
        names = [n for n, _ in self.model.named_parameters()]
        state = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            state.update({n: e.detach().cpu().clone() for n, e in zip(names, self.ema)})
        return state

    def evaluate(self, state: dict[str, torch.Tensor] | None = None) -> dict | None:
        """Val bpb, windows split across ranks (non-overlapping windows) and summed in float64."""
        if self.val_tokens is None:
            return None
        from distill.metric import evaluate_bpb, window_plan

        e, L = self.cfg.eval, self.cfg.train.seq_len
        model = self.model
        if state is not None:
            model = GPT(self.cfg.model).to(self.device)
            model.load_state_dict(state)
        stride = e.val_stride or None
        n_win = len(window_plan(len(self.val_tokens), L, stride))
        if e.val_max_windows > 0:
            n_win = min(n_win, e.val_max_windows)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll, tokens, bytes
        split = stride is None or stride == L
        lo, hi = (n_win * self.rank // self.world, n_win * (self.rank + 1) // self.world) if split else (0, n_win)
        if hi > lo and (split or self.main):
            toks = self.val_tokens[lo * L : hi * L + 1] if split else self.val_tokens
            nb = self.val_bytes
            if nb is not None and split:
                nb = nb[lo * L : hi * L + 1]
            with self.autocast:
                r = evaluate_bpb(model, toks, self.luts, L, stride=stride, batch_size=e.val_batch_size,
                                 device=self.device, max_windows=None if split else n_win, byte_counts=nb)
            sums += torch.tensor([r["val_loss"] * r["tokens"], r["tokens"], r["bytes"]], dtype=torch.float64,
                                 device=self.device)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        nll, n_tok, n_bytes = sums.tolist()
        return {"val_loss": nll / n_tok, "val_bpb": nll / (math.log(2) * n_bytes), "val_tokens": int(n_tok)}

    def save(self, final: bool = False) -> None:
        cfg_dict = self.cfg.to_dict()
        if self.main:
            cfg_dict["meta"] = run_meta(self.cfg, self.world, self.device)
            save_checkpoint(self.out, self.model, cfg_dict, state=self.saved_state())
            save_resume(self.out, "state", {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizers": [o.state_dict() for o in self.optimizers],
                "ema": None if self.ema is None else [e.cpu() for e in self.ema],
                "loader": self.loader.state, "step": self.step, "train_ms": self.train_ms,
                "tokens": self.tokens, "config": self.cfg.to_dict()})
            self.write_metrics()
            if final and self.cfg.train.plot:
                from student.plot import plot_metrics

                plot_metrics(self.rows, self.out / "train.png", title=str(self.out.name))
        save_resume(self.out, f"rng_rank{self.rank}", rng_state())
        self.acc.wait_for_everyone()

    def write_metrics(self) -> None:
        self._materialize()
        if self.main:
            write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        if not self.log_enabled:
            return
        self._materialize()
        keys = ["step", "loss", "ce", "kd", "alpha", "lr_scale", "step_ms", "tokens", "elapsed_s",
                "val_loss", "val_bpb"]
        parts = []
        for k in keys:
            if k in row:
                v = row[k]
                v = f"{v}/{self.cfg.train.max_steps}" if k == "step" else (f"{v:.4f}" if isinstance(v, float) else v)
                parts.append(f"{k}:{v}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        t, e = self.cfg.train, self.cfg.eval
        cap_ms = 1000.0 * t.max_wallclock_s if t.max_wallclock_s > 0 else math.inf
        last_flush = time.perf_counter()
        while self.step < t.max_steps and self.train_ms < cap_ms:
            row = self.train_step(sync=False)
            if e.val_every > 0 and self.step % e.val_every == 0 and self.step < t.max_steps:
                row.update(self.evaluate() or {})
            if t.log_every > 0 and (self.step % t.log_every == 0 or "val_bpb" in row):
                self.log(row)
            if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0:
                self.save()
            elif time.perf_counter() - last_flush > 10.0:
                self.write_metrics()
                last_flush = time.perf_counter()
        self.loader.close()
        summary = {"steps": self.step, "tokens": self.tokens, "train_s": self.train_ms / 1000.0,
                   "stopped_by": "wallclock" if self.train_ms >= cap_ms else "max_steps"}
        if e.final_eval:
            res = self.evaluate(self.saved_state())
            if res is not None:
                summary.update(res)
                if self.rows:
                    self.rows[-1].update(res)
                    self.log(self.rows[-1])
        self.save(final=True)
        summary["out"] = str(self.out)
        return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="student.train", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--config", help="TOML run config (defaults: the challenge baseline)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its resume/ state")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.run()
    if trainer.main:
        print(json.dumps(summary) if args.json else
              f"done: {summary['steps']} steps, {summary['train_s']:.1f}s"
              + (f", val_bpb {summary['val_bpb']:.4f}" if "val_bpb" in summary else "") + f" -> {summary['out']}")
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    """`python -m student.train`: a DistillError is one line on stderr and exit code 2."""
    try:
        return main(argv)
    except DistillError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli_main())
