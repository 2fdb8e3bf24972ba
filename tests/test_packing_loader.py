"""student/loader.py packing = "bos" (the 1.0611 record's DocumentPackingLoader) against an independent,
plain reference of the record's rule written here; determinism, resume, thread count, refusals.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_packing_loader.py      (~3 s, no shared data)
"""

from __future__ import annotations

import numpy as np
import pytest

from distill.errors import DistillError
from distill.shards import write_shard
from student.loader import DistributedLoader

BOS = 1


def make_shards(folder, sizes=(700, 90, 1300, 500, 1100), seed=0) -> list[np.ndarray]:
    """Documents [BOS] + random ids of random length, concatenated and cut into shards of `sizes`, so
    documents straddle shards; shard 1 (90 tokens) is too short for a step, and one shard has no BOS."""
    rng = np.random.default_rng(seed)
    stream = []
    while len(stream) < sum(sizes):
        stream += [BOS] + rng.integers(2, 500, size=int(rng.integers(5, 160))).tolist()
    stream = np.asarray(stream[: sum(sizes)], dtype=np.uint16)
    shards, a = [], 0
    for i, n in enumerate(sizes):
        s = stream[a : a + n].copy()
        if i == 3:
            s[s == BOS] = 7  # a shard without any document start
        write_shard(folder / f"fineweb_train_{i:06d}.bin", s)
        shards.append(s)
        a += n
    return shards


def reference_batches(shards, local: int, world: int, rank: int, steps: int) -> list[np.ndarray]:
    """The record's rule, written plainly: the cursor starts at shard 0's first BOS; before each step, while
    the step does not fit in the rest of the shard, move to the next shard (wrapping) and its first BOS; rank r
    reads the r-th span of local + 1 tokens; the cursor moves past every rank's span."""
    span = local + 1

    def first_bos(s):
        hits = np.flatnonzero(shards[s] == BOS)
        return int(hits[0]) if hits.size else None

    out, s, cur = [], 0, first_bos(0)
    for _ in range(steps):
        while cur is None or cur + world * span > len(shards[s]):
            s = (s + 1) % len(shards)
            cur = first_bos(s)
        out.append(shards[s][cur + rank * span : cur + (rank + 1) * span].astype(np.int64))
        cur += world * span
    return out


def loader(folder, local=128, world=1, rank=0, **kw) -> DistributedLoader:
    return DistributedLoader(str(folder / "fineweb_train_*.bin"), seq_len=64, local_tokens=local, rank=rank,
                             world_size=world, packing="bos", **kw)


def take(ld: DistributedLoader, n: int):
    out = []
    for _ in range(n):
        b = ld.next_batch()
        out.append((b.x.numpy().copy(), b.y.numpy().copy()))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_matches_reference(tmp_path, world):
    shards = make_shards(tmp_path)
    steps = 60  # several epochs over the usable shards
    for rank in range(world):
        ld = loader(tmp_path, world=world, rank=rank)
        got = take(ld, steps)
        ld.close()
        ref = reference_batches(shards, 128, world, rank, steps)
        for (x, y), span in zip(got, ref):
            assert x.shape == (1, 128) and y.shape == (1, 128)  # one row: the model splits it per document
            assert (x[0] == span[:-1]).all() and (y[0] == span[1:]).all()
        assert ld.state["epoch"] >= 2 and ld.state["packing"] == "bos"


def test_first_step_in_each_shard_starts_at_a_document(tmp_path):
    shards = make_shards(tmp_path)
    ld = loader(tmp_path, local=192)
    seen_shards, prev_shard = 0, None
    for _ in range(20):
        before = dict(ld.state)
        x = ld.next_batch().x[0].numpy()
        if ld.state["shard"] != before["shard"] or prev_shard is None:
            assert x[0] == BOS
            seen_shards += 1
        prev_shard = ld.state["shard"]
        assert ld.state["shard"] not in (1, 3)  # too short / no BOS: skipped
        assert ld.state["pos"] <= len(shards[ld.state["shard"]])  # never crosses a shard boundary
    ld.close()
    assert seen_shards >= 4


def test_deterministic_threads_and_resume(tmp_path):
    make_shards(tmp_path)
    a = loader(tmp_path, world=2, rank=1)
    first = take(a, 7)
    state = dict(a.state)
    rest = take(a, 9)
    a.close()
    b = loader(tmp_path, world=2, rank=1, workers=3)  # same sequence from several producer threads
    both = take(b, 16)
    b.close()
    for (x1, y1), (x2, y2) in zip(first + rest, both):
        assert (x1 == x2).all() and (y1 == y2).all()
    c = loader(tmp_path, world=2, rank=1, state=state)  # resume after 7 steps
    resumed = take(c, 9)
    c.close()
    for (x1, y1), (x2, y2) in zip(rest, resumed):
        assert (x1 == x2).all() and (y1 == y2).all()


def test_refusals(tmp_path):
    make_shards(tmp_path)
    with pytest.raises(DistillError, match="no shard holds one step"):
        loader(tmp_path, local=1344)  # fewer tokens than the whole set, more than any shard
    with pytest.raises(DistillError, match="data.packing"):
        DistributedLoader(str(tmp_path / "fineweb_train_*.bin"), 64, 128, packing="docs")
    with pytest.raises(DistillError, match="saved with data.packing"):
        loader(tmp_path, state={"shard": 0, "pos": 0, "epoch": 0})  # a "stream" state
    stream = DistributedLoader(str(tmp_path / "fineweb_train_*.bin"), 64, 128)
    assert "packing" not in stream.state and stream.next_batch().x.shape == (2, 64)  # default unchanged
    stream.close()
