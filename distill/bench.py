"""`distill bench …` — measured comparisons. Each benchmark lives in its own module and registers a
sub-subcommand: kd (distill/bench_kd.py), overhead (distill/bench_overhead.py), pack (distill/bench_pack.py), loader
(distill/bench_loader.py), precompute (distill/bench_precompute.py), step (distill/bench_step.py)."""

from __future__ import annotations

import importlib
import json
import sys

BENCH_MODULES = [
    "distill.bench_kd",
    "distill.bench_overhead",
    "distill.bench_pack",
    "distill.bench_loader",      # distill bench loader (issue 11)
    "distill.bench_precompute",  # distill bench precompute (issue 11)
    "distill.bench_step",        # distill bench step (issue 12)
]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: KD vs CE, KD step overhead, packing")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.add_subparser(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def print_result(line: str, result: dict, as_json: bool) -> int:
    """A benchmark's ending: its one-line summary (stderr under --json, else stdout), then with --json the
    result as one JSON object, last on stdout. Returns the exit code 0."""
    print(line, file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(result))
    return 0
