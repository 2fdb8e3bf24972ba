"""`distill` — one console command for the whole pipeline.

The CLI only parses and dispatches: each stage module registers its own subcommand with
`add_parser(subparsers)` and sets `func`. A DistillError becomes one line on stderr and exit code 2.

Start-up is lazy: only the module of the subcommand being run is imported (its name is the first
non-option word of argv); the others appear in `distill --help` through their one-line help in COMMANDS.
Command modules keep torch/numpy/transformers imports inside their handlers, so `distill X --help` and
argument errors answer in a fraction of a second (tests/test_cli.py checks both properties).
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

# (subcommand, module that registers it, its one-line help: must equal the module's own; order = --help's)
COMMANDS = [
    ("data", "distill.data.cli", "download / build token shards, train a tokenizer"),
    ("teacher", "teachers.cli", "offline teacher scoring"),
    ("cache", "distill.cache_cli", "inspect teacher caches"),
    ("train", "student.cli", "train a student (CE or KD against a teacher cache)"),
    ("pack", "distill.pack_cli", "quantize a float checkpoint into one budget-checked artifact"),
    ("convert", "distill.convert",
     "another code's saved weights -> a checkpoint directory (pg-record: the 1.0611 record's GPT)"),
    ("score", "distill.score", "val_bpb of a packed artifact or checkpoint (the challenge's metric)"),
    ("export", "distill.export",
     "a packed run -> a challenge submission folder (train_gpt.py, final_model.golf, submission.json, README.md)"),
    ("bench", "distill.bench", "benchmarks: KD vs CE, KD step overhead, packing"),
    ("demo", "distill.demo", "offline end-to-end run: text → shards → teacher → KD student → artifact → bpb"),
]
COMMAND_MODULES = [module for _name, module, _help in COMMANDS]


def _import_command(module: str):
    """The command module, or None when that stage is not in this checkout."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise


def requested_command(argv: list[str]) -> str | None:
    """The subcommand argv runs: its first non-option word (the top-level parser has no option taking a
    value), or None (`distill`, `distill --help`, `distill --version`)."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None, load_all: bool = False) -> argparse.ArgumentParser:
    """The top-level parser. Only the subcommand named in `argv` gets its real sub-parser (its module is
    imported); the others are placeholders carrying their help line. `load_all` imports every module."""
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation for Parameter Golf: data, teacher precompute, train, pack, score.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = requested_command(sys.argv[1:] if argv is None else argv)
    for name, module, help_text in COMMANDS:
        if load_all or name == chosen:
            mod = _import_command(module)
            if mod is not None:
                mod.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    process_entry = argv is None
    rc = _main(sys.argv[1:] if argv is None else list(argv))
    vllm_mod = sys.modules.get("teachers.backend_vllm")
    if process_entry and vllm_mod is not None and getattr(vllm_mod, "ENGINE_STARTED", False):
        # a vLLM engine ran in this process: everything is written (caches commit atomically before here);
        # skip the interpreter teardown, where vLLM's engine threads can SIGABRT and turn success into rc -6
        vllm_mod.close_all()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)
    return rc


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
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
