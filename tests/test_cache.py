"""The student-space teacher cache format (distill/cache.py) and `distill cache info`.

Run: python -m pytest -q tests/test_cache.py      (~5 s)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from distill import cache as dc
from distill.cli import main as cli_main
from distill.errors import DistillError
from distill.shards import write_shard

VOCAB = 1024


def _targets(rng, n: int, k: int, temp: float = 2.0):
    """Realistic-ish rows: softmax of random logits, top-k, a few rows without target."""
    logits = rng.normal(size=(n, VOCAB)) * temp
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :k]
    probs = np.take_along_axis(p, ids, 1).astype(np.float32)
    probs[::97] = 0.0  # rows without a target
    probs[-1] = 0.0
    return ids, probs, (1 - probs.sum(1)).astype(np.float32)


@pytest.fixture()
def small_cache(tmp_path, sp1024_path):
    rng = np.random.default_rng(0)
    shards, targets = [], []
    for i, n in enumerate((3000, 1234)):
        p = tmp_path / f"fineweb_val_{i:06d}.bin"
        write_shard(p, rng.integers(0, VOCAB, n))
        shards.append(p)
        targets.append(_targets(rng, n, 16))
    out = tmp_path / "cache"
    dc.write_cache_from_arrays(out, shards, sp1024_path, targets, {"chunk_rows": 512, "teacher": {"id": "t"}})
    return out, shards, targets


def _row_sorted(ids, probs):
    o = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, o, 1), np.take_along_axis(probs, o, 1)


def test_roundtrip_precision_and_residual_identity(small_cache):
    """v2 (the default): each row keeps exactly its entries with p >= min_prob, in ascending id order with the
    empty slots last, each within the log code's half step (2.5 %)."""
    out, _shards, targets = small_cache
    assert dc.CacheReader(out).format_version == 2
    half_step = np.expm1(-np.log(dc.DEFAULT_MIN_PROB) / (dc.DEFAULT_LEVELS - 1) / 2)
    for si, (ids, probs, _res) in enumerate(targets):
        rids, rprobs, rres = dc.load_targets(out, si)
        assert rids.shape == ids.shape and rprobs.dtype == np.float32 and rres.dtype == np.float32
        kept = rprobs > 0
        assert np.all(kept[:, :-1] >= kept[:, 1:])  # empty slots (p = 0) last ...
        assert np.all((np.diff(rids.astype(np.int64), axis=1) > 0) | ~kept[:, 1:])  # ... kept ids ascending
        assert np.all(rids[~kept] == 0)
        for i in range(len(ids)):
            keep = probs[i] >= dc.DEFAULT_MIN_PROB
            want = dict(zip(ids[i][keep].tolist(), probs[i][keep].tolist()))
            got = {int(j): float(p) for j, p in zip(rids[i], rprobs[i]) if p > 0}
            assert got.keys() == want.keys(), i
            for j, p in got.items():
                assert abs(p / want[j] - 1) <= half_step + 1e-6, (i, j, p, want[j])
        assert np.array_equal(rres, np.float32(1) - rprobs.sum(1, dtype=np.float32))
        assert rres.min() >= 0.0
        empty = probs.sum(1) == 0
        assert np.all(rprobs[empty].sum(1) == 0) and np.all(rres[empty] == 1.0)


def test_v1_still_written_and_read(tmp_path, sp1024_path):
    rng = np.random.default_rng(3)
    shard = tmp_path / "fineweb_val_000000.bin"
    write_shard(shard, rng.integers(0, VOCAB, 1500))
    ids, probs, res = _targets(rng, 1500, 16)
    out = tmp_path / "v1"
    dc.write_cache_from_arrays(out, [shard], sp1024_path, [(ids, probs, res)],
                               {"chunk_rows": 512, "format_version": 1})
    r = dc.CacheReader(out)
    assert r.format_version == 1 and json.loads((out / "manifest.json").read_text())["format_version"] == 1
    rids, rprobs, rres = dc.load_targets(out, 0)
    sids, sprobs = _row_sorted(ids, probs)
    assert np.array_equal(rids.astype(np.int64), sids)  # v1 stores each row's ids sorted
    assert np.abs(rprobs - sprobs).max() <= 2.5e-4  # 12-bit sqrt codes: <= sqrt(p)/4095 + one fix step
    assert np.array_equal(rres, np.float32(1) - rprobs.sum(1, dtype=np.float32))
    for a, b in ((0, 1), (500, 1100), (1499, 1500)):
        for x, y in zip(r.read_span(0, a, b), (rids, rprobs, rres)):
            assert np.array_equal(x, y[a:b])


def test_quantize_never_exceeds_one():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(16, 0.3), size=5000)  # rows summing to 1: rounding up must be undone
    ids = np.tile(np.arange(16), (5000, 1))
    for bits in (8, 10, 12):
        _, codes = dc.quantize_probs(ids, p, bits)
        deq = dc.dequantize_codes(codes, bits)
        assert deq.sum(1, dtype=np.float32).max() <= 1.0
        assert np.abs(deq - p).max() <= 2.0 / (1 << bits)


def test_read_span_matches_full_read_across_chunks(small_cache):
    out, _shards, _ = small_cache
    r = dc.CacheReader(out)
    full = dc.load_targets(out, 0)
    assert r.k == 16 and r.num_shards == 2 and r.shard_tokens(0) == 3000
    for a, b in ((0, 1), (500, 1600), (511, 513), (2999, 3000), (0, 3000), (7, 7)):
        span = r.read_span(0, a, b)
        for x, y in zip(span, full):
            assert np.array_equal(x, y[a:b])
    with pytest.raises(DistillError):
        r.read_span(0, 10, 3001)


def test_check_shards_refuses_other_shards_and_tokenizer(small_cache, tmp_path, shared_data):
    out, shards, _ = small_cache
    r = dc.CacheReader(out)
    r.check_shards(shards)  # the originals pass
    assert r.shard_index_of(shards[1]) == 1
    other = tmp_path / "other" / shards[0].name
    other.parent.mkdir()
    write_shard(other, np.arange(3000) % VOCAB)  # same name and size, other tokens
    with pytest.raises(DistillError, match="differ"):
        r.check_shards([other, shards[1]])
    with pytest.raises(DistillError, match="built for shards"):
        r.check_shards(shards[:1])
    with pytest.raises(DistillError, match="tokenizer"):
        r.check_shards(shards, tokenizer_path=shared_data / "tokenizers" / "fineweb_4096_bpe.model")


def test_corruption_and_incomplete_are_one_line_errors(small_cache, tmp_path):
    out, _shards, _ = small_cache
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    chunk = dc.chunk_path(bad, 0, 1)
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="checksum"):
        dc.load_targets(bad, 0)
    (bad / "manifest.json").unlink()
    with pytest.raises(DistillError, match="incomplete"):
        dc.CacheReader(bad)


def test_cache_info_json(small_cache, capsys):
    out, _, _ = small_cache
    assert cli_main(["cache", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["tokens"] == 4234 and info["k"] == 16 and info["teacher"] == "t"
    assert info["bytes_on_disk"] > 0 and abs(info["bytes_per_token"] - info["bytes_on_disk"] / 4234) < 1e-9
    for key in ("aligned_fraction", "projected_teacher_bpb", "backend"):
        assert key in info


def test_convert_v1_to_v2_keeps_targets_and_resumes(tmp_path, sp1024_path):
    """`distill cache convert`: the format-2 copy holds what format 2 makes of the format-1 rows as read back,
    a killed conversion resumes, and a complete destination is refused."""
    rng = np.random.default_rng(5)
    shard = tmp_path / "fineweb_train_000000.bin"
    write_shard(shard, rng.integers(0, VOCAB, 2500))
    ids, probs, res = _targets(rng, 2500, 16, temp=4.0)
    v1 = tmp_path / "v1"
    dc.write_cache_from_arrays(v1, [shard], sp1024_path, [(ids, probs, res)], {"chunk_rows": 1024, "format_version": 1})
    v2 = tmp_path / "v2"
    assert cli_main(["cache", "convert", str(v1), "--out", str(v2)]) == 0
    dc.chunk_path(v2, 0, 1).unlink()
    (v2 / "manifest.json").unlink()  # as if killed before the end
    assert cli_main(["cache", "convert", str(v1), "--out", str(v2), "--json"]) == 0
    r1, r2 = dc.CacheReader(v1), dc.CacheReader(v2)
    assert r2.format_version == 2 and r2.k == 16 and r2.manifest["converted_from"]["format_version"] == 1
    assert r2.manifest["stats"]["bytes_on_disk"] < r1.manifest["stats"]["bytes_on_disk"]
    i1, p1, _ = dc.load_targets(v1, 0)
    want_ids, want_codes = dc.quantize_probs_v2(i1, p1)
    i2, p2, r2res = dc.load_targets(v2, 0)
    for i in range(0, 2500, 3):  # the same (id, p) entries, in the reader's id order
        want = {int(j): float(p) for j, p in zip(want_ids[i], dc.dequantize_table(2)[want_codes[i]]) if p > 0}
        got = {int(j): float(p) for j, p in zip(i2[i], p2[i]) if p > 0}
        assert got == want
    assert np.array_equal(r2res, np.float32(1) - p2.sum(1, dtype=np.float32))
    with pytest.raises(DistillError, match="complete cache"):
        dc.convert_cache(v1, v2)
    # --levels 255: the finer log code of the same rows (its table; relative error per entry halved)
    v3 = tmp_path / "v3"
    assert cli_main(["cache", "convert", str(v1), "--out", str(v3), "--levels", "255"]) == 0
    want_ids, want_codes = dc.quantize_probs_v2(i1, p1, levels=255)
    i3, p3, _ = dc.load_targets(v3, 0)
    table = dc.dequantize_table(2, levels=255)
    for i in range(0, 2500, 7):
        want = {int(j): float(p) for j, p in zip(want_ids[i], table[want_codes[i]]) if p > 0}
        assert {int(j): float(p) for j, p in zip(i3[i], p3[i]) if p > 0} == want
    kept = p1 >= dc.DEFAULT_MIN_PROB
    err = {n: float(np.abs(np.sort(np.where(kept, p1, 0), 1) - np.sort(q, 1)).sum(1).mean()) for n, q in ((127, p2), (255, p3))}
    assert err[255] < 0.7 * err[127]


def test_v2_span_reads_only_its_blocks_and_bounds_hostile_sizes(tmp_path, sp1024_path):
    """A v2 span read seeks to the blocks it overlaps: damage in another block of the same chunk goes
    unnoticed by it (the bytes are never read) and is a one-line error for a span that touches it; a
    truncated file and a header declaring an oversized block are one-line errors before any large read."""
    rng = np.random.default_rng(1)
    n = 3000
    p = tmp_path / "fineweb_val_000000.bin"
    write_shard(p, rng.integers(0, VOCAB, n))
    ids, probs, _ = _targets(rng, n, 16)
    rows = 1024  # one chunk of 1024 rows in 4 blocks of 256
    chunk = dc.chunk_path(tmp_path / "c", 0, 0)
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(dc.encode_chunk(ids[:rows], probs[:rows], np.ones(rows, np.uint8), block_rows=256))
    want = dc.decode_chunk(chunk)
    header, off = dc.read_chunk_header(chunk)
    sizes = [b["bytes"] for b in header["blocks"]]
    data = bytearray(chunk.read_bytes())
    data[off + sizes[0] + sizes[1] + 7] ^= 0xFF  # inside block 2 (rows 512..767)
    chunk.write_bytes(bytes(data))
    got = dc.decode_chunk(chunk, 0, 512)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w[:512])
    with pytest.raises(DistillError, match="checksum"):
        dc.decode_chunk(chunk, 500, 600)
    chunk.write_bytes(bytes(data[:off + sizes[0] + 10]))  # truncated inside block 1
    with pytest.raises(DistillError, match="truncated"):
        dc.decode_chunk(chunk, 300, 310)
    header["blocks"][0]["bytes"] = 1 << 40  # hostile: a block far larger than its rows could need
    hb = json.dumps(header, sort_keys=True).encode()
    chunk.write_bytes(dc.CHUNK_MAGIC + dc.struct.pack("<II", 2, len(hb)) + hb + bytes(data[off:]))
    with pytest.raises(DistillError, match="corrupt chunk"):
        dc.decode_chunk(chunk, 0, 10)
