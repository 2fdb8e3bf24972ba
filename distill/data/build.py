"""`distill data build`: documents -> curation -> [BOS]+ids -> challenge shards + manifest.json.

Pipeline (constant memory apart from the dedup index):
  sources.iter_docs -> batches of `batch_docs` -> workers: filters.analyze + SentencePiece encode
  -> main process, in document order: Deduper -> ShardWriter (val for the first `val_docs` kept docs,
  then train). Documents are packed as [BOS] + ids with no EOS and may straddle two shards
  (the challenge's export). With --no-curate nothing is normalised or dropped, which reproduces the
  challenge's own tokenization of a document list exactly.

--caseops: each (curated) document is CaseOps-transformed (distill.caseops) before tokenizing, and every val
shard gets its original-byte sidecar fineweb_val_bytes_NNNNNN.bin (same header, one uint16 per token: the
original text's UTF-8 bytes the token stands for, BOS = 0), as the CaseOps records' exporter writes them.
The sidecars are listed under "sidecars" in the manifest; "text_transform" names the transform.

Nothing is half-written: shards go to a hidden staging folder inside OUT and are moved into place only
after the last document; manifest.json (atomic) is written last. On any error the staging folder is
removed and a DistillError (one line) reaches the CLI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from distill.data.filters import FILTERS, CurationConfig, Deduper, DocInfo, MinHasher, analyze
from distill.data.sources import iter_docs
from distill.errors import DistillError
from distill.fsutil import sha256_file, write_json_atomic
from distill.shards import MAX_VOCAB, shard_name, sidecar_name, write_shard
from distill.tokenizer import load_tokenizer, tokenizer_hash

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "distill-shards"
MANIFEST_VERSION = 1


@dataclass
class BuildConfig:
    docs: str
    tokenizer: str
    out: str
    val_docs: int = 50_000  # the challenge: first 50,000 docs are validation
    shard_tokens: int = 100_000_000
    workers: int = 1
    curate: bool = True
    max_docs: int | None = None
    batch_docs: int = 256
    force: bool = False
    caseops: bool = False  # CaseOps text + val byte sidecars
    curation: CurationConfig = field(default_factory=CurationConfig)


class ShardWriter:
    """Fills fixed-size shards of one split; a document may straddle two shards. With `sidecars`, each
    shard gets its byte sidecar: the per-token counts passed to `add`, cut at the same places."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, sidecars: bool = False):
        self.folder, self.split, self.cap = folder, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.counts = np.empty(shard_tokens, dtype=np.uint16) if sidecars else None
        self.fill = 0
        self.records: list[dict] = []
        self.sidecar_records: list[dict] = []

    def add(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        if (counts is None) != (self.counts is None):
            raise AssertionError("byte counts must come with every document of a sidecar split, and only then")
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.cap - self.fill)
            self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
            if self.counts is not None:
                self.counts[self.fill : self.fill + take] = counts[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self._flush()

    def close(self) -> None:
        if self.fill:
            self._flush()

    def _flush(self) -> None:
        index = len(self.records)
        self.records.append(self._write(shard_name(self.split, index), self.buf))
        if self.counts is not None:
            self.sidecar_records.append(self._write(sidecar_name(self.split, index), self.counts))
        self.fill = 0

    def _write(self, name: str, arr: np.ndarray) -> dict:
        path = self.folder / name
        write_shard(path, arr[: self.fill])
        return {"name": name, "split": self.split, "tokens": int(self.fill), "bytes": path.stat().st_size,
                "sha256": sha256_file(path)}


# ------------------------------------------------------------------ per-batch work (runs in workers)

_W: dict = {}


def _init_worker(tokenizer_path: str, cfg: CurationConfig, curate: bool, caseops: bool, sp_threads: int) -> None:
    _W["sp"] = load_tokenizer(tokenizer_path)
    _W["cfg"], _W["curate"], _W["caseops"], _W["threads"] = cfg, curate, caseops, sp_threads
    _W["hasher"] = MinHasher(cfg) if curate else None


def _process_batch(job: tuple[list[str], bool]) -> list[tuple[DocInfo | None, np.ndarray, np.ndarray | None]]:
    """Analyse + encode a batch: [(DocInfo or None when not curating, [BOS]+ids uint16,
    [0]+original bytes per token uint16 when --caseops and the batch may hold val documents, else None)]."""
    texts, may_hold_val = job
    sp, cfg, curate = _W["sp"], _W["cfg"], _W["curate"]
    infos = [analyze(t, cfg, _W["hasher"]) for t in texts] if curate else [None] * len(texts)
    to_encode = [i.text for i in infos] if curate else texts
    bos = sp.bos_id()
    if not _W["caseops"]:
        ids = sp.encode(to_encode, out_type=int, num_threads=_W["threads"])
        return [(info, np.asarray([bos] + doc, dtype=np.uint16), None) for info, doc in zip(infos, ids)]
    from distill import caseops

    transformed = [caseops.encode(t) for t in to_encode]
    if not may_hold_val:  # train documents need no sidecar: skip the (slower) span decoding
        ids = sp.encode(transformed, out_type=int, num_threads=_W["threads"])
        return [(info, np.asarray([bos] + doc, dtype=np.uint16), None) for info, doc in zip(infos, ids)]
    out = []
    for info, text, (ids, begin, end) in zip(infos, transformed, caseops.encode_with_spans(sp, transformed)):
        counts = caseops.token_original_bytes(text, begin, end)
        out.append((info, np.concatenate([[bos], ids]).astype(np.uint16),
                    np.concatenate([[0], counts]).astype(np.uint16)))
    return out


def _batches(it: Iterable[str], n: int, val_open=lambda: True) -> Iterator[tuple[list[str], bool]]:
    """(texts, may hold val documents). `val_open()` is asked when a batch is handed out: once the val split
    is full, no later document can be val (batches still in flight were flagged earlier, conservatively)."""
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch, val_open()


def _ordered_results(pool, batches: Iterator[list[str]], max_inflight: int) -> Iterator[list]:
    """Results in input order with at most `max_inflight` batches queued. (Pool.imap would read the whole
    source ahead into memory; and a bad input line raises here, in the main thread, at its position.)"""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_process_batch, (batch,)))
        if len(pending) >= max_inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ------------------------------------------------------------------------------------- the build


def _check_out(out: Path, force: bool) -> list[Path]:
    """Existing outputs of an earlier build in OUT: refused unless --force (then replaced at the end)."""
    if out.exists() and not out.is_dir():
        raise DistillError(f"{out}: exists and is not a directory")
    stale = sorted(out.glob("fineweb_*.bin")) + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
    if stale and not force:
        raise DistillError(f"{out}: already holds shards or a manifest (pass --force to replace them)")
    return stale


def build_shards(cfg: BuildConfig, progress: bool = True) -> dict:
    """Run the build; return the manifest dict (also written to OUT/manifest.json)."""
    t0 = time.time()
    if cfg.val_docs < 0:
        raise DistillError(f"--val-docs: must be >= 0, got {cfg.val_docs}")
    if cfg.shard_tokens <= 0:
        raise DistillError(f"--shard-tokens: must be positive, got {cfg.shard_tokens}")
    if cfg.workers < 1:
        raise DistillError(f"--workers: must be >= 1, got {cfg.workers}")
    sp = load_tokenizer(cfg.tokenizer)
    if cfg.caseops:
        from distill.caseops import check_tokenizer

        check_tokenizer(sp, cfg.tokenizer)
    vocab_size = int(sp.vocab_size())
    if vocab_size > MAX_VOCAB:
        raise DistillError(f"{cfg.tokenizer}: vocab {vocab_size} does not fit uint16 shards (max {MAX_VOCAB})")
    docs_iter = iter_docs(cfg.docs, cfg.max_docs)  # resolves SRC now: a missing file fails before any write
    out = Path(cfg.out)
    stale = _check_out(out, cfg.force)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".distill-build-", dir=out))
    try:
        counts = _run(cfg, docs_iter, staging, progress)
        for p in stale:
            p.unlink(missing_ok=True)
        for rec in counts["shards"] + counts["sidecars"]:
            os.replace(staging / rec["name"], out / rec["name"])
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        raise
    settings = {k: v for k, v in asdict(cfg).items() if k != "curation"}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": "distill data build",
        "settings": settings,
        "curation": cfg.curation.to_dict() if cfg.curate else None,
        "tokenizer": {"path": str(Path(cfg.tokenizer).resolve()), "sha256": tokenizer_hash(cfg.tokenizer),
                      "vocab_size": vocab_size},
        "text_transform": "lossless_caps_caseops_v1" if cfg.caseops else "identity",
        "docs": counts["docs"],
        "tokens": counts["tokens"],
        "shards": counts["shards"],
        "sidecars": counts["sidecars"],
        "elapsed_s": round(time.time() - t0, 3),
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def _run(cfg: BuildConfig, docs_iter: Iterator[str], staging: Path, progress: bool) -> dict:
    dropped_docs = {f: 0 for f in FILTERS}
    dropped_tokens = {f: 0 for f in FILTERS}
    n_in = tok_in = 0
    kept = {"val": 0, "train": 0}
    kept_tokens = {"val": 0, "train": 0}
    writers = {"val": ShardWriter(staging, "val", cfg.shard_tokens, sidecars=cfg.caseops),
               "train": ShardWriter(staging, "train", cfg.shard_tokens)}
    deduper = Deduper(cfg.curation) if cfg.curate else None
    init_args = (cfg.tokenizer, cfg.curation, cfg.curate, cfg.caseops, 1)

    def val_open() -> bool:
        return kept["val"] < cfg.val_docs

    from tqdm import tqdm

    pbar = tqdm(desc="build", unit="doc", disable=None if progress else True, total=cfg.max_docs)
    pool = None
    try:
        if cfg.workers > 1:
            pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(
                cfg.workers, initializer=_init_worker, initargs=init_args)
            results = _ordered_results(pool, _batches(docs_iter, cfg.batch_docs, val_open), 4 * cfg.workers)
        else:  # in-process; let SentencePiece use its own threads for the encode
            _init_worker(*init_args[:4], -1)
            results = map(_process_batch, _batches(docs_iter, cfg.batch_docs, val_open))
        for batch in results:
            for info, ids, byte_counts in batch:
                n_in += 1
                tok_in += len(ids)
                reason = None
                if info is not None:
                    reason = info.reject or deduper.check(info)
                if reason is not None:
                    dropped_docs[reason] += 1
                    dropped_tokens[reason] += len(ids)
                    continue
                split = "val" if kept["val"] < cfg.val_docs else "train"
                if split == "val" and cfg.caseops and byte_counts is None:
                    raise AssertionError("a val document was encoded without its byte counts")
                writers[split].add(ids, byte_counts if split == "val" else None)
                kept[split] += 1
                kept_tokens[split] += len(ids)
            pbar.update(len(batch))
            pbar.set_postfix(kept=kept["val"] + kept["train"], refresh=False)
        for w in writers.values():
            w.close()
    finally:
        pbar.close()
        if pool is not None:
            pool.terminate()
    n_kept = kept["val"] + kept["train"]
    assert n_kept + sum(dropped_docs.values()) == n_in  # every document is accounted for exactly once
    return {
        "docs": {"input": n_in, "kept": n_kept, "val": kept["val"], "train": kept["train"],
                 "dropped": dropped_docs if cfg.curate else {}},
        "tokens": {"input": tok_in, "kept": kept_tokens["val"] + kept_tokens["train"], "val": kept_tokens["val"],
                   "train": kept_tokens["train"], "dropped": dropped_tokens if cfg.curate else {},
                   "note": "token counts include one BOS per document"},
        "shards": writers["val"].records + writers["train"].records,
        "sidecars": writers["val"].sidecar_records,
    }
