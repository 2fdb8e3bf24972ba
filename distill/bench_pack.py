"""`distill bench pack CHECKPOINT`: bits x method x codec -> artifact bytes/param and the bpb gap vs float.

Every row is a real artifact: packed, written, read back by `load_artifact` (checksum, decode, dequantize)
and scored with the challenge metric (`distill.metric.evaluate_bpb`). The bpb of a (bits, method) pair
does not depend on the entropy coder (decoding is lossless), so it is scored once per pair; only the size
is measured per codec. GPTQ rows need `--calib` (TRAINING shards); their Hessians are computed once.
`--rd-lambdas default,0` adds the clip-choice dimension: the packer's rate-aware default vs the error-only
search (lambda 0); the Fisher sensitivities of the rate-aware choice (from --calib, else the checkpoint's
train shards) are measured once too. A --fit row's steps depend on the codec's real size: scored per codec.

    distill bench pack runs/demo_ce --tokenizer T.model --val 'D/fineweb_val_*.bin' --seq-len 256 \
        --calib 'D/fineweb_train_*.bin' --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from distill.errors import DistillError


def _parse_list(text: str, allowed: tuple, cast=str) -> list:
    items = [cast(x) for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of {allowed}, got {text!r}")
    return items


def run_bench_pack(
    checkpoint: str, tokenizer: str, val: str, seq_len: int, calib: str | None = None,
    bits_list: tuple = (8, 6, 5, 4), methods: tuple = ("rtn", "gptq"), codecs: tuple | None = None,
    stride: int | None = None, max_windows: int | None = None, batch_size: int = 8, embed_bits: int = 8,
    min_quant_numel: int | None = None, calib_tokens: int = 262_144, calib_seconds: float = 60.0,
    calib_seq_len: int | None = None, fit_bytes_per_param: float | None = None, device: str = "cpu",
    rd_lambdas: tuple = (None,),
) -> dict:
    from tqdm import tqdm

    from distill import pack
    from distill.artifact import available_codecs, load_artifact
    from distill.metric import evaluate_bpb
    from distill.shards import load_tokens
    from distill.tokenizer import build_luts, load_tokenizer
    from student.model import build_model

    t0 = time.monotonic()
    codecs = tuple(codecs or available_codecs())
    missing = [c for c in codecs if c not in available_codecs()]
    if missing:
        raise DistillError(f"--codecs: not available here: {missing}")
    state, cfg = pack.read_checkpoint(checkpoint)
    vocab = int(cfg["model"].get("vocab_size", 1024))
    luts = build_luts(load_tokenizer(tokenizer), vocab)
    val_tokens = load_tokens(val, vocab_size=vocab)

    def score(model) -> dict:
        return evaluate_bpb(model, val_tokens, luts, seq_len, stride=stride, batch_size=batch_size,
                            device=device, max_windows=max_windows)

    float_model = build_model(cfg["model"])
    float_model.load_state_dict(state)
    base = score(float_model.eval())
    params = sum(t.numel() for t in state.values())

    hessians, calib_seen, toks = None, 0, None
    if calib:
        toks = pack.load_calibration_tokens(calib, calib_tokens)
    if "gptq" in methods:
        if not calib:
            raise DistillError("--calib: GPTQ rows need a glob of TRAINING shards (or pass --methods rtn)")
        L = int(calib_seq_len or cfg.get("train", {}).get("seq_len", 1024))
        hessians, calib_seen = pack.calibrate(state, cfg["model"], toks, L, calib_tokens,
                                              deadline_s=time.monotonic() + calib_seconds, where=checkpoint)

    configs = [(b, m, False, lam) for lam in rd_lambdas for m in methods for b in bits_list]
    if fit_bytes_per_param is not None:
        configs += [(6, m, True, None) for m in methods]
    common = {"embed_bits": embed_bits, "hessians": hessians, "progress": False, "calib_tokens": toks,
              "min_quant_numel": min_quant_numel or pack.DEFAULT_MIN_QUANT_NUMEL,
              "calib_max_tokens": calib_tokens, "calib_seq_len": calib_seq_len}
    fisher: dict = {}  # one Fisher measurement shared by every rate-aware pack
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        bar = tqdm(total=len(configs) * len(codecs), desc="bench pack", unit="artifact", file=sys.stderr)
        for bits, method, fit, lam in configs:
            cache: dict = dict(fisher)  # the quantized tensors are the same for every codec
            extra = {"fit": True, "max_bytes_per_param": fit_bytes_per_param} if fit else {}
            scored = None
            for codec in codecs:
                out = Path(tmp) / f"{method}{bits}{'fit' if fit else ''}_{codec}.art"
                try:
                    rep = pack.pack_checkpoint(checkpoint, out, bits=bits, method=method, codec=codec,
                                               cache=cache, rd_lambda=lam, **common, **extra)
                    if "fisher" in cache:
                        fisher["fisher"] = cache["fisher"]
                except DistillError as e:  # e.g. a --fit target no step size reaches: report, go on
                    rows.append({"bits": bits, "method": method, "fit": fit, "codec": codec, "rd_lambda": lam,
                                 "error": str(e)})
                    bar.update(1)
                    continue
                if scored is None or fit:  # bpb through the real file roundtrip, once per (bits, method)
                    scored = score(load_artifact(out))
                rows.append({"bits": bits, "method": method, "fit": fit, "codec": codec,
                             "rd_lambda": rep["rd_lambda"], "rd_mode": rep["rd_mode"],
                             "rd_distortion": rep["rd_distortion"], "layout": rep["layout"],
                             "artifact_bytes": rep["artifact_bytes"],
                             "code_bytes": rep["code_bytes"], "bytes_per_param": rep["bytes_per_param"],
                             "val_bpb": scored["val_bpb"], "bpb_gap": scored["val_bpb"] - base["val_bpb"]})
                out.unlink()
                bar.update(1)
        bar.close()
    return {"checkpoint": str(checkpoint), "params": params, "float_val_bpb": base["val_bpb"],
            "val_tokens_scored": base["tokens"], "seq_len": seq_len, "calib_tokens": calib_seen,
            "embed_bits": embed_bits, "rows": rows, "seconds": round(time.monotonic() - t0, 1)}


def format_table(r: dict) -> str:
    lines = [(f"checkpoint {r['checkpoint']}: {r['params']:,} params, float val_bpb {r['float_val_bpb']:.4f} "
             f"({r['val_tokens_scored']:,} tokens, seq_len {r['seq_len']}), embeddings at {r['embed_bits']} bits"),
             "", ("| bits | method | clip choice | codec | layout | artifact bytes | bytes/param | val_bpb "
                  "| gap vs float |"),
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        bits = f"{x['bits']}{' fit' if x['fit'] else ''}"
        if "error" in x:
            lines.append(f"| {bits} | {x['method']} | - | {x['codec']} | - | {x['error'].split(': ', 1)[-1]} "
                         "| | | |")
            continue
        mode = x["rd_mode"] if x["rd_mode"] == "error-only" else f"{x['rd_mode']} λ={x['rd_lambda']:.3g}"
        lines.append(f"| {bits} | {x['method']} | {mode} | {x['codec']} | {x['layout']} | {x['artifact_bytes']:,} | "
                     f"{x['bytes_per_param']:.4f} | {x['val_bpb']:.4f} | {x['bpb_gap']:+.4f} |")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    r = run_bench_pack(args.checkpoint, args.tokenizer, args.val, args.seq_len, calib=args.calib,
                       bits_list=tuple(args.bits), methods=tuple(args.methods), codecs=args.codecs,
                       stride=args.stride, max_windows=args.max_windows, batch_size=args.batch_size,
                       embed_bits=args.embed_bits, min_quant_numel=args.min_quant_numel,
                       calib_tokens=args.calib_tokens, calib_seconds=args.calib_seconds,
                       calib_seq_len=args.calib_seq_len, fit_bytes_per_param=args.fit_bytes_per_param,
                       rd_lambdas=tuple(args.rd_lambdas))
    print(format_table(r), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(r))
    return 0


def add_subparser(sub) -> None:
    p = sub.add_parser("pack", help="bits x method x codec: artifact bytes/param and bpb gap vs float",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="float checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model of the checkpoint's vocab")
    p.add_argument("--val", required=True, help="glob of validation shards (scored, never calibrated on)")
    p.add_argument("--seq-len", type=int, required=True, help="evaluation window length")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: seq-len)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (CPU runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib", help="glob of TRAINING shards for GPTQ calibration")
    p.add_argument("--calib-tokens", type=int, default=262_144)
    p.add_argument("--calib-seconds", type=float, default=60.0)
    p.add_argument("--calib-seq-len", type=int, default=None)
    p.add_argument("--bits", type=lambda s: _parse_list(s, (8, 6, 5, 4), int), default=[8, 6, 5, 4],
                   help="comma list (default 8,6,5,4)")
    p.add_argument("--methods", type=lambda s: _parse_list(s, ("rtn", "gptq")), default=["rtn", "gptq"],
                   help="comma list (default rtn,gptq)")
    p.add_argument("--codecs", type=lambda s: _parse_list(s, ("zstd", "lzma", "brotli")), default=None,
                   help="comma list (default: every available coder)")
    p.add_argument("--embed-bits", type=int, choices=[8, 6, 5, 4], default=8)
    p.add_argument("--min-quant-numel", type=int, default=None)
    p.add_argument("--fit-bytes-per-param", type=float, default=None,
                   help="also add 6-bit rows packed with --fit to this many bytes per parameter (e.g. 0.5)")
    p.add_argument("--rd-lambdas", type=_parse_lambdas, default=[None],
                   help="comma list of clip-choice lambdas: 'default' (the packer's rate-aware default below 8 "
                        "bits) and/or numbers (0 = error-only); default: default")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    p.set_defaults(func=_cmd)


def _parse_lambdas(text: str) -> list:
    out = []
    for x in (t.strip() for t in text.split(",") if t.strip()):
        if x == "default":
            out.append(None)
            continue
        try:
            v = float(x)
        except ValueError:
            v = -1.0
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"expected 'default' or numbers >= 0, got {x!r}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one lambda")
    return out
