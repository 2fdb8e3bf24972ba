"""Shard format + tokenizer LUTs against the challenge's official numbers.  Run: pytest -q tests/test_formats.py"""

from __future__ import annotations

import numpy as np
import pytest

from distill.errors import DistillError
from distill.shards import HEADER_BYTES, MAGIC, read_shard, write_shard
from distill.tokenizer import build_luts, encode_docs, load_tokenizer, pack_docs


def test_shard_roundtrip(tmp_path):
    toks = np.array([1, 5, 1023, 7, 1, 2], dtype=np.uint16)
    p = tmp_path / "s.bin"
    write_shard(p, toks)
    assert p.stat().st_size == HEADER_BYTES + 2 * len(toks)
    header = np.fromfile(p, dtype="<i4", count=3)
    assert list(header) == [MAGIC, 1, len(toks)]
    assert np.array_equal(read_shard(p, vocab_size=1024), toks)


@pytest.mark.parametrize("case", ["truncated", "magic", "vocab"])
def test_shard_bad_input(tmp_path, case):
    p = tmp_path / "s.bin"
    write_shard(p, np.arange(10, dtype=np.uint16))
    raw = bytearray(p.read_bytes())
    if case == "truncated":
        raw = raw[:-3]
    elif case == "magic":
        raw[0] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match=str(p)):
        read_shard(p, vocab_size=5 if case == "vocab" else None)


def test_official_lut_bytes(sp1024_path, val_head_shard):
    sp = load_tokenizer(sp1024_path)
    luts = build_luts(sp, 1024)
    t = np.asarray(read_shard(val_head_shard, vocab_size=1024))
    assert int(luts.target_bytes(t[:-1], t[1:]).sum()) == 315_257


def test_sp1024_reencodes_val_head(sp1024_path, val_head_shard, val_head_docs):
    sp = load_tokenizer(sp1024_path)
    ids = pack_docs(encode_docs(sp, val_head_docs))
    t = np.asarray(read_shard(val_head_shard))
    assert np.array_equal(ids[: len(t)], t)
