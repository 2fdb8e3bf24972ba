"""`distill pack` command line: argument parsing and the report line. The packer itself (distill/pack.py,
torch and numpy) is imported only when a command runs, so `distill pack --help` answers at once."""

from __future__ import annotations

import argparse
import json
import sys

from distill.bundle import SCRIPT_NAME
from distill.pack_defaults import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_MIN_QUANT_NUMEL,
    DEFAULT_RD_LAMBDA_FISHER,
    DEFAULT_RD_LAMBDA_NSR,
    RD_DISTORTIONS,
)


def parse_bits(text: str) -> int | str:
    if text == "auto":
        return "auto"
    if text in ("8", "6", "5", "4"):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 8, 6, 5, 4 or auto, got {text!r}")


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=parse_bits, default=8,
                   help="bits of the block matrices: 8|6|5|4, or auto = highest that fits --budget (default 8)")
    p.add_argument("--method", choices=["auto", "rtn", "gptq"], default="auto",
                   help="quantizer; auto (default) = gptq below 8 bits when TRAINING tokens are at hand (--calib, "
                        "else the checkpoint's config data.train_shards), rtn otherwise")
    p.add_argument("--calib", help="glob of TRAINING token shards for GPTQ calibration")
    p.add_argument("--calib-tokens", type=int, default=262_144, help="calibration tokens (default 262144)")
    p.add_argument("--calib-seconds", type=float, default=60.0,
                   help="time limit of the calibration pass in seconds (default 60)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="calibration window length (default: the checkpoint's train.seq_len, else 1024)")
    p.add_argument("--embed-bits", type=int, choices=[8, 6, 5, 4], default=8,
                   help="bits of the embedding / output head (default 8)")
    p.add_argument("--codec", choices=["auto", "zstd", "lzma", "brotli"], default="auto",
                   help="entropy coder; auto = the smallest of those available (default)")
    p.add_argument("--layout", choices=["auto", "byte", "dense", "bitplanes"], default="auto",
                   help="int code layout before the coder; auto = the smallest (default)")
    p.add_argument("--min-quant-numel", type=int, default=DEFAULT_MIN_QUANT_NUMEL,
                   help=f"2-D tensors with fewer elements are stored as fp16 (default {DEFAULT_MIN_QUANT_NUMEL})")
    p.add_argument("--max-bytes-per-param", type=float, default=None,
                   help="also cap the artifact file (code not included) at this many bytes per parameter "
                        "(e.g. 0.5)")
    p.add_argument("--rd-lambda", type=float, default=None,
                   help="rate-aware packing: per tensor the clip/step minimizing distortion + lambda * bits (the "
                        "embedding included). Default below 8 bits: "
                        f"{DEFAULT_RD_LAMBDA_FISHER:g} (fisher) / {DEFAULT_RD_LAMBDA_NSR:g} (nsr); "
                        "0 = the old error-only clip search; 8 bits default to 0")
    p.add_argument("--rd-distortion", choices=list(RD_DISTORTIONS), default="auto",
                   help="distortion of the rate-aware choice: fisher (loss-weighted, needs TRAINING tokens: "
                        "--calib, else the checkpoint's config data.train_shards), nsr (data-free noise-to-"
                        "signal ratio), auto = fisher when tokens are available, else nsr (default)")
    p.add_argument("--fit", action="store_true",
                   help="when over the budget, coarsen the block matrices' steps (rate-distortion allocation) "
                        "until it fits, instead of failing")


def handle(args: argparse.Namespace) -> int:
    from distill.pack import pack_from_args

    report = pack_from_args(args, args.out)
    chosen = f"bits {report['chosen_bits']}" + (" (auto)" if report["bits"] == "auto" else "")
    print(f"{report['out']}: {report['artifact_bytes']:,} bytes = code {report['code_bytes']:,} "
          f"({SCRIPT_NAME}) + model {report['model_bytes']:,} ({report['bytes_per_param']:.3f} model "
          f"bytes/param, {report['params']:,} params); "
          f"{chosen}, method {report['method']}, codec {report['codec']}, layout {report['layout']}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pack", help="quantize a float checkpoint into one budget-checked artifact",
                              description=_pack_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_BYTES,
                   help="maximum submission size in bytes: the standalone train_gpt.py (code) + the artifact "
                        "file (default 16000000)")
    add_pack_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.set_defaults(func=handle)


def _pack_doc() -> str:
    """distill/pack.py's docstring, read without importing it (it imports torch); works inside the standalone
    train_gpt.py too, whose importer serves the source from memory."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("distill.pack")
    source = spec.loader.get_source("distill.pack") if spec is not None and spec.loader is not None else None
    return (ast.get_docstring(ast.parse(source)) or "") if source else ""


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="distill")
    add_parser(ap.add_subparsers())
    a = ap.parse_args()
    sys.exit(a.func(a))
