"""`distill bench overhead`: what distilling costs per step, KD vs plain CE on the same batches.

    distill bench overhead --config configs/demo_student.toml --teacher-cache DIR [--steps 40] [--warmup 5]
        [--json] [--section.key value ...]

Two trainers are built from the same config and seed (same init, same data order); one reads the teacher
cache and uses the KD loss, the other uses CE. They step alternately (the order flips every step), so
both see the same machine load — on a shared machine, back-to-back runs would mostly measure the
neighbours. Reported: median step_ms of each after `--warmup` steps, and their ratio (target <= 1.05).
"""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin: on a shared CPU their spinning starved the main thread (a
# 4k-element op took 10 ms instead of 0.1 ms, and KD's small ops paid it many times per step). OpenMP reads
# this when torch loads, so it is set before any torch import; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import statistics
import sys
import tempfile

from distill.bench import print_result
from distill.errors import DistillError
from student.cli import PassThroughParser


def measure_overhead(config: str, teacher_cache: str, steps: int = 40, warmup: int = 5,
                     overrides: list[str] | None = None, progress: bool = True) -> dict:
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    from student.config import load_config
    from student.train import Trainer

    if steps <= 0 or warmup < 0:
        raise DistillError(f"--steps/--warmup: need steps > 0 and warmup >= 0, got {steps}/{warmup}")
    base = load_config(config, overrides)
    t = base.train
    t.max_steps, t.max_wallclock_s, t.compile_warmup_steps = steps + warmup, 0.0, 0
    t.checkpoint_every, t.plot, t.log_every = 0, False, 0
    base.eval.final_eval, base.eval.val_every = False, 0
    base.data.val_shards = ""  # no val set needed: nothing is evaluated
    cfg_ce, cfg_kd = copy.deepcopy(base), copy.deepcopy(base)
    cfg_ce.kd.teacher_cache = ""
    cfg_kd.kd.teacher_cache = teacher_cache
    acc = Accelerator(cpu=t.device == "cpu" or not torch.cuda.is_available())
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        trainers = {"ce": Trainer(cfg_ce, acc, out_dir=f"{tmp}/ce", log=False),
                    "kd": Trainer(cfg_kd, acc, out_dir=f"{tmp}/kd", log=False)}
        times: dict[str, list[float]] = {"ce": [], "kd": []}
        order = ["ce", "kd"]
        for i in tqdm(range(steps + warmup), desc="bench overhead", unit="step", file=sys.stderr,
                      disable=not (progress and acc.is_main_process)):
            for name in order if i % 2 == 0 else order[::-1]:
                times[name].append(trainers[name].train_step()["step_ms"])
        for tr in trainers.values():
            tr.loader.close()
    ce_ms = statistics.median(times["ce"][warmup:])
    kd_ms = statistics.median(times["kd"][warmup:])
    return {"config": str(config), "teacher_cache": str(teacher_cache), "steps": steps, "warmup": warmup,
            "batch_tokens": t.batch_tokens, "alpha": cfg_kd.kd.alpha, "ce_step_ms_median": ce_ms,
            "kd_step_ms_median": kd_ms, "ratio": kd_ms / ce_ms, "ce_step_ms": times["ce"],
            "kd_step_ms": times["kd"], "world_size": acc.num_processes, "device": str(acc.device)}


def _handler(args: argparse.Namespace) -> int:
    res = measure_overhead(args.config, args.teacher_cache, args.steps, args.warmup, args.overrides)
    line = (f"KD {res['kd_step_ms_median']:.1f} ms/step vs CE {res['ce_step_ms_median']:.1f} ms/step "
            f"(median of {res['steps']} after {res['warmup']} warm-up): ratio {res['ratio']:.3f}")
    return print_result(line, res, args.json)


def add_subparser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "overhead", help="median step time of KD vs CE training on the same batches", allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Any other --section.key value is a config override (e.g. --data.train_shards GLOB).")
    p.__class__ = PassThroughParser
    p.add_argument("--config", required=True, help="student run config (TOML)")
    p.add_argument("--teacher-cache", required=True, help="teacher cache directory for the KD side")
    p.add_argument("--steps", type=int, default=40, help="measured steps per side (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured first steps per side (default 5)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last on stdout)")
    p.set_defaults(func=_handler, overrides=[])
