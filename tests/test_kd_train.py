"""End-to-end distillation on real shards: a real teacher cache (distill.cache.write_cache_from_arrays) built
from a bigram teacher counted on the same FineWeb shards, the loader's cache alignment, a KD run, refused
mismatches, `accelerate launch --cpu --num_processes 2`, and the overhead benchmark's mechanics.

Run: python -m pytest -q tests/test_kd_train.py      (~60 s on 2 loaded CPU cores; needs ../shared/data)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.cache import DEFAULT_MIN_PROB, write_cache_from_arrays
from distill.errors import DistillError
from distill.shards import read_shard, write_shard
from distill.tokenizer import encode_docs, load_tokenizer, pack_docs
from student.loader import DistributedLoader

V, K = 1024, 8

TINY_TOML = """
[model]
vocab_size = 1024
num_layers = 2
model_dim = 64
num_heads = 1
num_kv_heads = 1

[train]
max_steps = 3
max_wallclock_s = 0.0
batch_tokens = 512
seq_len = 64
warmdown_steps = 0

[data]
train_shards = "{d}/fineweb_train_*.bin"
val_shards = "{d}/fineweb_val_*.bin"
tokenizer = "{tok}"

[kd]
alpha = 0.5

[eval]
val_every = 0
val_max_windows = 4
"""


def bigram_table(streams: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A real (if weak) teacher: next-token bigram probabilities counted on the shards; top-K per row."""
    counts = np.full((V, V), 0.01)
    for t in streams:
        np.add.at(counts, (t[:-1], t[1:]), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1)[:, :K]
    return top, np.take_along_axis(p, top, 1).astype(np.float32)


@pytest.fixture(scope="module")
def kd_data(tmp_path_factory, sp1024_path, sample200_path, val_head_shard):
    d = tmp_path_factory.mktemp("kd")
    sp = load_tokenizer(sp1024_path)
    texts = [json.loads(line)["text"] for line in sample200_path.read_text().splitlines()[:30]]
    toks = pack_docs(encode_docs(sp, texts))
    half = len(toks) // 2
    paths = [d / "fineweb_train_000000.bin", d / "fineweb_train_000001.bin"]
    write_shard(paths[0], toks[:half])
    write_shard(paths[1], toks[half:])
    shutil.copy(val_head_shard, d / "fineweb_val_000000.bin")
    streams = [np.asarray(read_shard(p)).astype(np.int64) for p in paths]
    top, topp = bigram_table(streams)
    targets = []
    for t in streams:
        ids, probs = top[t].astype(np.uint16), topp[t].copy()
        probs[-1] = 0.0  # the shard's last token has no next token in this shard: no target
        targets.append((ids, probs, 1.0 - probs.sum(1)))
    write_cache_from_arrays(d / "cache", paths, sp1024_path, targets, {"chunk_rows": 4096})
    cfg = d / "tiny_kd.toml"
    cfg.write_text(TINY_TOML.format(d=d, tok=sp1024_path))
    return {"dir": d, "cache": d / "cache", "config": cfg, "top": top, "topp": topp, "tok": sp1024_path}


def test_loader_cache_rows_align_with_inputs(kd_data):
    """Row (shard, j) is the bigram teacher's distribution after token j: it must match the batch's x."""
    d = kd_data["dir"]
    for rank in range(2):
        ld = DistributedLoader(str(d / "fineweb_train_*.bin"), 64, 1024, rank=rank, world_size=2,
                               cache_dir=str(kd_data["cache"]), tokenizer_path=str(kd_data["tok"]))
        for _ in range(12):  # crosses a 4096-row chunk and the shard boundary
            b = ld.next_batch()
            x = b.x.reshape(-1).numpy()
            ids, probs, residual = b.kd.index[:, 1:].numpy(), b.kd.q, b.kd.r
            assert np.array_equal(b.kd.index[:, 0].numpy(), b.y.reshape(-1).numpy())
            has = b.kd.has.bool()
            assert has.float().mean() > 0.99
            m = has.numpy()
            # the default cache (v2) stores each row's entries with p >= min_prob (in ascending id order)
            want_ids, want_p = kd_data["top"][x][m], kd_data["topp"][x][m]
            got_ids, got_p = ids[m], probs.numpy()[m]
            for i in range(0, len(want_ids), 7):
                keep = want_p[i] >= DEFAULT_MIN_PROB
                want = dict(zip(want_ids[i][keep].tolist(), want_p[i][keep].tolist()))
                got = {int(j): float(p) for j, p in zip(got_ids[i], got_p[i]) if p > 0}
                assert got.keys() == want.keys()
                assert all(abs(got[j] / want[j] - 1) < 0.03 for j in got)  # log codes: <= 2.8 % relative
            assert torch.allclose(probs.sum(1) + residual, torch.ones(len(x)), atol=1e-5)
        ld.close()


def _kd_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a._tensors(), b._tensors()))


def test_two_loader_threads_give_the_one_thread_sequence(kd_data):
    """workers=2 splits batches between two producer threads; the consumer sees exactly the batches and the
    resume states of one thread, across chunk, shard and epoch boundaries."""
    d = kd_data["dir"]
    args = dict(pattern=str(d / "fineweb_train_*.bin"), seq_len=64, local_tokens=2048, rank=1, world_size=2,
                cache_dir=str(kd_data["cache"]), tokenizer_path=str(kd_data["tok"]))
    one, two = DistributedLoader(**args, workers=1), DistributedLoader(**args, workers=2)
    try:
        steps = sum(one.sizes) // (2 * 2049) + 3  # one pass over the data and a bit
        for _ in range(steps):
            a, b = one.next_batch(), two.next_batch()
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and _kd_equal(a.kd, b.kd)
            assert one.state == two.state
        assert one.state["epoch"] == 1  # the sequence wrapped around the data
        resumed = DistributedLoader(**args, workers=2, state=two.state)
        try:
            for _ in range(3):
                a, b = one.next_batch(), resumed.next_batch()
                assert torch.equal(a.y, b.y) and _kd_equal(a.kd, b.kd)
        finally:
            resumed.close()
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (2.0, 0), (1.0, 3)])
def test_packed_codes_expand_like_prepare_targets(fmt, temperature, top_k):
    """The compact path (uint16 ids + codes, expanded where the loss runs) equals prepare_targets on the
    dequantised rows — bit for bit on the table-lookup fast path, to float32 rounding when tempered."""
    from distill import cache as dc
    from distill.losses import prepare_targets
    from student.loader import Batch, PackedTargets

    rng = np.random.default_rng(fmt)
    n, k = 500, 8
    p = rng.dirichlet(np.full(k + 4, 0.3), size=n)[:, :k]
    ids = np.stack([rng.choice(40000, k, replace=False) for _ in range(n)])  # ids above 32767 too
    p[::17] = 0.0  # rows without a target
    if fmt == 1:
        qids, codes = dc.quantize_probs(ids, p, 12)
        table = dc.dequantize_table(1, bits=12)
        tcodes = torch.from_numpy(codes.view(np.int16))
    else:
        qids, codes = dc.quantize_probs_v2(ids, p)
        table = dc.dequantize_table(2)
        tcodes = torch.from_numpy(codes)
    y = torch.from_numpy(rng.integers(0, 40000, n))
    probs = torch.from_numpy(table[codes])
    want = prepare_targets(y, torch.from_numpy(qids.astype(np.int64)), probs, 1.0 - probs.sum(1), temperature, top_k)
    pk = PackedTargets(torch.from_numpy(qids.view(np.int16)), tcodes, torch.from_numpy(table), temperature, top_k)
    got = pk.expand(y, torch.device("cpu"))
    assert got.index.dtype == torch.long and torch.equal(got.index, want.index)
    if temperature == 1.0 and top_k == 0:
        assert _kd_equal(got, want)
    else:
        for g, w in zip(got._tensors(), want._tensors()):
            assert torch.allclose(g.float(), w.float(), atol=1e-6)
    x = torch.zeros(n, dtype=torch.long)
    via_batch = Batch(x, y, packed=pk).to(torch.device("cpu"))  # what a CUDA run does, on the CPU
    assert via_batch.packed is None and _kd_equal(via_batch.kd, got)
    assert pk.nbytes() == n * k * (2 + (2 if fmt == 1 else 1))  # 3 B per stored entry at format 2


def test_kd_run_writes_ce_and_kd(kd_data, tmp_path):
    from student.checkpoint import load_checkpoint
    from student.train import main

    out = tmp_path / "kd"
    assert main(["--config", str(kd_data["config"]), "--teacher-cache", str(kd_data["cache"]),
                 "--kd-alpha", "0.5", "--out", str(out), "--kd.alpha_schedule", "anneal",
                 "--kd.alpha_anneal_frac", "0.5"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"ce", "kd", "alpha", "loss"} <= r.keys() for r in rows)
    for r in rows:  # rows without a target are rare, so loss ~ (1-a) ce + a kd
        assert math.isclose(r["loss"], (1 - r["alpha"]) * r["ce"] + r["alpha"] * r["kd"], rel_tol=0.02)
        assert 0.0 < r["kd"] < r["ce"]
    assert [r["alpha"] for r in rows] == pytest.approx([0.5, 0.5, 1 / 3])  # progress 2/3: a third into the anneal
    assert 2.0 < rows[-1]["val_bpb"] < 6.0
    assert json.loads((out / "config.json").read_text())["kd"]["teacher_cache"] == str(kd_data["cache"])
    load_checkpoint(out)


def test_mismatched_cache_is_refused(kd_data, tmp_path, shared_data):
    from student.train import cli_main, main

    other = tmp_path / "other"
    other.mkdir()
    for p in kd_data["dir"].glob("fineweb_train_*.bin"):  # same names, different contents
        t = np.asarray(read_shard(p)).copy()
        t[:10] = 5
        write_shard(other / p.name, t)
    base = ["--config", str(kd_data["config"]), "--teacher-cache", str(kd_data["cache"]),
            "--out", str(tmp_path / "x")]
    with pytest.raises(DistillError, match="differ"):
        main(base + ["--data.train_shards", str(other / "fineweb_train_*.bin")])
    sp4096 = shared_data / "tokenizers" / "fineweb_4096_bpe.model"
    if sp4096.exists():
        with pytest.raises(DistillError, match="tokenizer"):
            main(base + ["--data.tokenizer", str(sp4096), "--data.val_shards", ""])
    assert cli_main(base + ["--data.train_shards", str(other / "fineweb_train_*.bin")]) == 2


def test_accelerate_two_cpu_processes(kd_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu = the torchrun launcher: 2 real processes (accelerate's --cpu launcher starts only one);
    # with no CUDA the trainer's Accelerator runs them as gloo DDP
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "student.train", "--config", str(kd_data["config"]), "--teacher-cache", str(kd_data["cache"]),
           "--max-steps", "2", "--out", str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["tokens"] == 1024
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("kd" in r for r in rows)
    assert sorted(p.name for p in (out / "resume").iterdir()) == ["rng_rank0.pt", "rng_rank1.pt", "state.pt"]


def test_overhead_benchmark_mechanics(kd_data):
    from distill.bench_overhead import measure_overhead

    res = measure_overhead(str(kd_data["config"]), str(kd_data["cache"]), steps=3, warmup=1, progress=False)
    assert len(res["ce_step_ms"]) == len(res["kd_step_ms"]) == 4
    assert res["ratio"] == pytest.approx(res["kd_step_ms_median"] / res["ce_step_ms_median"])
    assert 0.2 < res["ratio"] < 5.0
