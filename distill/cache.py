"""Teacher targets in student space: the on-disk cache the trainer reads (format `distill-cache` v1 and v2).

Layout of a cache directory:
  manifest.json                    written last (its presence = the cache is complete): format version,
                                   teacher id/revision, backend + version, k, student tokenizer sha256,
                                   token shard names/sizes/sha256, projection version, chunk layout, stats
  chunks/s{shard:05d}/c{chunk:06d}.dkc   rows [chunk*chunk_rows, ...) of student shard `shard`

Row i of shard s is the target distribution for token i+1 of that shard: up to `k` student ids, their
probabilities, and the residual mass 1 - sum(probs) (everything else). Rows without a target (the shard's
last token, a token followed by BOS) have probs all 0 and residual 1. Slots with probability 0 are padding.

Chunk file (no pickles): b"DKCH" | uint32 version | uint32 header_len | header JSON | zstd frame(s).
Readers accept both versions; writers write v2 unless asked for v1 (`format_version=1`).

v1 (one frame): flags uint8[R], then byte planes of the id deltas and of the probability codes (each a
uint16 [R, k] array, transposed, low bytes then high bytes) — ids sorted per row and delta-coded;
code = round(sqrt(p) * (2^bits-1)). ~31 B/token at k=16 on real targets.

v2 (one zstd frame per block of `block_rows` rows, so a span decodes only the blocks it touches; each
block's row count, entry count, size and sha256 are in the header). Per row only the kept entries are stored:
entries with p < min_prob (default 2e-3) go into the residual (per-row adaptive k: ~8 of 16 on real rows),
and each kept p is a log code c in 1..levels (default 127): log p = log(min_prob)·(1 − (c−1)/(levels−1)),
relative error <= 2.5 %. A block of n rows holding E entries is: flags uint8[n] | counts uint8[n] |
id-delta low bytes uint8[E] | id-delta high bytes uint8[E] | codes uint8[E], each row's entries in
ascending id order, its first delta the id itself. Readers expand rows to [n, k] (id 0 / code 0 = empty slot).
13.7 B/token at k=16 on SmolLM2 FineWeb targets (v1: 26.4; docs/RESULTS.md).

Both versions: codes are adjusted so that the dequantised row never sums above 1, and the residual is
recomputed on read as 1 - sum(dequantised probs), so probs + residual = 1 to float32 rounding. Every zstd
frame is decompressed only after its declared content size has been checked against rows and k, and
decompression is capped at that size: a corrupt or hostile chunk is a one-line DistillError naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.fsutil import sha256_bytes, sha256_file, write_bytes_atomic, write_json_atomic

FORMAT = "distill-cache"
FORMAT_VERSION = 2  # what writers write by default
READ_VERSIONS = (1, 2)
CHUNK_MAGIC = b"DKCH"
DEFAULT_CHUNK_ROWS = 65536
DEFAULT_PROB_BITS = 12  # v1 only
DEFAULT_ZSTD_LEVEL = 12
DEFAULT_MIN_PROB = 2e-3  # v2: stored entries below this go into the residual
DEFAULT_LEVELS = 127  # v2: log-code levels (codes 1..levels; 0 = empty slot)
DEFAULT_BLOCK_ROWS = 8192  # v2: rows per zstd frame
MAX_ROWS = 1 << 24  # sanity bounds on a chunk header (a hostile header must not make us allocate)
MAX_K = 4096
MAX_K_V2 = 255  # v2 stores per-row entry counts in one byte

# row flags (kd-method step 4)
FLAG_NONE = 0  # no target
FLAG_ALIGNED = 1  # the student token starts on a teacher token boundary
FLAG_INSIDE = 2  # the student token starts inside a teacher token


# ----------------------------------------------------------------------------- probability codes

def quantize_probs(ids: np.ndarray, probs: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """v1: sort each row by id and code its probabilities; return (ids uint16 [R,k], codes uint16 [R,k]).

    The codes are adjusted (the element with the largest upward rounding error loses one step, repeated)
    until every dequantised row sums to <= 1, so the stored residual is never negative.
    """
    ids = np.asarray(ids, dtype=np.int64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    probs = np.take_along_axis(probs, order, axis=1)
    q = float((1 << bits) - 1)
    codes = np.rint(np.sqrt(probs) * q).astype(np.int64)
    codes = _fix_sums(codes, probs, dequantize_table(1, bits=bits))
    return ids.astype(np.uint16), codes.astype(np.uint16)


def _fix_sums(codes: np.ndarray, probs: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Lower codes (largest upward rounding error first, one step per pass) until each row sums to <= 1."""
    for _ in range(4 * codes.shape[1] + 4):  # each pass fixes one step per offending row
        deq = table[codes]
        over = deq.sum(axis=1, dtype=np.float32) > np.float32(1.0)
        if not over.any():
            break
        rows = np.nonzero(over)[0]
        err = np.where(codes[rows] > 0, deq[rows].astype(np.float64) - probs[rows], -np.inf)
        cols = np.argmax(err, axis=1)
        codes[rows, cols] -= 1
    return codes


def dequantize_table(version: int, bits: int = DEFAULT_PROB_BITS, levels: int = DEFAULT_LEVELS,
                     min_prob: float = DEFAULT_MIN_PROB) -> np.ndarray:
    """code -> float32 probability, one table per (version, parameters): the one definition readers,
    writers and the loader's on-device expansion share (a gather through it is the whole dequantisation)."""
    if version == 1:
        x = np.arange(1 << bits, dtype=np.float32) / np.float32((1 << bits) - 1)
        return x * x
    c = np.arange(levels + 1, dtype=np.float64)
    t = np.exp(np.log(min_prob) * (1.0 - (c - 1.0) / (levels - 1)))
    t[0] = 0.0
    return t.astype(np.float32)


def dequantize_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """v1 probability codes -> float32 probabilities (a gather through dequantize_table)."""
    return dequantize_table(1, bits=bits)[codes]


def quantize_probs_v2(ids: np.ndarray, probs: np.ndarray, levels: int = DEFAULT_LEVELS,
                      min_prob: float = DEFAULT_MIN_PROB) -> tuple[np.ndarray, np.ndarray]:
    """v2: order each row by probability (largest first), drop p < min_prob, log-code the rest;
    return (ids uint16 [R,k] with 0 at empty slots, codes uint8 [R,k] non-increasing, 0 = empty)."""
    ids = np.asarray(ids, dtype=np.int64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    probs = np.where(probs >= min_prob, probs, 0.0)
    log_floor = np.log(min_prob)
    with np.errstate(divide="ignore"):
        c = np.rint((np.log(np.maximum(probs, 1e-300)) - log_floor) / -log_floor * (levels - 1)) + 1
    codes = np.where(probs > 0, np.clip(c, 1, levels), 0).astype(np.int64)
    codes = _fix_sums(codes, probs, dequantize_table(2, levels=levels, min_prob=min_prob))
    order = np.argsort(-codes, axis=1, kind="stable")  # largest first; empty slots last
    codes = np.take_along_axis(codes, order, axis=1)
    ids = np.where(codes > 0, np.take_along_axis(ids, order, axis=1), 0)
    return ids.astype(np.uint16), codes.astype(np.uint8)


def roundtrip_probs(ids: np.ndarray, probs: np.ndarray, format_version: int = FORMAT_VERSION,
                    bits: int = DEFAULT_PROB_BITS, min_prob: float = DEFAULT_MIN_PROB
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probs) as a reader will see them after writing with `format_version` (for writers' stats)."""
    if format_version == 1:
        qids, codes = quantize_probs(ids, probs, bits)
        return qids, dequantize_codes(codes, bits)
    qids, codes = quantize_probs_v2(ids, probs, min_prob=min_prob)
    return qids, dequantize_table(2, min_prob=min_prob)[codes]


# ----------------------------------------------------------------------------- chunk encoding

def _planes(a: np.ndarray) -> bytes:
    """uint16 [R, k] -> transposed byte planes (all low bytes, then all high bytes)."""
    t = np.ascontiguousarray(a.T).astype("<u2", copy=False)
    b = t.view(np.uint8).reshape(-1, 2)
    return b[:, 0].tobytes() + b[:, 1].tobytes()


def encode_chunk(ids: np.ndarray, probs: np.ndarray, flags: np.ndarray, *, bits: int = DEFAULT_PROB_BITS,
                 level: int = DEFAULT_ZSTD_LEVEL, stats: dict | None = None, format_version: int = FORMAT_VERSION,
                 min_prob: float = DEFAULT_MIN_PROB, levels: int = DEFAULT_LEVELS,
                 block_rows: int = DEFAULT_BLOCK_ROWS) -> bytes:
    """Targets of R rows -> one chunk file's bytes (v2 unless format_version=1; `bits` is v1's code width)."""
    import zstandard

    rows, k = ids.shape
    cctx = zstandard.ZstdCompressor(level=level)
    flags = np.asarray(flags, dtype=np.uint8)
    if format_version == 1:
        sids, codes = quantize_probs(ids, probs, bits)
        deltas = sids.copy()
        deltas[:, 1:] = sids[:, 1:] - sids[:, :-1]
        payload = flags.tobytes() + _planes(deltas) + _planes(codes)
        comp = cctx.compress(payload)
        header = {"rows": rows, "k": k, "prob_bits": bits, "raw_bytes": len(payload), "sha256": sha256_bytes(comp),
                  "stats": stats or {}}
        frames = [comp]
    elif format_version == 2:
        if not 2 <= levels <= 255 or not 0 < min_prob < 1:
            raise DistillError(f"levels {levels} / min_prob {min_prob}: need 2 <= levels <= 255, 0 < min_prob < 1")
        if k > MAX_K_V2:
            raise DistillError(f"k {k}: format 2 stores at most {MAX_K_V2} entries per row (use format 1)")
        qids, codes = quantize_probs_v2(ids, probs, levels, min_prob)
        kept = codes > 0
        # entries of a row in ascending id order (empty slots last), ids delta-coded within the row
        order = np.argsort(np.where(kept, qids.astype(np.int64), 1 << 20), axis=1, kind="stable")
        sids = np.take_along_axis(qids, order, axis=1).astype(np.int64)
        scodes = np.take_along_axis(codes, order, axis=1)
        d = sids.copy()
        d[:, 1:] = sids[:, 1:] - sids[:, :-1]
        counts = kept.sum(axis=1).astype(np.uint8)
        frames, blocks = [], []
        for b0 in range(0, max(rows, 1), block_rows):
            sl = slice(b0, min(b0 + block_rows, rows))
            m = np.arange(k)[None, :] < counts[sl, None].astype(np.int64)  # the kept slots, row-major
            dd, cc = d[sl][m].astype("<u2"), scodes[sl][m]
            raw = (flags[sl].tobytes() + counts[sl].tobytes() + (dd & 0xFF).astype(np.uint8).tobytes()
                   + (dd >> 8).astype(np.uint8).tobytes() + cc.tobytes())
            comp = cctx.compress(raw)
            frames.append(comp)
            blocks.append({"rows": sl.stop - sl.start, "entries": int(m.sum()), "bytes": len(comp),
                           "sha256": sha256_bytes(comp)})
        header = {"rows": rows, "k": k, "levels": levels, "min_prob": min_prob, "blocks": blocks,
                  "stats": stats or {}}
    else:
        raise DistillError(f"format_version {format_version}: this build writes 1 or 2")
    hb = json.dumps(header, sort_keys=True).encode()
    return CHUNK_MAGIC + struct.pack("<II", format_version, len(hb)) + hb + b"".join(frames)


def _read_head(f) -> bytes:
    """The magic, version, header length and header JSON of an open chunk file (at most 16 MiB of header)."""
    head = f.read(12)
    if len(head) == 12 and head[:4] == CHUNK_MAGIC:
        hlen = struct.unpack("<I", head[8:12])[0]
        head += f.read(min(hlen, 1 << 24))
    return head


def read_chunk_header(path: Path, data: bytes | None = None) -> tuple[dict, int]:
    """Validate a chunk's magic/version/header; return (header + "version", payload offset)."""
    if data is None:
        with open(path, "rb") as f:
            data = _read_head(f)
    if len(data) < 12 or data[:4] != CHUNK_MAGIC:
        raise DistillError(f"{path}: not a cache chunk (bad magic)")
    version, hlen = struct.unpack("<II", data[4:12])
    if version not in READ_VERSIONS:
        raise DistillError(f"{path}: unsupported chunk version {version} (this build reads {READ_VERSIONS})")
    try:
        header = json.loads(data[12:12 + hlen])
        rows, k = int(header["rows"]), int(header["k"])
        if not (0 <= rows <= MAX_ROWS and 1 <= k <= MAX_K):
            raise ValueError
        if version == 1:
            bits = int(header["prob_bits"])
            if not 1 <= bits <= 16 or int(header["raw_bytes"]) != rows + 4 * rows * k:
                raise ValueError
        else:
            if not 2 <= int(header["levels"]) <= 255 or not 0 < float(header["min_prob"]) < 1:
                raise ValueError
            blocks = header["blocks"]
            if k > MAX_K_V2 or sum(int(b["rows"]) for b in blocks) != rows or any(
                    int(b["rows"]) < 0 or int(b["bytes"]) < 0 or not 0 <= int(b["entries"]) <= int(b["rows"]) * k
                    for b in blocks):
                raise ValueError
    except (ValueError, KeyError, TypeError):
        raise DistillError(f"{path}: corrupt chunk header") from None
    header["version"] = version
    return header, 12 + hlen


def _decompress(path: Path, comp: bytes, expected: int) -> bytes:
    """One zstd frame -> exactly `expected` bytes, never more (the frame's own declared size is checked first)."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(comp)
    except zstandard.ZstdError:
        raise DistillError(f"{path}: corrupt chunk (bad zstd frame)") from None
    if declared not in (-1, expected):
        raise DistillError(f"{path}: corrupt chunk (frame declares {declared} bytes, header implies {expected})")
    try:
        out = zstandard.ZstdDecompressor().decompress(comp, max_output_size=expected)
    except zstandard.ZstdError:
        raise DistillError(f"{path}: corrupt chunk (zstd frame does not decode to {expected} bytes)") from None
    if len(out) != expected:
        raise DistillError(f"{path}: corrupt chunk (frame decodes to {len(out)} bytes, expected {expected})")
    return out


def _frame_bound(raw: int) -> int:
    """The most bytes a zstd frame of `raw` content bytes can take (zstd's compress bound, with slack)."""
    return raw + (raw >> 8) + 1024


def _read_exact(f, path: Path, pos: int, size: int) -> bytes:
    f.seek(pos)
    data = f.read(size)
    if len(data) != size:
        raise DistillError(f"{path}: chunk truncated ({len(data)} of {size} bytes at offset {pos})")
    return data


def decode_chunk_codes(path: Path, lo: int = 0, hi: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [lo, hi) of a chunk in compact form: (ids uint16 [n,k], codes uint8|uint16 [n,k], flags uint8 [n],
    table float32) with probs = table[codes]. Only the bytes those rows need are read (v2: the header and the
    blocks overlapping the rows) and decompressed; no read exceeds what the header's row and entry counts
    allow, so a hostile file cannot make the reader allocate more."""
    path = Path(path)
    with open(path, "rb") as f:
        return _decode_open_chunk(f, path, lo, hi)


def _decode_open_chunk(f, path: Path, lo: int, hi: int | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """decode_chunk_codes on an open file (the file stays open for the seeks into its blocks)."""
    header, off = read_chunk_header(path, _read_head(f))
    rows, k = header["rows"], header["k"]
    hi = rows if hi is None else hi
    if not 0 <= lo <= hi <= rows:
        raise DistillError(f"{path}: rows [{lo}, {hi}) outside chunk ({rows} rows)")
    if header["version"] == 1:
        size = os.fstat(f.fileno()).st_size - off
        if not 0 < size <= _frame_bound(rows + 4 * rows * k):
            raise DistillError(f"{path}: corrupt chunk ({size} payload bytes for {rows} rows of k {k})")
        comp = _read_exact(f, path, off, size)
        if sha256_bytes(comp) != header["sha256"]:
            raise DistillError(f"{path}: chunk checksum mismatch (corrupt file)")
        payload = _decompress(path, comp, rows + 4 * rows * k)
        raw = np.frombuffer(payload, dtype=np.uint8)
        n = rows * k
        flags = raw[lo:hi].copy()
        planes = [raw[rows + i * n:rows + (i + 1) * n].reshape(k, rows)[:, lo:hi] for i in range(4)]
        deltas = planes[0].astype(np.uint16) | (planes[1].astype(np.uint16) << 8)  # (k, n) slot-major
        np.cumsum(deltas, axis=0, dtype=np.uint16, out=deltas)  # contiguous-axis prefix sum (mod 2^16)
        codes = planes[2].astype(np.uint16) | (planes[3].astype(np.uint16) << 8)
        return (np.ascontiguousarray(deltas.T), np.ascontiguousarray(codes.T), flags,
                dequantize_table(1, bits=int(header["prob_bits"])))
    levels = int(header["levels"])
    ids = np.zeros((hi - lo, k), np.uint16)
    codes = np.zeros((hi - lo, k), np.uint8)
    flags = np.zeros(hi - lo, np.uint8)
    b0, pos = 0, off
    for blk in header["blocks"]:
        nb, ne, size = int(blk["rows"]), int(blk["entries"]), int(blk["bytes"])
        b1 = b0 + nb
        if b1 > lo and b0 < hi:
            if size > _frame_bound(2 * nb + 3 * ne):
                raise DistillError(f"{path}: corrupt chunk (block of {size} bytes for {nb} rows, {ne} entries)")
            comp = _read_exact(f, path, pos, size)
            if sha256_bytes(comp) != blk["sha256"]:
                raise DistillError(f"{path}: chunk checksum mismatch (corrupt file)")
            raw = np.frombuffer(_decompress(path, comp, 2 * nb + 3 * ne), dtype=np.uint8)
            counts = raw[nb:2 * nb].astype(np.int64)
            if int(counts.sum()) != ne or (nb and int(counts.max()) > k):
                raise DistillError(f"{path}: corrupt chunk (entry counts disagree with the header)")
            d = raw[2 * nb:2 * nb + ne].astype(np.uint16) | (raw[2 * nb + ne:2 * nb + 2 * ne].astype(np.uint16) << 8)
            c = raw[2 * nb + 2 * ne:]
            if ne and (int(c.min()) < 1 or int(c.max()) > levels):
                raise DistillError(f"{path}: corrupt chunk (code outside 1..{levels})")
            # per-row prefix sums of the id deltas, as one running sum minus each row's starting value
            run = np.cumsum(d, dtype=np.int64)
            ends = np.cumsum(counts)
            before = np.concatenate(([0], run))[ends - counts]
            flat_ids = run - np.repeat(before, counts)
            a, b = max(lo - b0, 0), min(hi, b1) - b0
            m = np.arange(k)[None, :] < counts[a:b, None]
            e0, e1 = int(ends[a] - counts[a]) if b > a else 0, int(ends[b - 1]) if b > a else 0
            o = b0 + a - lo
            ids[o:o + b - a][m] = flat_ids[e0:e1]
            codes[o:o + b - a][m] = c[e0:e1]
            flags[o:o + b - a] = raw[a:b]
        b0, pos = b1, pos + size
    return ids, codes, flags, dequantize_table(2, levels=levels, min_prob=float(header["min_prob"]))


def expand_codes(codes: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probs float32 [n,k], residual float32 [n]) from codes and their table."""
    probs = table[codes]
    residual = (np.float32(1.0) - probs.sum(axis=1, dtype=np.float32)).astype(np.float32)
    return probs, residual


def decode_chunk(path: Path, lo: int = 0, hi: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [lo, hi) of one chunk file -> (ids uint16 [n,k], probs float32 [n,k], residual float32 [n],
    flags uint8 [n])."""
    ids, codes, flags, table = decode_chunk_codes(path, lo, hi)
    probs, residual = expand_codes(codes, table)
    return ids, probs, residual, flags


def chunk_path(cache_dir: str | os.PathLike, shard_index: int, chunk_index: int) -> Path:
    return Path(cache_dir) / "chunks" / f"s{shard_index:05d}" / f"c{chunk_index:06d}.dkc"


def write_chunk(cache_dir: str | os.PathLike, shard_index: int, chunk_index: int, ids: np.ndarray,
                probs: np.ndarray, flags: np.ndarray, *, bits: int = DEFAULT_PROB_BITS,
                level: int = DEFAULT_ZSTD_LEVEL, stats: dict | None = None, **encode_kw) -> int:
    """Encode and atomically write one chunk; return its size in bytes. `encode_kw`: encode_chunk's
    format_version / min_prob / levels / block_rows."""
    data = encode_chunk(ids, probs, flags, bits=bits, level=level, stats=stats, **encode_kw)
    write_bytes_atomic(chunk_path(cache_dir, shard_index, chunk_index), data)
    return len(data)


# ----------------------------------------------------------------------------- manifest

def shard_record(path: str | os.PathLike) -> dict:
    """Name, token count, byte size and sha256 of a token shard (the identity check_shards compares)."""
    from distill.shards import read_header

    p = Path(path)
    n = read_header(p)
    return {"name": p.name, "tokens": n, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def num_chunks(tokens: int, chunk_rows: int) -> int:
    return max(1, -(-tokens // chunk_rows))


def build_manifest(cache_dir: str | os.PathLike, shard_recs: list[dict], tokenizer_sha256: str, k: int,
                   chunk_rows: int, prob_bits: int, meta: dict) -> dict:
    """Assemble the manifest from the chunk files on disk (sizes + per-chunk stats, summed). The format
    version is the chunks' (all must agree)."""
    totals: dict[str, float] = {}
    bytes_on_disk = 0
    versions: set[int] = set()
    for si, rec in enumerate(shard_recs):
        for ci in range(num_chunks(rec["tokens"], chunk_rows)):
            p = chunk_path(cache_dir, si, ci)
            if not p.is_file():
                raise DistillError(f"{p}: chunk missing (the run is incomplete; rerun the same command)")
            header, _ = read_chunk_header(p)
            versions.add(header["version"])
            bytes_on_disk += p.stat().st_size
            for key, v in header.get("stats", {}).items():
                totals[key] = totals.get(key, 0.0) + float(v)
    tokens = sum(r["tokens"] for r in shard_recs)
    stats = dict(totals)
    rows_target = totals.get("rows_with_target", 0.0)
    if rows_target:
        stats["aligned_fraction"] = totals.get("rows_aligned", 0.0) / rows_target
    if totals.get("target_bytes"):
        ln2_bytes = np.log(2.0) * totals["target_bytes"]
        stats["projected_teacher_bpb"] = totals.get("projected_nll_nats", 0.0) / ln2_bytes
    if totals.get("teacher_text_bytes"):
        stats["teacher_bpb"] = totals.get("teacher_nll_nats", 0.0) / (np.log(2.0) * totals["teacher_text_bytes"])
    stats["tokens"] = tokens
    stats["bytes_on_disk"] = bytes_on_disk
    stats["bytes_per_token"] = bytes_on_disk / max(tokens, 1)
    if len(versions) > 1:
        raise DistillError(f"{cache_dir}: chunks of several format versions {sorted(versions)} (rewrite the cache)")
    return {
        "format": FORMAT,
        "format_version": versions.pop() if versions else FORMAT_VERSION,
        **meta,
        "k": k,
        "chunk_rows": chunk_rows,
        "prob_bits": prob_bits,
        "student_tokenizer_sha256": tokenizer_sha256,
        "shards": shard_recs,
        "stats": stats,
    }


def write_cache_from_arrays(out_dir: str | os.PathLike, shard_paths: Sequence[str | os.PathLike],
                            tokenizer_path: str | os.PathLike,
                            targets: list[tuple[np.ndarray, np.ndarray, np.ndarray]], meta: dict) -> None:
    """Write a complete cache from in-memory targets: one (ids [N,k], probs [N,k], residual [N]) per shard,
    N = that shard's token count. meta may set chunk_rows, prob_bits (v1), format_version (default 2),
    min_prob, levels, block_rows (v2), zstd_level. The residual argument is not stored (it is 1 - sum(probs) by definition);
    rows whose probs sum to 0 are 'no target'. `meta` goes into the manifest (e.g. teacher, backend)."""
    from distill.tokenizer import tokenizer_hash

    if len(targets) != len(shard_paths):
        raise DistillError(f"{out_dir}: {len(targets)} target arrays for {len(shard_paths)} shards")
    chunk_rows = int(meta.get("chunk_rows", DEFAULT_CHUNK_ROWS))
    bits = int(meta.get("prob_bits", DEFAULT_PROB_BITS))
    enc = {key: meta[key] for key in ("format_version", "min_prob", "levels", "block_rows") if key in meta}
    level = int(meta.get("zstd_level", DEFAULT_ZSTD_LEVEL))
    recs = [shard_record(p) for p in shard_paths]
    k = None
    for si, ((ids, probs, _res), rec) in enumerate(zip(targets, recs)):
        ids, probs = np.asarray(ids), np.asarray(probs, dtype=np.float32)
        if ids.shape[0] != rec["tokens"] or probs.shape != ids.shape:
            raise DistillError(f"{shard_paths[si]}: targets have {ids.shape[0]} rows, shard has {rec['tokens']} tokens")
        k = ids.shape[1]
        flags = np.where(probs.sum(axis=1) > 0, FLAG_ALIGNED, FLAG_NONE).astype(np.uint8)
        for ci in range(num_chunks(rec["tokens"], chunk_rows)):
            sl = slice(ci * chunk_rows, (ci + 1) * chunk_rows)
            write_chunk(out_dir, si, ci, ids[sl], probs[sl], flags[sl], bits=bits, level=level, **enc)
    base_meta = {"teacher": {"id": "arrays", "revision": ""}, "backend": {"name": "arrays", "version": ""},
                 "projection": {"version": 0, "kind": "given"}}
    base_meta.update({key: v for key, v in meta.items()
                      if key not in ("chunk_rows", "prob_bits", "format_version", "block_rows", "zstd_level")})
    manifest = build_manifest(out_dir, recs, tokenizer_hash(tokenizer_path), int(k or 0), chunk_rows, bits, base_meta)
    write_json_atomic(Path(out_dir) / "manifest.json", manifest)


def convert_cache(src: str | os.PathLike, dst: str | os.PathLike, format_version: int = FORMAT_VERSION,
                  min_prob: float = DEFAULT_MIN_PROB, level: int = DEFAULT_ZSTD_LEVEL, progress: bool = True,
                  levels: int = DEFAULT_LEVELS) -> dict:
    """Rewrite the complete cache `src` as `dst` in `format_version`, chunk by chunk (each written atomically;
    a rerun resumes, the manifest comes last). Targets are the source's as read back (dequantised), so
    converting format 1 -> 2 costs only format 2's own rounding; per-chunk stats (teacher NLL, alignment)
    are carried over from the source. Returns the new manifest."""
    from tqdm import tqdm

    reader = CacheReader(src)
    out = Path(dst)
    if out.resolve() == reader.dir.resolve():
        raise DistillError(f"{dst}: converting a cache onto itself")
    if (out / "manifest.json").is_file():
        raise DistillError(f"{dst}: already holds a complete cache (choose a new --out)")
    m = reader.manifest
    plan = {"source": str(reader.dir.resolve()), "source_format_version": reader.format_version,
            "format_version": format_version, "min_prob": min_prob, "levels": levels,
            "shards": [s["sha256"] for s in m["shards"]]}
    plan_path = out / "convert_plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise DistillError(f"{dst}: holds a conversion with other settings; use a new --out")
    write_json_atomic(plan_path, plan)
    todo = [(si, ci) for si, rec in enumerate(m["shards"]) for ci in range(num_chunks(rec["tokens"], reader.chunk_rows))]
    for si, ci in tqdm(todo, desc="convert", unit="chunk", disable=not progress, file=sys.stderr):
        if chunk_path(out, si, ci).is_file():
            continue
        p = chunk_path(reader.dir, si, ci)
        header, _ = read_chunk_header(p)
        ids, probs, _res, flags = decode_chunk(p)
        write_chunk(out, si, ci, ids, probs, flags, level=level, stats=header.get("stats", {}),
                    format_version=format_version, min_prob=min_prob, levels=levels)
    meta = {key: v for key, v in m.items() if key not in ("format", "format_version", "k", "chunk_rows", "prob_bits",
                                                          "student_tokenizer_sha256", "shards", "stats")}
    meta["converted_from"] = {"format_version": reader.format_version, "dir": str(reader.dir)}
    manifest = build_manifest(out, m["shards"], m["student_tokenizer_sha256"], reader.k, reader.chunk_rows,
                              int(m.get("prob_bits", DEFAULT_PROB_BITS)), meta)
    write_json_atomic(out / "manifest.json", manifest)
    plan_path.unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------- reading

class CacheReader:
    """Read a complete cache: spans of rows without decompressing whole shards."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            if (self.dir / "chunks").is_dir():
                raise DistillError(f"{self.dir}: cache is incomplete (no manifest.json; rerun the precompute)")
            raise DistillError(f"{self.dir}: not a teacher cache (no manifest.json)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except ValueError:
            raise DistillError(f"{mpath}: corrupt manifest (not JSON)") from None
        if self.manifest.get("format") != FORMAT:
            raise DistillError(f"{mpath}: not a {FORMAT} manifest")
        if self.manifest.get("format_version") not in READ_VERSIONS:
            raise DistillError(f"{mpath}: unsupported cache format version {self.manifest.get('format_version')} "
                               f"(this build reads {READ_VERSIONS})")
        self.format_version: int = int(self.manifest["format_version"])
        self.k: int = int(self.manifest["k"])
        self.chunk_rows: int = int(self.manifest["chunk_rows"])
        self._shards: list[dict] = self.manifest["shards"]
        self.num_shards = len(self._shards)

    def shard_tokens(self, shard_index: int) -> int:
        self._check_index(shard_index)
        return int(self._shards[shard_index]["tokens"])

    def _check_index(self, shard_index: int) -> None:
        if not 0 <= shard_index < self.num_shards:
            raise DistillError(f"{self.dir}: shard index {shard_index} out of range (cache has {self.num_shards})")

    def read_span_codes(self, shard_index: int, start: int, end: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, end) in compact form: (ids uint16 [n,k], codes [n,k], flags uint8 [n], table float32),
        probs = table[codes]. Only the chunks (v2: blocks) overlapping the span are decompressed."""
        n = self.shard_tokens(shard_index)
        if not 0 <= start <= end <= n:
            raise DistillError(f"{self.dir}: span [{start}, {end}) outside shard {shard_index} ({n} rows)")
        parts, table = [], None
        for ci in range(start // self.chunk_rows, -(-end // self.chunk_rows)):
            c0 = ci * self.chunk_rows
            p = chunk_path(self.dir, shard_index, ci)
            if not p.is_file():
                raise DistillError(f"{p}: chunk missing (cache damaged)")
            ids, codes, flags, t = decode_chunk_codes(p, max(start - c0, 0), min(end, c0 + self.chunk_rows) - c0)
            if ids.shape[1] != self.k or (table is not None and not np.array_equal(t, table)):
                raise DistillError(f"{p}: chunk layout differs from the manifest's (k {ids.shape[1]} vs {self.k})")
            table = t
            parts.append((ids, codes, flags))
        if not parts:
            return (np.zeros((0, self.k), np.uint16), np.zeros((0, self.k), np.uint8), np.zeros(0, np.uint8),
                    np.zeros(1, np.float32))
        if len(parts) == 1:
            return (*parts[0], table)
        return (*(np.concatenate([p[j] for p in parts]) for j in range(3)), table)

    def read_span(self, shard_index: int, start: int, end: int,
                  with_flags: bool = False) -> tuple[np.ndarray, ...]:
        """Rows [start, end) of shard `shard_index` -> (ids uint16 [n,k], probs f32 [n,k], residual f32 [n])
        (+ flags uint8 [n] with `with_flags`). Only the chunks overlapping the span are decompressed."""
        ids, codes, flags, table = self.read_span_codes(shard_index, start, end)
        probs, residual = expand_codes(codes, table)
        return (ids, probs, residual, flags) if with_flags else (ids, probs, residual)

    def check_shards(self, paths: Sequence[str | os.PathLike], tokenizer_path: str | os.PathLike | None = None) -> None:
        """Refuse (DistillError) unless `paths` are exactly the cache's token shards (by name, size, sha256)
        and `tokenizer_path` (if given) is the student tokenizer the cache was built for."""
        if tokenizer_path is not None:
            h = sha256_file(tokenizer_path) if Path(tokenizer_path).is_file() else None
            if h != self.manifest.get("student_tokenizer_sha256"):
                raise DistillError(f"{tokenizer_path}: not the student tokenizer cache {self.dir} was built with")
        names = [Path(p).name for p in paths]
        expected = [s["name"] for s in self._shards]
        if sorted(names) != sorted(expected):
            raise DistillError(f"{self.dir}: cache was built for shards {expected[:3]}{'...' if len(expected) > 3 else ''}, "
                               f"got {names[:3]}{'...' if len(names) > 3 else ''}")
        for p in paths:
            rec = self._shards[self.shard_index_of(p)]
            if Path(p).stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
                raise DistillError(f"{p}: contents differ from the shard cache {self.dir} was built from")

    def shard_index_of(self, path: str | os.PathLike) -> int:
        name = Path(path).name
        for i, s in enumerate(self._shards):
            if s["name"] == name:
                return i
        raise DistillError(f"{path}: shard not in cache {self.dir}")


def load_targets(cache_dir: str | os.PathLike, shard_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows of one shard: (ids uint16 [N, k], probs float32 [N, k], residual float32 [N])."""
    r = CacheReader(cache_dir)
    return r.read_span(shard_index, 0, r.shard_tokens(shard_index))  # type: ignore[return-value]
