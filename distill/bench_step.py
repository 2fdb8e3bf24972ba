"""`distill bench step`: training step time of several run configs at the SAME tokens per step.

    distill bench step --config configs/baseline_sp1024.toml --config configs/record_sp8192.toml
        [--batch-tokens 8192] [--seq-len 2048] [--steps 6] [--warmup 2] [--json]

Each config builds its own Trainer (its model, optimisers, compile and bf16 settings on the device at hand)
on synthetic shards of its own vocabulary (uniform random ids with a BOS every ~1,000 tokens, so per-document
attention and BOS packing see documents); only train.batch_tokens / seq_len are overridden, so every config
processes the same tokens per step. The trainers step in turn (the order rotates every step), so a shared
machine's load hits all alike. A config with depth recurrence is measured twice: loop off (the start of
training) and loop on (from loop_enable_frac on, and at eval). Reported: median step_ms after the warm-up,
tokens/s, parameters, and each entry's ratio to the first.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see distill/bench_overhead.py

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from distill.bench import print_result
from distill.errors import DistillError
from student.cli import PassThroughParser

SYNTH_TOKENS = 200_000
MEAN_DOC_TOKENS = 1000


def _synthetic_shard(folder: Path, vocab_size: int, bos_id: int, seed: int) -> str:
    import numpy as np

    from distill.shards import write_shard

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab_size, SYNTH_TOKENS).astype(np.int64)
    toks[toks == bos_id] = (bos_id + 1) % vocab_size
    starts = np.cumsum(rng.integers(MEAN_DOC_TOKENS // 2, 3 * MEAN_DOC_TOKENS // 2, SYNTH_TOKENS // 200))
    toks[0] = bos_id
    toks[starts[starts < SYNTH_TOKENS]] = bos_id
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "fineweb_train_000000.bin", toks)
    return str(folder / "fineweb_train_*.bin")


def measure_steps(configs: list[str], batch_tokens: int, seq_len: int, steps: int = 6, warmup: int = 2,
                  overrides: list[str] | None = None, progress: bool = True) -> dict:
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    from student.config import load_config
    from student.train import Trainer

    if steps <= 0 or warmup < 0 or not configs:
        raise DistillError(f"bench step: need --config, steps > 0 and warmup >= 0, got {steps}/{warmup}")
    entries: list[tuple[str, Trainer, bool | None]] = []
    acc = None
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        for i, path in enumerate(configs):
            if not Path(path).is_file():
                raise DistillError(f"{path}: config not found")
            cfg = load_config(path, overrides)
            t = cfg.train
            t.batch_tokens, t.seq_len, t.grad_accum_steps = batch_tokens, seq_len, 1
            t.max_steps, t.max_wallclock_s, t.compile_warmup_steps = 10**9, 0.0, 0
            t.checkpoint_every, t.plot, t.log_every = 0, False, 0
            cfg.eval.final_eval, cfg.eval.val_every = False, 0
            cfg.kd.teacher_cache, cfg.data.val_shards, cfg.data.tokenizer = "", "", ""
            cfg.optim.muon_sharded = False  # one process
            cfg.data.train_shards = _synthetic_shard(Path(tmp) / f"data{i}", cfg.model.vocab_size,
                                                     cfg.data.bos_id, seed=i)
            if acc is None:
                acc = Accelerator(cpu=t.device == "cpu" or not torch.cuda.is_available())
            tr = Trainer(cfg, acc, out_dir=f"{tmp}/run{i}", log=False)
            label = Path(path).stem
            if tr.looping:
                entries += [(f"{label} (loop off)", tr, False), (f"{label} (loop on)", tr, True)]
            else:
                entries.append((label, tr, None))
        times: list[list[float]] = [[] for _ in entries]
        for s in tqdm(range(steps + warmup), desc="bench step", unit="round", file=sys.stderr,
                      disable=not (progress and acc.is_main_process)):
            k = s % len(entries)
            for j in list(range(k, len(entries))) + list(range(k)):  # rotate the order every round
                _, tr, loop = entries[j]
                if loop is not None:
                    tr.model.looping_active = loop
                times[j].append(tr.train_step()["step_ms"])
        for _, tr, _ in entries:
            tr.loader.close()
    out = []
    for (label, tr, loop), ts in zip(entries, times):
        ms = statistics.median(ts[warmup:])
        out.append({"label": label, "step_ms_median": ms, "tokens_per_s": batch_tokens / ms * 1000.0,
                    "params": tr.model.num_params(), "loop": loop, "step_ms": ts})
    for e in out:
        e["ratio_to_first"] = e["step_ms_median"] / out[0]["step_ms_median"]
    return {"configs": configs, "batch_tokens": batch_tokens, "seq_len": seq_len, "steps": steps, "warmup": warmup,
            "device": str(acc.device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "entries": out}


def _handler(args: argparse.Namespace) -> int:
    res = measure_steps(args.config, args.batch_tokens, args.seq_len, args.steps, args.warmup, args.overrides)
    line = "\n".join(f"{e['label']:<32} {e['step_ms_median']:10.1f} ms/step  {e['tokens_per_s']:10.0f} tok/s  "
                     f"{e['params']:>11,} params  x{e['ratio_to_first']:.2f}" for e in res["entries"])
    return print_result(line, res, args.json)


def add_subparser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("step", help="training step time of run configs at the same tokens per step",
                                    description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                    epilog="Any other --section.key value overrides every config (e.g. "
                                           "--model.num_layers 2 for a quick look).")
    p.__class__ = PassThroughParser
    p.add_argument("--config", action="append", required=True, help="run config (TOML); repeat to compare")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step for every config (default 8192)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for every config (default 2048)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per entry (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured first steps per entry (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last on stdout)")
    p.set_defaults(func=_handler, overrides=[])
