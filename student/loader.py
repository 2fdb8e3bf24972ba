"""Token shards (and, for KD, the teacher cache) streamed together, aligned per rank.

The stream walks the shards in order, wrapping around at the end (the baseline's TokenStream). Every
micro-step consumes one chunk of world_size · (local_tokens + 1) tokens; rank r takes the r-th disjoint
span of it, so each rank reads only its own tokens and its own cache rows. Inputs x = span[:-1], targets
y = span[1:]. Cache row (shard s, position j) is the teacher's distribution for the token after (s, j), i.e.
exactly the target of input position j — the same (shard, position) ranges index tokens and cache rows.
A target that lies in the next shard gets that shard's last cache row, which has no target (CE only).

Tokens are memory-mapped; cache spans are decompressed (each on-disk chunk once) and turned into
distill.losses.KDTargets in a background thread `prefetch` batches ahead, and (on CUDA) placed in pinned
memory so the host->device copy overlaps compute. The loader's position is
a small dict (`state`) saved with a checkpoint; a loader built from it yields the same next batches.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.errors import DistillError
from distill.losses import KDTargets, prepare_targets
from distill.shards import read_shard, resolve_shards


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 targets
    kd: KDTargets | None = None  # teacher rows for the B*T targets, prepared for distill.losses

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        kd = None if self.kd is None else self.kd.to(device, non_blocking=nb)
        return Batch(self.x.to(device, non_blocking=nb), self.y.to(device, non_blocking=nb), kd)

    def pin_memory(self) -> Batch:
        kd = None if self.kd is None else self.kd.map(lambda t: t.pin_memory())
        return Batch(self.x.pin_memory(), self.y.pin_memory(), kd)


class ChunkedSpans:
    """read_span over a CacheReader that decodes each on-disk chunk once: a step's span is much smaller
    than a chunk (65,536 rows), and consecutive steps read consecutive rows, so the last few decoded chunks
    serve the next spans. Only the loader thread touches it."""

    def __init__(self, reader, keep: int = 2):
        self.reader, self.keep = reader, keep
        self.rows = int(getattr(reader, "chunk_rows", 0) or 0)
        self.decoded: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def read_span(self, shard: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.rows <= 0:
            return self.reader.read_span(shard, start, end)
        parts = []
        for ci in range(start // self.rows, -(-end // self.rows)):
            arrs = self.decoded.get((shard, ci))
            if arrs is None:
                c0 = ci * self.rows
                arrs = self.reader.read_span(shard, c0, min(c0 + self.rows, self.reader.shard_tokens(shard)))
                self.decoded[(shard, ci)] = arrs
                while len(self.decoded) > self.keep:
                    self.decoded.pop(next(iter(self.decoded)))  # oldest first (dicts keep insertion order)
            lo, hi = max(start - ci * self.rows, 0), min(end - ci * self.rows, self.rows)
            parts.append(tuple(a[lo:hi] for a in arrs))
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))


def open_cache(cache_dir: str, shard_paths: list[Path], tokenizer_path: str | None):
    """A distill.cache.CacheReader checked against the training shards and tokenizer, and the cache's
    shard index for each training shard. A mismatch is the reader's one-line DistillError."""
    from distill.cache import CacheReader

    reader = CacheReader(cache_dir)
    reader.check_shards([str(p) for p in shard_paths], tokenizer_path or None)
    return ChunkedSpans(reader), [int(reader.shard_index_of(str(p))) for p in shard_paths]


class DistributedLoader:
    """Per-rank batches of (x, y[, teacher targets]); iterate with `next_batch()`."""

    def __init__(self, pattern: str, seq_len: int, local_tokens: int, rank: int = 0, world_size: int = 1,
                 cache_dir: str | None = None, tokenizer_path: str | None = None, vocab_size: int | None = None,
                 prefetch: int = 4, pin_memory: bool = False, state: dict | None = None,
                 temperature: float = 1.0, top_k: int = 0, target_temperature: float = 1.0):
        if local_tokens % seq_len:
            raise DistillError(f"train.batch_tokens: per-rank micro-batch of {local_tokens} tokens is not a "
                               f"multiple of seq_len {seq_len}")
        self.paths = resolve_shards(pattern)
        self.tokens = [read_shard(p, vocab_size=None) for p in self.paths]  # memmaps: nothing read yet
        self.sizes = [len(t) for t in self.tokens]
        self.span = local_tokens + 1
        self.chunk = self.span * world_size
        if sum(self.sizes) < self.chunk:
            raise DistillError(f"{pattern}: {sum(self.sizes)} training tokens, fewer than one step's "
                               f"{self.chunk} (batch_tokens / grad_accum + 1 per rank)")
        self.seq_len, self.rank, self.world = seq_len, rank, world_size
        self.vocab_size = vocab_size
        self.pin = pin_memory
        self.temperature = temperature
        self.target_temperature = float(target_temperature)
        self.top_k = int(top_k)
        self.cache, self.cache_index = (None, None)
        if cache_dir:
            self.cache, self.cache_index = open_cache(cache_dir, self.paths, tokenizer_path)
        self.state = dict(state) if state else {"shard": 0, "pos": 0, "epoch": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(dict(self.state),), daemon=True)
        self._thread.start()

    @property
    def distilling(self) -> bool:
        return self.cache is not None

    # -- positions: pure arithmetic on (shard, pos); pieces never cross a shard boundary
    def _advance(self, st: dict, n: int) -> list[tuple[int, int, int]]:
        """Consume n tokens from state `st` (mutated); return the pieces [(shard, start, end)]."""
        pieces = []
        while n > 0:
            avail = self.sizes[st["shard"]] - st["pos"]
            if avail <= 0:
                st["shard"] += 1
                st["pos"] = 0
                if st["shard"] == len(self.sizes):
                    st["shard"], st["epoch"] = 0, st["epoch"] + 1
                continue
            k = min(n, avail)
            pieces.append((st["shard"], st["pos"], st["pos"] + k))
            st["pos"] += k
            n -= k
        return pieces

    def _make(self, st: dict) -> Batch:
        self._advance(st, self.rank * self.span)  # the ranks before us
        pieces = self._advance(st, self.span)
        self._advance(st, (self.world - self.rank - 1) * self.span)
        span = np.concatenate([np.asarray(self.tokens[s][a:b]) for s, a, b in pieces]).astype(np.int64)
        if self.vocab_size is not None and span.max() >= self.vocab_size:
            raise DistillError(f"{self.paths[pieces[0][0]]}: token id {int(span.max())} is outside the "
                               f"model's vocab ({self.vocab_size})")
        x = torch.from_numpy(span[:-1]).view(-1, self.seq_len)
        y = torch.from_numpy(span[1:]).view(-1, self.seq_len)
        batch = Batch(x, y)
        if self.cache is not None:
            # cache rows index the inputs: drop the span's last token (it is only a target)
            rows, left = [], self.span - 1
            for s, a, b in pieces:
                b = min(b, a + left)
                if b > a:
                    rows.append(self.cache.read_span(self.cache_index[s], a, b))
                    left -= b - a
            ids = torch.from_numpy(np.concatenate([r[0] for r in rows]).astype(np.int64))
            probs = torch.from_numpy(np.ascontiguousarray(np.concatenate([r[1] for r in rows]), np.float32))
            residual = torch.from_numpy(np.ascontiguousarray(np.concatenate([r[2] for r in rows]), np.float32))
            # the teacher-only part of the loss is computed here, off the training step's critical path
            batch.kd = prepare_targets(y.reshape(-1), ids, probs, residual, self.temperature, self.top_k,
                                       target_temperature=self.target_temperature)
        if self.pin:
            batch = batch.pin_memory()
        return batch

    def _produce(self, st: dict) -> None:
        while not self._stop.is_set():
            try:
                item = (self._make(st), dict(st))
            except BaseException as e:  # noqa: BLE001 — hand the error to the consumer instead of dying silently
                item = (e, None)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is None:
                return

    def next_batch(self) -> Batch:
        batch, st = self._queue.get()
        if st is None:
            raise batch
        self.state = st  # position after this batch: what a resumed run starts from
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
