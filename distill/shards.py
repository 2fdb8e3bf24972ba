"""The challenge's token shard format (openai/parameter-golf `data/`).

Layout: 256 little-endian int32 header = [20240520, 1, num_tokens, 0, ...] (1,024 bytes), then num_tokens
little-endian uint16 token ids. File size must equal 1024 + 2 * num_tokens. Documents are packed as
[BOS=1] + tokens with no EOS; a document may straddle two shards.

Byte sidecar (the CaseOps records' format): `fineweb_val_bytes_XXXXXX.bin` beside `fineweb_val_XXXXXX.bin`,
the same header and layout, one uint16 per token = the ORIGINAL text's UTF-8 bytes that token stands for
(BOS = 0; see distill.caseops). When present, bpb counts these bytes instead of the tokenizer's LUT bytes,
because a transformed text's pieces no longer spell the original bytes. Sidecars are never token shards:
globs skip them.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.fsutil import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 65536


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` (any int array with values < 65536) as one shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise DistillError(f"{path}: token ids must lie in [0, {MAX_VOCAB})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and the file size; return num_tokens."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: shard not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DistillError(f"{path}: truncated shard ({size} bytes, header needs {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise DistillError(f"{path}: not a shard (magic {int(header[0])}, expected {MAGIC})")
    if int(header[1]) != VERSION:
        raise DistillError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise DistillError(
            f"{path}: truncated or corrupt shard (header says {n} tokens = {HEADER_BYTES + 2 * n} bytes, "
            f"file has {size})"
        )
    return n


def read_shard(path: str | os.PathLike, vocab_size: int | None = None, mmap: bool = True) -> np.ndarray:
    """Return the shard's tokens as a uint16 array (memory-mapped by default), validated.

    With `vocab_size`, any id >= vocab_size is refused (one line naming the file, the id and the position).
    """
    n = read_header(path)
    if mmap and n > 0:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    else:
        tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if vocab_size is not None and n > 0:
        mx = int(tokens.max())
        if mx >= vocab_size:
            pos = int(np.argmax(np.asarray(tokens) >= vocab_size))
            raise DistillError(
                f"{path}: token id {mx} at position {pos} is outside the tokenizer's vocab (size {vocab_size})"
            )
    return tokens


_SIDECAR_RE = re.compile(r"^(?P<stem>.+)_bytes_(?P<index>\d+)\.bin$")


def is_sidecar(path: str | os.PathLike) -> bool:
    """A byte sidecar's name: <prefix>_bytes_<index>.bin (e.g. fineweb_val_bytes_000000.bin)."""
    return _SIDECAR_RE.match(Path(path).name) is not None


def sidecar_path(shard: str | os.PathLike) -> Path | None:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin, in the same folder (None: a shard name
    not ending in _<index>.bin has no sidecar)."""
    shard = Path(shard)
    m = re.match(r"^(?P<stem>.+)_(?P<index>\d+)\.bin$", shard.name)
    return None if m is None else shard.with_name(f"{m['stem']}_bytes_{m['index']}.bin")


def resolve_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand a glob (or a list of paths/globs) to a sorted list of shard paths; refuse an empty match.
    Byte sidecars matched by a glob (fineweb_val_*.bin also matches fineweb_val_bytes_*.bin) are left out."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    paths: list[Path] = []
    for p in patterns:
        hits = sorted(_glob.glob(str(p)))
        if _glob.has_magic(str(p)):
            hits = [h for h in hits if not is_sidecar(h)]
        if not hits:
            raise DistillError(f"{p}: no shard files match")
        paths.extend(Path(h) for h in hits)
    return sorted(set(paths), key=lambda p: str(p))


def load_tokens(pattern: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int | None = None) -> np.ndarray:
    """Concatenate every matching shard in sorted order (the challenge's validation order)."""
    parts = [np.asarray(read_shard(p, vocab_size=vocab_size)) for p in resolve_shards(pattern)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def shard_name(split: str, index: int) -> str:
    """The challenge's file naming: fineweb_{train,val}_{index:06d}.bin."""
    return f"fineweb_{split}_{index:06d}.bin"


def sidecar_name(split: str, index: int) -> str:
    """The CaseOps records' sidecar naming: fineweb_{split}_bytes_{index:06d}.bin."""
    return f"fineweb_{split}_bytes_{index:06d}.bin"


def read_sidecar(path: str | os.PathLike, tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """One sidecar, validated against its token shard's `tokens`: same length, 0 at every BOS."""
    path = Path(path)
    counts = np.asarray(read_shard(path, mmap=False))
    if len(counts) != len(tokens):
        raise DistillError(f"{path}: byte sidecar has {len(counts)} entries but its shard has {len(tokens)} tokens")
    bad = np.flatnonzero((np.asarray(tokens) == bos_id) & (counts != 0))
    if bad.size:
        raise DistillError(f"{path}: byte sidecar gives {int(counts[bad[0]])} bytes to the BOS at position "
                           f"{int(bad[0])} (must be 0: sidecar not aligned with its shard)")
    return counts


def load_byte_counts(shards: Sequence[str | os.PathLike], tokens: Sequence[np.ndarray] | None = None) -> np.ndarray | None:
    """The concatenated original-byte sidecars of `shards` (in their order), or None when none has one.
    Some shards with a sidecar and some without is refused: the byte count would mix two definitions."""
    shards = [Path(p) for p in shards]
    cars = [sidecar_path(p) for p in shards]
    present = [c is not None and c.is_file() for c in cars]
    if not any(present):
        return None
    if not all(present):
        k = present.index(False)
        raise DistillError(f"{cars[k] or shards[k]}: byte sidecar missing (other val shards have one; all or none must)")
    toks = tokens if tokens is not None else [read_shard(p) for p in shards]
    parts = [read_sidecar(c, t) for c, t in zip(cars, toks)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_val(pattern: str | os.PathLike | Sequence[str | os.PathLike],
             vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The val stream and, when its shards have sidecars, the aligned original-byte counts (else None):
    pass both to distill.metric.evaluate_bpb(tokens, ..., byte_counts=counts), slicing them alike."""
    shards = resolve_shards(pattern)
    parts = [np.asarray(read_shard(p, vocab_size=vocab_size)) for p in shards]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return tokens, load_byte_counts(shards, parts)
