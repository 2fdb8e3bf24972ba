"""`distill` — one console command for the whole pipeline.

The CLI only parses and dispatches: each stage module registers its own subcommand with
`add_parser(subparsers)` and sets `func`. A DistillError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os

# OpenMP threads that spin after each op starve the main thread on small, shared CPUs; set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import sys

from distill import __version__
from distill.errors import DistillError

# module -> registers one top-level subcommand (order = order in --help)
COMMAND_MODULES = [
    "distill.data.cli",      # distill data download|tokenizer|build
    "teachers.cli",          # distill teacher precompute
    "distill.cache_cli",     # distill cache info
    "student.cli",           # distill train
    "distill.pack",          # distill pack
    "distill.score",         # distill score
    "distill.bench",         # distill bench kd|overhead|pack
    "distill.demo",          # distill demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation for Parameter Golf: data, teacher precompute, train, pack, score.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + ".")):
                continue  # stage not built in this checkout
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        rc = args.func(args)
    except DistillError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
