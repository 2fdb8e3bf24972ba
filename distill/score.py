"""`distill score MODEL`: the challenge's val_bpb of a packed artifact or a float checkpoint.

  distill score run/model.golf --tokenizer fineweb_1024_bpe.model --val 'data/fineweb_val_*.bin' --seq-len 1024
  distill score run/ --tokenizer ... --val ... --seq-len 2048 --stride 64 --json

MODEL: a file = packed artifact (distill.artifact.load_artifact: checksum verified — integrity, not
authenticity —, sizes and config validated before anything is allocated, built from the installed
student.model and refused if its embedded code differs, unless --trust-code, which RUNS the file's code);
a directory = float checkpoint (student.load_checkpoint).
Default (no --stride) is the challenge's evaluation exactly (distill.metric: concatenated val shards,
non-overlapping windows of L, float64 sums, LUT bytes). --stride s scores sliding windows (each token
once, >= L-s context).

Original bytes: when every val shard has a byte sidecar beside it (fineweb_val_bytes_XXXXXX.bin, written by
`distill data build --caseops`, the CaseOps records' format), bpb divides by the ORIGINAL text's bytes read
from it instead of the tokenizer's LUT bytes (a transformed text's pieces do not spell the original bytes).
Without sidecars nothing changes. The result's "bytes_source" says which was used.

Before scoring, every input is checked and refused with one line naming the file: shard header/size and
token ids against the tokenizer's vocab, the model's vocab against the tokenizer's, and the tokenizer
itself — it must have a standalone "▁" piece, or spaces are byte-encoded as the 3 UTF-8 bytes of U+2581
and the LUT counts 3 bytes for every 1-byte space (a known community bug that understates bpb ~20%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill.errors import DistillError

# numpy/sentencepiece/torch load inside the functions: `distill score --help` and argument errors stay fast


def check_space_piece(sp, path: str | Path) -> None:
    """Refuse a tokenizer whose whitespace can only be byte-encoded (no normal "▁" piece)."""
    from distill.tokenizer import SPACE

    i = int(sp.piece_to_id(SPACE))
    ok = sp.id_to_piece(i) == SPACE and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
    if not ok:
        raise DistillError(
            f"{path}: tokenizer has no standalone '\u2581' piece, so spaces fall back to 3 byte tokens and "
            "the byte count (and bpb) would be wrong; retrain it (distill data tokenizer) or pass --no-tokenizer-check"
        )


def load_model(path: str | Path, device: str = "cpu", trust_code: bool = False):
    """MODEL path -> torch module in eval mode. Any failure is a one-line DistillError naming the path."""
    p = Path(path)
    if not p.exists():
        raise DistillError(f"{p}: model not found (expected a packed artifact file or a checkpoint directory)")
    try:
        if p.is_dir():
            import student

            model = student.load_checkpoint(p, device=device)
        else:
            from distill.artifact import load_artifact

            model = load_artifact(p, trust_code=trust_code, device=device)
    except DistillError:
        raise
    except Exception as e:  # noqa: BLE001 — a loader bug or an exotic corruption must still reach the user as one line
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise DistillError(f"{p}: cannot load model ({type(e).__name__}: {msg})") from None
    return model.eval()


def model_vocab_size(model, device: str = "cpu") -> int:
    """The model's output vocabulary, read off one forward pass (works for any ids -> logits module)."""
    import torch

    with torch.no_grad():
        logits = model(torch.ones(1, 1, dtype=torch.long, device=device))
    return int(logits.shape[-1])


def score(model_path: str, tokenizer: str, val: str, seq_len: int, stride: int | None = None,
          batch_size: int = 8, device: str = "cpu", max_windows: int | None = None,
          trust_code: bool = False, tokenizer_check: bool = True, progress: bool = True) -> dict:
    """Everything `distill score` does, as a function -> the result dict (see `add_parser`)."""
    from distill.metric import evaluate_bpb
    from distill.shards import load_val, resolve_shards
    from distill.tokenizer import build_luts, load_tokenizer, tokenizer_hash

    t0 = time.time()
    sp = load_tokenizer(tokenizer)
    if tokenizer_check:
        check_space_piece(sp, tokenizer)
    vocab = int(sp.vocab_size())
    shards = resolve_shards(val)
    # header/size/magic + ids < vocab, one line per shard; byte_counts None without sidecars: the LUT count
    tokens, byte_counts = load_val(shards, vocab_size=vocab)
    model = load_model(model_path, device=device, trust_code=trust_code)
    model_vocab = model_vocab_size(model, device)
    if model_vocab != vocab:
        raise DistillError(f"{model_path}: model vocab {model_vocab} != tokenizer vocab {vocab} ({tokenizer})")
    luts = build_luts(sp, vocab)
    res = evaluate_bpb(model, tokens, luts, seq_len, stride=stride, batch_size=batch_size, device=device,
                       max_windows=max_windows, progress=progress, byte_counts=byte_counts)
    return {
        "val_loss": res["val_loss"],
        "val_bpb": res["val_bpb"],
        "tokens": res["tokens"],
        "bytes": res["bytes"],
        "bytes_source": "lut" if byte_counts is None else "sidecar",
        "windows": res["windows"],
        "model": str(model_path),
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "val_shards": [str(p) for p in shards],
        "val_stream_tokens": len(tokens),
        "seq_len": seq_len,
        "stride": stride,
        "partial": max_windows is not None,
        "device": str(device),
        "elapsed_s": round(time.time() - t0, 3),
    }


def handler(args: argparse.Namespace) -> int:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = score(args.model, args.tokenizer, args.val, args.seq_len, stride=args.stride,
                batch_size=args.batch_size, device=device, max_windows=args.max_windows,
                trust_code=args.trust_code, tokenizer_check=not args.no_tokenizer_check,
                progress=not args.json)
    mode = "default" if args.stride is None else f"stride {args.stride}"
    print(f"score | model:{res['model']} | seq_len:{res['seq_len']} ({mode}) | windows:{res['windows']} | "
          f"tokens:{res['tokens']} | bytes:{res['bytes']} ({res['bytes_source']}) | val_loss:{res['val_loss']:.6f} | "
          f"val_bpb:{res['val_bpb']:.6f}{' | PARTIAL' if res['partial'] else ''}")
    if args.json:
        print(json.dumps(res))
    sys.stdout.flush()
    return 0


def _positive(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="val_bpb of a packed artifact or checkpoint (the challenge's metric)",
        description="Score MODEL (packed artifact file or float checkpoint directory) with the challenge's "
                    "tokenizer-agnostic bits per byte on the given validation shards.",
    )
    p.add_argument("model", help="packed artifact file or float checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model the shards were encoded with")
    p.add_argument("--val", required=True, help="validation shard glob, e.g. 'data/fineweb_val_*.bin'")
    p.add_argument("--seq-len", type=_positive, required=True, help="window length L")
    p.add_argument("--stride", type=_positive, default=None,
                   help="sliding-window stride s <= L (default: non-overlapping windows, the challenge's eval)")
    p.add_argument("--batch-size", type=_positive, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-windows", type=_positive, default=None,
                   help="score only the first N windows (a quick check; not the official number)")
    p.add_argument("--trust-code", action="store_true",
                   help="RUN THE PYTHON CODE EMBEDDED IN THE ARTIFACT FILE (arbitrary code: only for files you "
                        "trust) instead of the installed student.model; without it, a file whose embedded code "
                        "differs from the installed student/model.py is refused")
    p.add_argument("--no-tokenizer-check", action="store_true",
                   help="skip the standalone-'\u2581' tokenizer check")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=handler)


if __name__ == "__main__":  # python -m distill.score ...
    from distill.cli import main

    sys.exit(main(["score", *sys.argv[1:]]))
