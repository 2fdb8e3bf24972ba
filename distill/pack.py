"""`distill pack CHECKPOINT --out FILE`: quantize a float checkpoint into one artifact under the budget.

GPTQ calibration reads TRAINING shards only (a glob naming `_val_` files is refused) and is time-limited
(`--calib-seconds`), as the challenge counts calibration inside the training budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distill.errors import DistillError

DEFAULT_BUDGET_BYTES = 16_000_000


def load_calibration_tokens(pattern: str, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` tokens of the matching TRAINING shards; validation shards are refused."""
    from distill.shards import read_shard, resolve_shards

    paths = resolve_shards(pattern)
    for p in paths:
        if "_val_" in p.name:
            raise DistillError(f"{p}: --calib must name TRAINING shards, not validation ones ('_val_' in the name)")
    parts, n = [], 0
    for p in paths:
        t = np.asarray(read_shard(p))[: max_tokens - n]
        parts.append(t)
        n += len(t)
        if n >= max_tokens:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def parse_bits(text: str) -> int | str:
    if text == "auto":
        return "auto"
    if text in ("8", "6", "5", "4"):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 8, 6, 5, 4 or auto, got {text!r}")


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=parse_bits, default=8,
                   help="bits of the block matrices: 8|6|5|4, or auto = highest that fits --budget (default 8)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="quantizer (default rtn)")
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
    p.add_argument("--min-quant-numel", type=int, default=65_536,
                   help="2-D tensors with fewer elements are stored as fp16 (default 65536)")


def pack_from_args(args: argparse.Namespace, out: str, write: bool = True, **over) -> dict:
    from distill.artifact import pack_checkpoint

    method = over.get("method", args.method)
    calib = None
    if method == "gptq":
        if not args.calib:
            raise DistillError("--calib: --method gptq needs a glob of TRAINING shards")
        calib = load_calibration_tokens(args.calib, args.calib_tokens)
    elif args.calib:
        load_calibration_tokens(args.calib, 1)  # still refuse a validation glob
    return pack_checkpoint(
        args.checkpoint, out, bits=over.get("bits", args.bits), method=method,
        budget_bytes=getattr(args, "budget", DEFAULT_BUDGET_BYTES), calib_tokens=calib,
        embed_bits=args.embed_bits, codec=over.get("codec", args.codec), layout=args.layout,
        calib_seconds=args.calib_seconds, calib_max_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
        min_quant_numel=args.min_quant_numel, progress=sys.stderr.isatty(), write=write,
    )


def handle(args: argparse.Namespace) -> int:
    report = pack_from_args(args, args.out)
    chosen = f"bits {report['chosen_bits']}" + (" (auto)" if report["bits"] == "auto" else "")
    print(f"{report['out']}: {report['artifact_bytes']:,} bytes ({report['bytes_per_param']:.3f} bytes/param, "
          f"{report['params']:,} params; code {report['code_bytes']:,} + model {report['model_bytes']:,}); "
          f"{chosen}, method {report['method']}, codec {report['codec']}, layout {report['layout']}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pack", help="quantize a float checkpoint into one budget-checked artifact",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_BYTES,
                   help="maximum artifact size in bytes, code included (default 16000000)")
    add_pack_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.set_defaults(func=handle)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="distill")
    add_parser(ap.add_subparsers())
    a = ap.parse_args()
    sys.exit(a.func(a))
