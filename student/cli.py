"""`distill train --config FILE [--section.key value ...] [--resume] [--json]`: the same entry point as
`python -m student.train`; every option the subcommand does not know is passed through as an override."""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin: on a shared CPU their spinning starved the main thread (a
# 4k-element op took 10 ms instead of 0.1 ms, and KD's small ops paid it many times per step). OpenMP reads
# this when torch loads, so it is set before any torch import; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse


class PassThroughParser(argparse.ArgumentParser):
    """Collects unknown `--key value` pairs into `overrides` instead of failing: the top-level CLI calls
    parse_args, which would otherwise reject them."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + rest
        return ns, []


def _handler(args: argparse.Namespace) -> int:
    from student.train import main

    argv = ["--config", args.config] if args.config else []
    argv += ["--resume"] if args.resume else []
    argv += ["--json"] if args.json else []
    return main(argv + list(args.overrides))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a student (CE or KD against a teacher cache)", allow_abbrev=False,
        description="Train a golf GPT student (same as python -m student.train; multi-GPU or CPU DDP: "
                    "accelerate launch -m student.train ...).",
        epilog="Overrides: any config key as --section.key value (e.g. --train.max_steps 3 "
               "--kd.alpha_schedule anneal); short forms --max-steps, --out, --seed, --teacher-cache, --kd-alpha.",
    )
    p.__class__ = PassThroughParser
    p.add_argument("--config", help="TOML run config (e.g. configs/demo_student.toml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its resume/ state")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    p.set_defaults(func=_handler, overrides=[])
