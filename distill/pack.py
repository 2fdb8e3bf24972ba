"""`distill pack CHECKPOINT --out FILE`: quantize a float checkpoint into one artifact under the budget.

The packer: read the checkpoint, (GPTQ) calibrate on TRAINING tokens, quantize per tensor with a clip
search, encode with distill.artifact, check the budget (optionally `--fit`: rate-distortion coarsening).

GPTQ calibration reads TRAINING shards only (a glob naming `_val_` files is refused) and is time-limited
(`--calib-seconds`), as the challenge counts calibration inside the training budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from distill import quant
from distill.artifact import Entry, available_codecs, encode_artifact
from distill.errors import DistillError
from distill.fsutil import write_bytes_atomic

DEFAULT_BUDGET_BYTES = 16_000_000
DEFAULT_MIN_QUANT_NUMEL = 4096  # smaller 2-D tensors (control/skip weights) stay fp16: scales would dominate
EMBED_NAMES = ("tok_emb.weight", "lm_head.weight")
AUTO_BITS = (8, 6, 5, 4)


def read_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A float checkpoint directory (model.safetensors + config.json) -> (float32 state_dict, full config)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise DistillError(f"{d}: checkpoint directory not found")
    st, cj = d / "model.safetensors", d / "config.json"
    for f in (st, cj):
        if not f.is_file():
            raise DistillError(f"{f}: missing (a checkpoint directory holds model.safetensors + config.json)")
    try:
        cfg = json.loads(cj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{cj}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise DistillError(f"{cj}: no \"model\" section with the model config")
    try:
        from safetensors.torch import load_file

        state = load_file(str(st))
    except Exception as e:
        raise DistillError(f"{st}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return {k: v.float() for k, v in state.items()}, cfg


def plan_bits(state: dict[str, torch.Tensor], bits: int, embed_bits: int, min_quant_numel: int) -> dict[str, int]:
    """Bits per tensor: 2-D block matrices at `bits`, embeddings/head at `embed_bits`, the rest fp16 (16)."""
    plan = {}
    for name, t in state.items():
        if t.dim() == 2 and t.numel() >= min_quant_numel:
            plan[name] = embed_bits if name in EMBED_NAMES else bits
        else:
            plan[name] = 16
    return plan


@contextmanager
def single_thread():
    """Run quantization on one intra-op thread: the clip search and the GPTQ column sweep are many small ops
    where thread hand-off dominates (measured 30-60x faster than 2 threads on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def quantize_state_dict(
    state: dict[str, torch.Tensor], plan: dict[str, int], method: str = "rtn",
    hessians: dict[str, torch.Tensor] | None = None, cache: dict | None = None, progress: bool = False,
    clips: dict[str, quant.Clip] | None = None,
) -> list[Entry]:
    """Quantize each tensor per `plan` -> entries. GPTQ where a Hessian exists (method "gptq"), else RTN.
    The clip is searched per tensor (least error) unless `clips` fixes it. `cache` memoizes results across
    budget retries."""
    cache = {} if cache is None else cache
    items = list(state.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"quantize ({method})", unit="tensor", leave=False, file=sys.stderr)
    entries = []
    with single_thread():
        for name, t in items:
            entries.append(_quantize_one(name, t, plan[name], method, hessians, cache, clips))
    return entries


def _quantize_one(name: str, t: torch.Tensor, b: int, method: str, hessians, cache: dict, clips) -> Entry:
    """One tensor -> Entry (fp16, or codes + scales by GPTQ where a Hessian exists, else RTN)."""
    if b >= 16:
        return Entry(name, list(t.shape), 16, values=t.detach().to(torch.float16))
    fixed = (clips or {}).get(name)
    H = (hessians or {}).get(name) if method == "gptq" else None
    key = (name, b, H is not None, str(fixed))
    if key not in cache:
        if H is not None:
            if fixed is None:
                q, s, clip, _ = quant.gptq_search(t, H, b)
            else:
                (q, s), clip = quant.gptq(t, H, b, fixed), fixed
        else:
            clip = fixed if fixed is not None else quant.search_clip(t, b)[0]
            q, s = quant.quantize_rtn(t, b, clip)
        cache[key] = (q, s, str(clip), "gptq" if H is not None else "rtn")
    q, s, clip, m = cache[key]
    return Entry(name, list(t.shape), b, codes=q, scales=s, clip=clip, method=m)


def fit_budget(state, plan, method, hessians, cache, encode, budget_bytes: int, first_bytes: int,
               progress: bool) -> tuple[bytes, dict, list[Entry], float]:
    """Rate-distortion allocation: coarsen the quantized tensors' steps until the artifact fits.

    Each tensor offers (clip -> error, estimated bits) options (`quant.rd_table`, errors Hessian-weighted
    under GPTQ); a global multiplier lam picks, per tensor, the option minimizing error + lam * bits, found by
    bisection so the estimate fits; the estimate's offset is re-measured on the real encoding and retried.
    Embeddings keep their grid (embed_bits) but join the allocation. Returns (data, info, entries, lam)."""
    names = [n for n, b in plan.items() if b < 16]
    with single_thread():
        tables = {n: quant.rd_table(state[n], plan[n], (hessians or {}).get(n) if method == "gptq" else None)
                  for n in names}
    # errors relative to each tensor's best: Hessian-weighted errors of different layers are not on one
    # scale of loss, so every matrix is treated as equally sensitive to a relative error increase
    tables = {n: [(c, e / max(min(o[1] for o in tab), 1e-30), r) for c, e, r in tab] for n, tab in tables.items()}

    def choose(lam: float) -> dict:
        return {n: min(tables[n], key=lambda o: o[1] + lam * o[2]) for n in names}

    def est_bytes(choice: dict) -> float:
        return sum(o[2] for o in choice.values()) / 8

    other = first_bytes - est_bytes(choose(0.0))  # code, metadata, embeddings, fp16 tensors, coder overhead
    data = b""
    for _ in range(5):
        target = budget_bytes - other
        if est_bytes(choose(math.exp(60))) > target:
            break
        lo, hi = -60.0, 60.0  # bisection on ln(lam): the estimate is non-increasing in lam
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if est_bytes(choose(math.exp(mid))) <= target else (mid, hi)
        lam = math.exp(hi)
        choice = choose(lam)
        entries = quantize_state_dict(state, plan, method, hessians, cache, progress,
                                      clips={n: o[0] for n, o in choice.items()})
        data, info = encode(entries)
        if len(data) <= budget_bytes:
            return data, info, entries, lam
        other = len(data) - est_bytes(choice) + 0.002 * budget_bytes  # re-measure, keep a small margin
    raise DistillError(f"artifact would be {len(data) or first_bytes} bytes, over the budget of {budget_bytes} "
                       "bytes even at the coarsest steps")


def calibration_batches(tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8):
    """Non-overlapping [B, seq_len] windows from the start of a TRAINING token stream."""
    tokens = np.asarray(tokens)
    n_win = min(len(tokens) // seq_len, max(1, max_tokens // seq_len))
    for i in range(0, n_win, batch_size):
        k = min(batch_size, n_win - i)
        x = np.asarray(tokens[i * seq_len : (i + k) * seq_len], dtype=np.int64).reshape(k, seq_len)
        yield torch.from_numpy(x)


def calibrate(state: dict[str, torch.Tensor], model_cfg: dict, tokens: np.ndarray, seq_len: int,
              max_tokens: int, deadline_s: float | None = None, where: str = "checkpoint",
              device: str = "auto") -> tuple[dict[str, torch.Tensor], int]:
    """GPTQ Hessians (H = X^T X of every nn.Linear input, float64 on CPU) from TRAINING tokens, on CUDA when
    available. Returns (hessians, tokens seen); stops after the batch that passes `deadline_s`."""
    from student.model import build_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DistillError(f"{where}: weights do not match config.json's model ({str(e)[:200]})") from None
    model.to(dev).eval()
    L = max(1, min(int(seq_len), len(tokens) - 1))
    batches = (x.to(dev) for x in calibration_batches(tokens, L, max_tokens))
    hess, seen = quant.collect_hessians(model, batches, deadline_s=deadline_s)
    return {k: v.cpu() for k, v in hess.items()}, seen


def pack_checkpoint(
    ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, bits: int | str = 8, method: str = "rtn",
    budget_bytes: int = DEFAULT_BUDGET_BYTES, calib_tokens: np.ndarray | None = None, embed_bits: int = 8,
    codec: str = "auto", layout: str = "auto", calib_seconds: float = 60.0, calib_max_tokens: int = 262_144,
    calib_seq_len: int | None = None, min_quant_numel: int = DEFAULT_MIN_QUANT_NUMEL,
    max_bytes_per_param: float | None = None, fit: bool = False, progress: bool = True, write: bool = True,
    entries_out: list | None = None, hessians: dict[str, torch.Tensor] | None = None, cache: dict | None = None,
) -> dict:
    """Quantize a float checkpoint and write one artifact at `out_path` (atomically, only if it fits).

    bits: 8/6/5/4 for the block matrices, or "auto" = the highest of 8/6/5/4 whose artifact fits.
    The budget is min(budget_bytes, max_bytes_per_param * params). Over it: with `fit`, the block matrices'
    steps are coarsened (rate-distortion allocation, `fit_budget`) until it fits; otherwise DistillError
    "<out>: artifact would be N bytes, over the budget of B bytes" and nothing is written. Returns the
    report; `entries_out`, when a list, receives the stored Entry objects (tests compare them with what
    load_artifact returns). `hessians` (from `calibrate`) skips the calibration pass (benchmarks reuse it).
    """
    t0 = time.monotonic()
    if method not in ("rtn", "gptq"):
        raise DistillError(f"--method: expected rtn or gptq, got {method!r}")
    if bits != "auto" and int(bits) not in AUTO_BITS:
        raise DistillError(f"--bits: expected one of 8, 6, 5, 4 or auto, got {bits!r}")
    if codec != "auto" and codec not in available_codecs():
        raise DistillError(f"--codec: {codec!r} is not available (have {available_codecs()})")
    codecs = available_codecs() if codec == "auto" else [codec]
    layouts = list(quant.LAYOUTS) if layout == "auto" else [layout]
    state, cfg = read_checkpoint(ckpt_dir)
    model_cfg = cfg["model"]
    params = sum(t.numel() for t in state.values())
    budget = budget_bytes if max_bytes_per_param is None else min(budget_bytes, int(max_bytes_per_param * params))

    calib_seen = 0
    if method == "gptq" and hessians is None:
        if calib_tokens is None or len(calib_tokens) == 0:
            raise DistillError("--calib: GPTQ needs calibration tokens from the TRAINING shards")
        L = int(calib_seq_len or cfg.get("train", {}).get("seq_len", 1024))
        hessians, calib_seen = calibrate(state, model_cfg, calib_tokens, L, calib_max_tokens,
                                         deadline_s=t0 + calib_seconds, where=str(ckpt_dir))

    def encode(entries):
        return encode_artifact(entries, model_cfg, codecs, layouts)

    cache = {} if cache is None else cache
    tried, lam = [], 0.0
    for b in AUTO_BITS if bits == "auto" else (int(bits),):
        plan = plan_bits(state, b, embed_bits, min_quant_numel)
        entries = quantize_state_dict(state, plan, method, hessians, cache, progress)
        data, info = encode(entries)
        tried.append({"bits": b, "artifact_bytes": len(data)})
        if len(data) <= budget:
            break
    else:
        if not fit:
            raise DistillError(f"{out_path}: artifact would be {len(data)} bytes, over the budget of {budget} bytes")
        try:
            data, info, entries, lam = fit_budget(state, plan, method, hessians, cache, encode, budget,
                                                  len(data), progress)
        except DistillError as e:
            raise DistillError(f"{out_path}: {e}") from None
    if write:
        write_bytes_atomic(out_path, data)
    if entries_out is not None:
        entries_out.extend(entries)
    w_ratio = info["weights_bytes"] / max(info["weights_raw_bytes"], 1)
    tensors = [{"name": e.name, "shape": e.shape, "bits": e.bits if e.bits < 16 else "fp16",
                "clip": e.clip or None, "method": e.method, "bytes": e.raw_bytes(info["layout"]),
                "est_compressed_bytes": round(e.raw_bytes(info["layout"]) * w_ratio)} for e in entries]
    return {
        "out": str(out_path), **info, "model_bytes": len(data) - info["code_bytes"], "params": params,
        "bytes_per_param": len(data) / max(params, 1), "bits": bits if bits == "auto" else int(bits),
        "chosen_bits": b, "embed_bits": embed_bits, "method": method, "budget_bytes": budget,
        "fit": bool(fit), "rd_lambda": lam, "tried": tried, "calib_tokens": calib_seen,
        "seconds": round(time.monotonic() - t0, 2), "tensors": tensors,
    }


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
    p.add_argument("--min-quant-numel", type=int, default=DEFAULT_MIN_QUANT_NUMEL,
                   help=f"2-D tensors with fewer elements are stored as fp16 (default {DEFAULT_MIN_QUANT_NUMEL})")
    p.add_argument("--max-bytes-per-param", type=float, default=None,
                   help="also cap the artifact at this many bytes per parameter (e.g. 0.5)")
    p.add_argument("--fit", action="store_true",
                   help="when over the budget, coarsen the block matrices' steps (rate-distortion allocation) "
                        "until it fits, instead of failing")


def pack_from_args(args: argparse.Namespace, out: str, write: bool = True, **over) -> dict:
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
        min_quant_numel=args.min_quant_numel, max_bytes_per_param=args.max_bytes_per_param, fit=args.fit,
        progress=sys.stderr.isatty(), write=write,
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
