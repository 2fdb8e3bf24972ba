"""`distill data download|tokenizer|build` — argument parsing only; the work is in download.py / build.py.

  distill data download --variant sp1024 --train-shards 10 --out data/
  distill data tokenizer --docs docs.jsonl --vocab-size 4096 --out tok/fineweb_4096_bpe.model --max-docs 200000
  distill data build --docs hf:HuggingFaceFW/fineweb:sample-10BT --tokenizer tok.model --out shards/ \\
      --val-docs 50000 --workers 8
  distill data build --caseops --docs docs.jsonl --tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
      --out shards/ --val-docs 50000          (CaseOps text + fineweb_val_bytes_*.bin original-byte sidecars)
"""

from __future__ import annotations

import argparse
import json
import os

from distill.errors import DistillError


def _download(args: argparse.Namespace) -> int:
    from distill.data.download import download

    res = download(args.variant, args.train_shards, args.out, repo_id=args.repo_id, revision=args.revision,
                   progress=not args.json)
    n_tok = sum(s["tokens"] for s in res["shards"])
    print(f"download | variant:{res['variant']} | repo:{res['repo_id']} | shards:{len(res['shards'])} | "
          f"tokens:{n_tok} | tokenizer:{res['tokenizer']}")
    if args.json:
        print(json.dumps(res))
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from distill.data.sources import iter_docs
    from distill.score import check_space_piece
    from distill.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

    if args.vocab_size < 260:  # 4 specials + 256 byte-fallback pieces must fit
        raise DistillError(f"--vocab-size: must be >= 260 with byte fallback, got {args.vocab_size}")
    texts = list(iter_docs(args.docs, args.max_docs))
    symbols: tuple[str, ...] = ()
    if args.caseops:  # train on the transformed text, with the operators as whole pieces (as the records)
        from distill import caseops

        texts = [caseops.encode(t) for t in texts]
        symbols = caseops.OPERATORS
    out = train_tokenizer(texts, args.vocab_size, args.out, num_threads=args.threads, user_defined_symbols=symbols)
    sp = load_tokenizer(out)
    check_space_piece(sp, out)  # guard against the byte-encoded-space bug
    res = {"tokenizer": str(out), "vocab_size": int(sp.vocab_size()), "docs": len(texts),
           "sha256": tokenizer_hash(out), "text_transform": "lossless_caps_caseops_v1" if args.caseops else "identity"}
    print(f"tokenizer | out:{out} | vocab:{res['vocab_size']} | docs:{len(texts)} | sha256:{res['sha256'][:16]}")
    if args.json:
        print(json.dumps(res))
    return 0


def _build(args: argparse.Namespace) -> int:
    from distill.data.build import BuildConfig, build_shards

    cfg = BuildConfig(docs=args.docs, tokenizer=args.tokenizer, out=args.out, val_docs=args.val_docs,
                      shard_tokens=args.shard_tokens, workers=args.workers, curate=not args.no_curate,
                      max_docs=args.max_docs, force=args.force, caseops=args.caseops)
    m = build_shards(cfg, progress=not args.json)
    d, t = m["docs"], m["tokens"]
    dropped = " ".join(f"{k}={v}" for k, v in d["dropped"].items()) or "none (--no-curate)"
    print(f"build | docs in:{d['input']} kept:{d['kept']} (val {d['val']}, train {d['train']}) | "
          f"tokens kept:{t['kept']} | dropped: {dropped} | shards:{len(m['shards'])} -> {args.out}")
    if args.json:
        print(json.dumps({"out": args.out, "docs": d, "tokens": t, "shards": m["shards"]}))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="download / build token shards, train a tokenizer",
                              description="Data stage: challenge shards from the hub, tokenizers, curated shards.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    d = sub.add_parser("download", help="the challenge's cached shards + tokenizer from the Hugging Face hub")
    d.add_argument("--variant", choices=["sp1024", "sp4096", "sp8192"], default="sp1024")
    d.add_argument("--train-shards", type=int, default=1, help="number of training shards (1e8 tokens each)")
    d.add_argument("--out", required=True, help="local data folder (gets datasets/, tokenizers/, manifest.json)")
    d.add_argument("--repo-id", default=None,
                   help="dataset repo (default per variant), or a local directory laid out like it (offline mirror)")
    d.add_argument("--revision", default=None, help="git revision / branch / tag of the dataset repo")
    d.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    d.set_defaults(func=_download)

    t = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with the challenge's spec")
    t.add_argument("--docs", required=True, help="JSONL / Parquet / .txt file, glob, or hf:REPO[:CONFIG[:SPLIT]]")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output .model path (a .vocab is written beside it)")
    t.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    t.add_argument("--caseops", action="store_true",
                   help="train on CaseOps-transformed text with its 4 operators as pieces (the records' "
                        "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model is one; build accepts it as is)")
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="SentencePiece trainer threads")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    t.set_defaults(func=_tokenizer)

    b = sub.add_parser("build", help="curate + tokenize documents into challenge-format shards")
    b.add_argument("--docs", required=True, help="JSONL / Parquet / .txt file, glob, or hf:REPO[:CONFIG[:SPLIT]]")
    b.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    b.add_argument("--out", required=True, help="output folder (fineweb_{val,train}_NNNNNN.bin + manifest.json)")
    b.add_argument("--val-docs", type=int, required=True, help="the first N kept documents are validation")
    b.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (challenge: 1e8)")
    b.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="processes for curation + tokenization (1 = in-process)")
    b.add_argument("--no-curate", action="store_true",
                   help="no normalisation, filtering or dedup (reproduces the challenge's tokenization exactly)")
    b.add_argument("--max-docs", type=int, default=None, help="read at most N input documents")
    b.add_argument("--force", action="store_true", help="replace shards / manifest already in --out")
    b.add_argument("--caseops", action="store_true",
                   help="CaseOps-transform each document before tokenizing (needs a CaseOps tokenizer) and write "
                        "fineweb_val_bytes_NNNNNN.bin original-byte sidecars beside the val shards (distill score "
                        "then counts the original text's bytes)")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    b.set_defaults(func=_build)
