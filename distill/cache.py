"""Teacher targets in student space: the on-disk cache the trainer reads (format `distill-cache` v1).

Layout of a cache directory:
  manifest.json                    written last (its presence = the cache is complete): format version,
                                   teacher id/revision, backend + version, k, student tokenizer sha256,
                                   token shard names/sizes/sha256, projection version, chunk layout, stats
  chunks/s{shard:05d}/c{chunk:06d}.dkc   rows [chunk*chunk_rows, ...) of student shard `shard`

Row i of shard s is the target distribution for token i+1 of that shard: `k` student ids, their
probabilities, and the residual mass 1 - sum(probs) (everything else). Rows without a target (the shard's
last token, a token followed by BOS) have probs all 0 and residual 1.

Chunk file (no pickles): b"DKCH" | uint32 version | uint32 header_len | header JSON | zstd frame.
The frame holds, for R rows: flags uint8[R], then byte planes of the id deltas and the probability codes
(each a uint16 [R, k] array, transposed, low bytes then high bytes) — ids are sorted per row and
delta-coded so zstd sees small numbers; probabilities are stored as code = round(sqrt(p) * (2^bits-1)),
which bounds the absolute error by sqrt(p) / 2^bits (<= 2.5e-4 at 12 bits) while keeping relative precision
for small p. Codes are adjusted so that the dequantised row never sums above 1, and the residual is
recomputed on read as 1 - sum(dequantised probs), so probs + residual = 1 to float32 rounding.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.fsutil import sha256_bytes, sha256_file, write_bytes_atomic, write_json_atomic

FORMAT = "distill-cache"
FORMAT_VERSION = 1
CHUNK_MAGIC = b"DKCH"
CHUNK_VERSION = 1
DEFAULT_CHUNK_ROWS = 65536
DEFAULT_PROB_BITS = 12
DEFAULT_ZSTD_LEVEL = 12

# row flags (kd-method step 4)
FLAG_NONE = 0  # no target
FLAG_ALIGNED = 1  # the student token starts on a teacher token boundary
FLAG_INSIDE = 2  # the student token starts inside a teacher token


# ----------------------------------------------------------------------------- chunk encoding

def quantize_probs(ids: np.ndarray, probs: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by id and code its probabilities; return (ids uint16 [R,k], codes uint16 [R,k]).

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
    for _ in range(4 * ids.shape[1] + 4):  # each pass fixes one step per offending row
        deq = dequantize_codes(codes, bits)
        over = deq.sum(axis=1, dtype=np.float32) > np.float32(1.0)
        if not over.any():
            break
        rows = np.nonzero(over)[0]
        err = np.where(codes[rows] > 0, deq[rows].astype(np.float64) - probs[rows], -np.inf)
        cols = np.argmax(err, axis=1)
        codes[rows, cols] -= 1
    return ids.astype(np.uint16), codes.astype(np.uint16)


def dequantize_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Probability codes -> float32 probabilities (the one definition readers and writers share)."""
    x = codes.astype(np.float32) / np.float32((1 << bits) - 1)
    return x * x


def _planes(a: np.ndarray) -> bytes:
    """uint16 [R, k] -> transposed byte planes (all low bytes, then all high bytes)."""
    t = np.ascontiguousarray(a.T).astype("<u2", copy=False)
    b = t.view(np.uint8).reshape(-1, 2)
    return b[:, 0].tobytes() + b[:, 1].tobytes()


def _unplanes(buf: bytes, rows: int, k: int) -> np.ndarray:
    n = rows * k
    raw = np.frombuffer(buf, dtype=np.uint8)
    lo, hi = raw[:n].astype(np.uint16), raw[n:2 * n].astype(np.uint16)
    return (lo | (hi << 8)).reshape(k, rows).T


def encode_chunk(ids: np.ndarray, probs: np.ndarray, flags: np.ndarray, *, bits: int = DEFAULT_PROB_BITS,
                 level: int = DEFAULT_ZSTD_LEVEL, stats: dict | None = None) -> bytes:
    """Targets of R rows -> one chunk file's bytes."""
    import zstandard

    rows, k = ids.shape
    sids, codes = quantize_probs(ids, probs, bits)
    deltas = sids.copy()
    deltas[:, 1:] = sids[:, 1:] - sids[:, :-1]
    payload = np.asarray(flags, dtype=np.uint8).tobytes() + _planes(deltas) + _planes(codes)
    comp = zstandard.ZstdCompressor(level=level).compress(payload)
    header = json.dumps({"rows": rows, "k": k, "prob_bits": bits, "raw_bytes": len(payload),
                         "sha256": sha256_bytes(comp), "stats": stats or {}}, sort_keys=True).encode()
    return CHUNK_MAGIC + struct.pack("<II", CHUNK_VERSION, len(header)) + header + comp


def read_chunk_header(path: Path) -> tuple[dict, int]:
    """Validate a chunk's magic/version; return (header, payload offset)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != CHUNK_MAGIC:
            raise DistillError(f"{path}: not a cache chunk (bad magic)")
        version, hlen = struct.unpack("<II", head[4:])
        if version != CHUNK_VERSION:
            raise DistillError(f"{path}: unsupported chunk version {version} (expected {CHUNK_VERSION})")
        try:
            header = json.loads(f.read(hlen))
        except ValueError:
            raise DistillError(f"{path}: corrupt chunk header") from None
    return header, 12 + hlen


def decode_chunk(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk file -> (ids uint16 [R,k], probs float32 [R,k], residual float32 [R], flags uint8 [R])."""
    import zstandard

    header, off = read_chunk_header(path)
    comp = path.read_bytes()[off:]
    if sha256_bytes(comp) != header["sha256"]:
        raise DistillError(f"{path}: chunk checksum mismatch (corrupt file)")
    payload = zstandard.ZstdDecompressor().decompress(comp, max_output_size=header["raw_bytes"])
    rows, k, bits = header["rows"], header["k"], header["prob_bits"]
    flags = np.frombuffer(payload[:rows], dtype=np.uint8).copy()
    nb = 2 * rows * k
    deltas = _unplanes(payload[rows:rows + nb], rows, k)
    codes = _unplanes(payload[rows + nb:rows + 2 * nb], rows, k)
    ids = np.cumsum(deltas.astype(np.int64), axis=1).astype(np.uint16)
    probs = dequantize_codes(codes, bits)
    residual = (np.float32(1.0) - probs.sum(axis=1, dtype=np.float32)).astype(np.float32)
    return ids, probs, residual, flags


def chunk_path(cache_dir: str | os.PathLike, shard_index: int, chunk_index: int) -> Path:
    return Path(cache_dir) / "chunks" / f"s{shard_index:05d}" / f"c{chunk_index:06d}.dkc"


def write_chunk(cache_dir: str | os.PathLike, shard_index: int, chunk_index: int, ids: np.ndarray,
                probs: np.ndarray, flags: np.ndarray, *, bits: int = DEFAULT_PROB_BITS,
                level: int = DEFAULT_ZSTD_LEVEL, stats: dict | None = None) -> int:
    """Encode and atomically write one chunk; return its size in bytes."""
    data = encode_chunk(ids, probs, flags, bits=bits, level=level, stats=stats)
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
    """Assemble the manifest from the chunk files on disk (sizes + per-chunk stats, summed)."""
    totals: dict[str, float] = {}
    bytes_on_disk = 0
    for si, rec in enumerate(shard_recs):
        for ci in range(num_chunks(rec["tokens"], chunk_rows)):
            p = chunk_path(cache_dir, si, ci)
            if not p.is_file():
                raise DistillError(f"{p}: chunk missing (the run is incomplete; rerun the same command)")
            header, _ = read_chunk_header(p)
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
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
    N = that shard's token count. The residual argument is not stored (it is 1 - sum(probs) by definition);
    rows whose probs sum to 0 are 'no target'. `meta` goes into the manifest (e.g. teacher, backend)."""
    from distill.tokenizer import tokenizer_hash

    if len(targets) != len(shard_paths):
        raise DistillError(f"{out_dir}: {len(targets)} target arrays for {len(shard_paths)} shards")
    chunk_rows = int(meta.get("chunk_rows", DEFAULT_CHUNK_ROWS))
    bits = int(meta.get("prob_bits", DEFAULT_PROB_BITS))
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
            write_chunk(out_dir, si, ci, ids[sl], probs[sl], flags[sl], bits=bits)
    base_meta = {"teacher": {"id": "arrays", "revision": ""}, "backend": {"name": "arrays", "version": ""},
                 "projection": {"version": 0, "kind": "given"}}
    base_meta.update({key: v for key, v in meta.items() if key not in ("chunk_rows", "prob_bits")})
    manifest = build_manifest(out_dir, recs, tokenizer_hash(tokenizer_path), int(k or 0), chunk_rows, bits, base_meta)
    write_json_atomic(Path(out_dir) / "manifest.json", manifest)


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
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DistillError(f"{mpath}: unsupported cache format version {self.manifest.get('format_version')} "
                               f"(this build reads {FORMAT_VERSION})")
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

    def read_span(self, shard_index: int, start: int, end: int,
                  with_flags: bool = False) -> tuple[np.ndarray, ...]:
        """Rows [start, end) of shard `shard_index` -> (ids uint16 [n,k], probs f32 [n,k], residual f32 [n])
        (+ flags uint8 [n] with `with_flags`). Only the chunks overlapping the span are decompressed."""
        n = self.shard_tokens(shard_index)
        if not 0 <= start <= end <= n:
            raise DistillError(f"{self.dir}: span [{start}, {end}) outside shard {shard_index} ({n} rows)")
        parts = []
        for ci in range(start // self.chunk_rows, -(-end // self.chunk_rows)):
            c0 = ci * self.chunk_rows
            p = chunk_path(self.dir, shard_index, ci)
            if not p.is_file():
                raise DistillError(f"{p}: chunk missing (cache damaged)")
            arrs = decode_chunk(p)
            lo, hi = max(start - c0, 0), min(end - c0, arrs[0].shape[0])
            parts.append(tuple(a[lo:hi] for a in arrs))
        if not parts:
            parts = [(np.zeros((0, self.k), np.uint16), np.zeros((0, self.k), np.float32),
                      np.zeros(0, np.float32), np.zeros(0, np.uint8))]
        out = tuple(np.concatenate([p[j] for p in parts]) for j in range(4))
        return out if with_flags else out[:3]

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
