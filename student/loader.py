"""Token shards (and, for KD, the teacher cache) streamed together, aligned per rank.

The stream walks the shards in order, wrapping around at the end (the baseline's TokenStream). Every
micro-step consumes one chunk of world_size · (local_tokens + 1) tokens; rank r takes the r-th disjoint
span of it, so each rank reads only its own tokens and its own cache rows. Inputs x = span[:-1], targets
y = span[1:]. Cache row (shard s, position j) is the teacher's distribution for the token after (s, j), i.e.
exactly the target of input position j — the same (shard, position) ranges index tokens and cache rows.
A target that lies in the next shard gets that shard's last cache row, which has no target (CE only).

Cache rows travel compact: uint16 ids and uint8 (v1: uint16) probability codes, decoded from disk in a
background thread `prefetch` batches ahead (a v2 cache decompresses only the blocks a span touches; a v1
chunk is decoded once and kept for the next span). When the training device is CUDA (`device`, default:
CUDA when pin_memory), the codes are pinned, copied (3 B per stored entry at v2) and expanded on the device
by `Batch.to` — dequantised through the cache's code table and turned into distill.losses.KDTargets by
prepare_targets there; on CPU the background thread does that expansion, so `Batch.kd` is ready when
next_batch() returns. The loader's position is a small dict (`state`) saved with a checkpoint; a loader
built from it yields the same next batches.

Packing (`packing`): "stream" (default, the baseline's TokenStream) reshapes each span into rows of seq_len,
crossing shard and document boundaries freely. "bos" packs as the 1.0611 record's DocumentPackingLoader, for
per-document attention: within a shard, the first step starts at the shard's first BOS (the tail of a document
begun in the previous shard is skipped), steps then follow one another contiguously, and a step that does not
fit in the rest of its shard moves to the next shard's first BOS (the rest is dropped; a shard too short for
one step is skipped). Rank r takes the r-th span of the step, as in "stream", so a span never crosses a shard
boundary. The span is one row, x of shape (1, local_tokens): the model's per-document attention splits it at
each BOS and cuts documents every doc_max_len tokens from their start — the record's cu_seqlens exactly (a
reshape into rows would cut documents at row boundaries instead). Deterministic (nothing is random); the
state carries "packing": "bos" and a loader refuses a state saved under the other packing.
"""

from __future__ import annotations

import dataclasses
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
class PackedTargets:
    """Cache rows for a batch in their compact on-disk coding (see distill.cache.decode_chunk_codes)."""

    ids: torch.Tensor  # (N, k) int16 holding uint16 ids (bit pattern)
    codes: torch.Tensor  # (N, k) uint8 (v2) or int16 holding uint16 (v1) probability codes
    table: torch.Tensor  # (C,) float32: probability of each code (table[0] = 0: an empty slot)
    temperature: float = 1.0
    top_k: int = 0
    target_temperature: float = 1.0
    wide_ids: bool = True  # ids may exceed 32767 (int16 sign bit set): mask them back to uint16

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.codes))

    def expand(self, targets: torch.Tensor, device: torch.device) -> KDTargets:
        """Move the codes to `device` and build the KDTargets there. Equal, bit for bit, to
        prepare_targets(targets, ids, table[codes], 1 − Σ table[codes], ...): at τ = 1 without k_s truncation
        the teacher-only terms come from per-code lookups (Σ q log q through a table of c·log c), which is
        what makes the expansion cheap enough for the record pace; otherwise prepare_targets runs."""
        nb = device.type == "cuda"
        n, k = self.ids.shape
        index = torch.empty((n, k + 1), dtype=torch.long, device=device)
        index[:, 0] = targets.to(device, non_blocking=nb).reshape(-1)
        index[:, 1:] = self.ids.to(device, non_blocking=nb)
        if self.wide_ids:
            index[:, 1:] &= 0xFFFF
        codes = self.codes.to(device, non_blocking=nb).int()
        if self.codes.dtype == torch.int16:
            codes &= 0xFFFF
        table = self.table.to(device, non_blocking=nb)
        flat = codes.reshape(-1)
        q = table.index_select(0, flat).view(n, k)
        mass = q.sum(dim=1)
        residual = 1.0 - mass
        fast = self.temperature == 1.0 and self.target_temperature == 1.0 and not 0 < self.top_k < k
        if not fast:
            return prepare_targets(index[:, 0], index[:, 1:], q, residual, self.temperature, self.top_k,
                                   target_temperature=self.target_temperature)
        present = codes > 0  # table[c] > 0 exactly when c > 0
        has = mass > 0  # a sum of non-negative terms is 0 only when every slot is empty
        r = torch.where(has, residual.clamp(0.0, 1.0), torch.ones_like(residual))
        qlogq = torch.xlogy(table, table).index_select(0, flat).view(n, k).sum(dim=1)
        return KDTargets(index, q, present.float(), r, has.float(), qlogq + torch.xlogy(r, r), self.temperature)


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 targets
    kd: KDTargets | None = None  # teacher rows for the B*T targets, prepared for distill.losses
    packed: PackedTargets | None = None  # the same rows still compact (expanded on the device by `to`)

    def to(self, device: torch.device) -> Batch:
        device = torch.device(device)
        nb = device.type == "cuda"
        y = self.y.to(device, non_blocking=nb)
        if self.packed is not None:
            kd = self.packed.expand(y, device)
        else:
            kd = None if self.kd is None else self.kd.to(device, non_blocking=nb)
        return Batch(self.x.to(device, non_blocking=nb), y, kd)

    def pin_memory(self) -> Batch:
        kd = None if self.kd is None else self.kd.map(lambda t: t.pin_memory())
        packed = self.packed
        if packed is not None:
            packed = dataclasses.replace(packed, ids=packed.ids.pin_memory(), codes=packed.codes.pin_memory())
        return Batch(self.x.pin_memory(), self.y.pin_memory(), kd, packed)


class SpanCodes:
    """read_span_codes over a CacheReader. v2 caches decode only the blocks a span touches; a v1 chunk must
    be decoded whole, so the last `keep` decoded v1 chunks are kept for the next spans (consecutive steps
    read consecutive rows). The v1 memo is guarded by a lock (the loader may run several producer threads)."""

    def __init__(self, reader, keep: int = 2):
        self.reader, self.keep = reader, keep
        self.rows = int(reader.chunk_rows)
        self.memo = reader.format_version == 1
        self.wide_ids = int(reader.manifest.get("student_vocab_size") or 65536) > 32768
        self.decoded: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self.lock = threading.Lock()  # the v1 memo is shared by the loader's producer threads

    def read(self, shard: int, start: int, end: int) -> tuple[np.ndarray, ...]:
        if not self.memo:
            return self.reader.read_span_codes(shard, start, end)
        with self.lock:
            return self._read_memo(shard, start, end)

    def _read_memo(self, shard: int, start: int, end: int) -> tuple[np.ndarray, ...]:
        parts, table = [], None
        for ci in range(start // self.rows, -(-end // self.rows)):
            arrs = self.decoded.get((shard, ci))
            if arrs is None:
                c0 = ci * self.rows
                arrs = self.reader.read_span_codes(shard, c0, min(c0 + self.rows, self.reader.shard_tokens(shard)))
                self.decoded[(shard, ci)] = arrs
                while len(self.decoded) > self.keep:
                    self.decoded.pop(next(iter(self.decoded)))  # oldest first (dicts keep insertion order)
            lo, hi = max(start - ci * self.rows, 0), min(end - ci * self.rows, self.rows)
            parts.append(tuple(a[lo:hi] for a in arrs[:3]))
            table = arrs[3]
        if len(parts) == 1:
            return (*parts[0], table)
        return (*(np.concatenate([p[j] for p in parts]) for j in range(3)), table)


def open_cache(cache_dir: str, shard_paths: list[Path], tokenizer_path: str | None):
    """A distill.cache.CacheReader checked against the training shards and tokenizer, and the cache's
    shard index for each training shard. A mismatch is the reader's one-line DistillError."""
    from distill.cache import CacheReader

    reader = CacheReader(cache_dir)
    reader.check_shards([str(p) for p in shard_paths], tokenizer_path or None)
    return SpanCodes(reader), [int(reader.shard_index_of(str(p))) for p in shard_paths]


class DistributedLoader:
    """Per-rank batches of (x, y[, teacher targets]); iterate with `next_batch()`."""

    def __init__(self, pattern: str, seq_len: int, local_tokens: int, rank: int = 0, world_size: int = 1,
                 cache_dir: str | None = None, tokenizer_path: str | None = None, vocab_size: int | None = None,
                 prefetch: int = 4, pin_memory: bool = False, state: dict | None = None,
                 temperature: float = 1.0, top_k: int = 0, target_temperature: float = 1.0,
                 device: str | torch.device | None = None, workers: int = 1, packing: str = "stream",
                 bos_id: int = 1):
        if packing not in ("stream", "bos"):
            raise DistillError(f"data.packing: must be \"stream\" or \"bos\", got {packing!r}")
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
        self.packing, self.bos_id = packing, int(bos_id)
        self._first_bos: dict[int, int | None] = {}
        if packing == "bos" and not any(self._fits(s, 0) for s in range(len(self.sizes))):
            raise DistillError(f"{pattern}: no shard holds one step ({self.chunk} tokens) after its first BOS "
                               f"(id {self.bos_id}); data.packing = \"bos\" needs longer shards or smaller batches")
        self.vocab_size = vocab_size
        self.pin = pin_memory
        # where the loss runs: CUDA -> teacher rows travel compact and are expanded by Batch.to on the device
        self.device = torch.device(device) if device is not None else torch.device("cuda" if pin_memory else "cpu")
        self.temperature = temperature
        self.target_temperature = float(target_temperature)
        self.top_k = int(top_k)
        self.cache, self.cache_index = (None, None)
        if cache_dir:
            self.cache, self.cache_index = open_cache(cache_dir, self.paths, tokenizer_path)
        fresh = {"shard": 0, "pos": 0, "epoch": 0, **({"packing": "bos"} if packing == "bos" else {})}
        self.state = dict(state) if state else fresh
        if self.state.get("packing", "stream") != packing:
            raise DistillError(f"loader state was saved with data.packing = \"{self.state.get('packing', 'stream')}\" "
                               f"but this run packs \"{packing}\" (resume with the same setting)")
        # `workers` producer threads build batches i ≡ w (mod workers) from their own copy of the position and
        # are read round-robin, so the batch sequence and the saved states equal the one-thread loader's
        # (decoding and expansion release the GIL: two threads ≈ two cores per rank)
        self.workers = max(1, int(workers))
        per = max(1, -(-max(1, prefetch) // self.workers))
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=per) for _ in range(self.workers)]
        self._turn = 0
        self._stop = threading.Event()
        self._threads = []
        for w in range(self.workers):
            st = dict(self.state)
            for _ in range(w):
                self._skip(st)
            th = threading.Thread(target=self._produce, args=(st, w), daemon=True)
            th.start()
            self._threads.append(th)

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

    # -- "bos" packing: steps inside one shard, the first at its first BOS
    def first_bos(self, shard: int) -> int | None:
        """Position of the shard's first BOS (None: it has none), read in blocks from the memmap, memoised."""
        if shard not in self._first_bos:
            toks, found, block = self.tokens[shard], None, 1 << 20
            for a in range(0, len(toks), block):
                hits = np.flatnonzero(np.asarray(toks[a : a + block]) == self.bos_id)
                if hits.size:
                    found = a + int(hits[0])
                    break
            self._first_bos[shard] = found
        return self._first_bos[shard]

    def _fits(self, shard: int, pos: int) -> bool:
        first = self.first_bos(shard)
        return first is not None and max(pos, first) + self.chunk <= self.sizes[shard]

    def _bos_step(self, st: dict) -> list[tuple[int, int, int]]:
        """Consume one step (every rank's span) from `st` (mutated); return this rank's piece."""
        while not self._fits(st["shard"], st["pos"]):
            st["shard"], st["pos"] = st["shard"] + 1, 0
            if st["shard"] == len(self.sizes):
                st["shard"], st["epoch"] = 0, st["epoch"] + 1
        st["pos"] = max(st["pos"], self.first_bos(st["shard"]))
        start = st["pos"] + self.rank * self.span
        st["pos"] += self.chunk
        return [(st["shard"], start, start + self.span)]

    def _make(self, st: dict) -> Batch:
        if self.packing == "bos":
            pieces = self._bos_step(st)
        else:
            self._advance(st, self.rank * self.span)  # the ranks before us
            pieces = self._advance(st, self.span)
            self._advance(st, (self.world - self.rank - 1) * self.span)
        span = np.concatenate([np.asarray(self.tokens[s][a:b]) for s, a, b in pieces]).astype(np.int64)
        if self.vocab_size is not None and span.max() >= self.vocab_size:
            raise DistillError(f"{self.paths[pieces[0][0]]}: token id {int(span.max())} is outside the "
                               f"model's vocab ({self.vocab_size})")
        row = self.span - 1 if self.packing == "bos" else self.seq_len  # "bos": one row, split by the model
        x = torch.from_numpy(span[:-1]).view(-1, row)
        y = torch.from_numpy(span[1:]).view(-1, row)
        batch = Batch(x, y)
        if self.cache is not None:
            # cache rows index the inputs: drop the span's last token (it is only a target)
            rows, left = [], self.span - 1
            for s, a, b in pieces:
                b = min(b, a + left)
                if b > a:
                    rows.append(self.cache.read(self.cache_index[s], a, b))
                    left -= b - a
            cat = (lambda j: rows[0][j]) if len(rows) == 1 else (lambda j: np.concatenate([r[j] for r in rows]))
            ids, codes, table = cat(0), cat(1), rows[-1][3]
            packed = PackedTargets(torch.from_numpy(ids.view(np.int16)),
                                   torch.from_numpy(codes.view(np.int16) if codes.dtype == np.uint16 else codes),
                                   torch.from_numpy(table), self.temperature, self.top_k, self.target_temperature,
                                   wide_ids=self.cache.wide_ids)
            if self.device.type == "cuda":
                batch.packed = packed
            else:
                # the teacher-only part of the loss is computed here, off the training step's critical path
                batch.kd = packed.expand(y, self.device)
        if self.pin:
            batch = batch.pin_memory()
        return batch

    def _skip(self, st: dict) -> None:
        """Advance `st` past one whole step (every rank's span) without reading anything."""
        if self.packing == "bos":
            self._bos_step(st)
        else:
            self._advance(st, self.world * self.span)

    def _produce(self, st: dict, w: int) -> None:
        q = self._queues[w]
        while not self._stop.is_set():
            try:
                item = (self._make(st), dict(st))
            except BaseException as e:  # noqa: BLE001 — hand the error to the consumer instead of dying silently
                item = (e, None)
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is None:
                return
            for _ in range(self.workers - 1):  # the other threads' batches
                self._skip(st)

    def next_batch(self) -> Batch:
        batch, st = self._queues[self._turn].get()
        if st is None:
            raise batch
        self._turn = (self._turn + 1) % self.workers
        self.state = st  # position after this batch: what a resumed run starts from
        return batch

    def close(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=5)
