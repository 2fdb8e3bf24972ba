"""`distill teacher precompute`: score student token shards with a teacher, project to the student
vocabulary, write the chunked student-space cache (distill/cache.py).

Work unit = one cache chunk (rows [c*chunk_rows, (c+1)*chunk_rows) of one student shard). A chunk's
result depends only on the chunk (the documents overlapping it, scored in a fixed order), and each chunk
is committed with an atomic rename, so a run killed at any moment and rerun with the same command
finishes bit-identical to an uninterrupted one. Workers (`--num-shards n --shard-index i`) take chunks
c with (global chunk number % n == i); whoever finds every chunk present writes manifest.json (the same
bytes whoever does it). `plan.json` pins the settings: a rerun with different settings is refused.

A chunk is done in two halves: `score_chunk` (teacher tokenisation + the teacher forward, this process)
and `ChunkProjector` (projection to the student vocabulary, stats, compression, atomic write). With
`--workers N` (projection_workers) the second half runs in N spawned processes while this one scores the
next chunks, so the CPU-bound projection overlaps the teacher; the bytes written are the same as with
N = 1 (in-process projection, only the write in a thread).

No silent CE: a document the teacher tokenizer cannot spell exactly (e.g. a normaliser adding a leading
space) gets no targets. Rows with targets and documents skipped are printed (stderr) and recorded in the
chunk stats / manifest; more than MAX_SKIP_RATE skipped documents is a one-line error (exit 2), checked
after every chunk once MIN_DOCS_FOR_CHECK documents were seen and before the manifest is written
(`--allow-skips` accepts them).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill import cache as dc
from distill.errors import DistillError
from distill.fsutil import write_bytes_atomic, write_json_atomic
from distill.shards import BOS_ID, read_shard, resolve_shards
from teachers.backend import TeacherBackend, TeacherSpec, check_scores, make_backend
from teachers.projection import PROJECTION_VERSION, DocTeacher, StudentVocab, identity_rows, project_document

CHAIN_REACH = 4  # teacher rows scored past the last needed one, for the projection's boundary chaining
MAX_SKIP_RATE = 0.01  # more documents without targets than this fails the run (--allow-skips overrides)
MIN_DOCS_FOR_CHECK = 200  # ... checked after every chunk once this many documents were seen, and at the end


@dataclass
class PrecomputeConfig:
    teacher: str
    tokenizer: str
    shards: str
    out: str
    backend: str = "hf"
    k: int = 16
    k_student: int | None = None  # foreign teachers: student ids kept per row (default k)
    num_workers: int = 1  # --num-shards
    worker_index: int = 0  # --shard-index
    max_model_len: int | None = None
    batch_tokens: int = 8192
    keep_teacher_space: str | None = None
    chunk_rows: int = dc.DEFAULT_CHUNK_ROWS
    prob_bits: int = dc.DEFAULT_PROB_BITS  # format 1 only
    format_version: int = dc.FORMAT_VERSION  # cache format written (2: log codes + adaptive k; 1: sqrt codes)
    min_prob: float = dc.DEFAULT_MIN_PROB  # format 2: stored entries below this go into the residual bucket
    zstd_level: int = dc.DEFAULT_ZSTD_LEVEL
    device: str | None = None
    dtype: str | None = None  # teacher compute dtype; None/"auto" = the backend's default (bf16 where fast)
    progress: bool = True
    projection_workers: int = 1  # --workers: projection processes beside the scoring one (1: in-process)
    allow_skips: bool = False  # --allow-skips: finish even when > MAX_SKIP_RATE of the documents are skipped


def windows(n: int, max_len: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows over n tokens: (tok_start, tok_end, row_lo, row_hi). Row j (predicting j+1) is
    taken from the window whose [row_lo, row_hi) holds it, which gives it >= max_len//2 tokens of context."""
    if n <= max_len:
        return [(0, n, 0, n - 1)]
    if max_len < 3:
        raise ValueError(f"window length {max_len} leaves no room for context")
    ctx = max_len // 2
    stride = max_len - 1 - ctx
    out, s = [], 0
    while True:
        e = min(s + max_len, n)
        out.append((s, e, 0 if s == 0 else s + ctx, e - 1))
        if e == n:
            return out
        s += stride


class _Stream:
    """The concatenation of all token shards (documents may straddle shards) and its document starts."""

    def __init__(self, paths: list[Path], vocab_size: int):
        self.parts = [read_shard(p, vocab_size=vocab_size) for p in paths]
        self.sizes = [int(p.shape[0]) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        bos = np.concatenate([np.flatnonzero(np.asarray(p) == BOS_ID) + o
                              for p, o in zip(self.parts, self.offsets[:-1])]).astype(np.int64)
        # a stream that does not start with BOS starts with a (cut) document all the same
        self.doc_starts = bos if (len(bos) and bos[0] == 0) else np.concatenate([[0], bos]).astype(np.int64)

    def get(self, g0: int, g1: int) -> np.ndarray:
        out = []
        for si, (p, o) in enumerate(zip(self.parts, self.offsets[:-1])):
            lo, hi = max(g0, int(o)), min(g1, int(o) + self.sizes[si])
            if lo < hi:
                out.append(np.asarray(p[lo - o:hi - o]))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def docs_overlapping(self, g0: int, g1: int) -> list[tuple[int, int]]:
        """Documents [start, end) holding any position in [g0, g1)."""
        starts = self.doc_starts
        i0 = int(np.searchsorted(starts, g0, side="right")) - 1
        i1 = int(np.searchsorted(starts, g1, side="left"))
        return [(int(starts[i]), int(starts[i + 1]) if i + 1 < len(starts) else self.total)
                for i in range(max(i0, 0), i1)]


class ChunkProjector:
    """The CPU half of a chunk: project its teacher rows to the student vocabulary, its stats, and the
    compressed, atomically written chunk. Rebuilt from `state()` in each --workers process."""

    def __init__(self, cfg: PrecomputeConfig, identity: bool, k_s: int, teacher_bytes: list[bytes] | None,
                 teacher_meta: dict, sv: StudentVocab | None = None):
        from distill.tokenizer import load_tokenizer

        self.cfg, self.identity, self.k_s = cfg, identity, k_s
        self.teacher_bytes, self.teacher_meta = teacher_bytes, teacher_meta
        self.sv = sv or StudentVocab(load_tokenizer(cfg.tokenizer))

    def state(self) -> tuple:
        return self.cfg, self.identity, self.k_s, self.teacher_bytes, self.teacher_meta

    def project(self, scored: dict):
        """scored (Precompute.score_chunk) -> ids [n,k_s], probs [n,k_s], flags [n], stats, teacher-space bytes."""
        n, k_s, r0 = scored["n"], self.k_s, scored["r0"]
        ids = np.tile(np.arange(k_s, dtype=np.int64), (n, 1))  # distinct placeholders for rows without target
        probs = np.zeros((n, k_s), dtype=np.float64)
        flags = np.zeros(n, dtype=np.uint8)
        targets = np.zeros(n, dtype=np.int64)
        stats = {"rows": n, "rows_with_target": 0, "rows_aligned": 0, "projected_nll_nats": 0.0,
                 "target_bytes": 0, "teacher_nll_nats": 0.0, "teacher_text_bytes": 0, "docs": 0, "docs_skipped": 0}
        for (_ds, _de, lo, hi, first), d in zip(scored["jobs"], scored["docs"]):
            stats["docs"] += int(first)
            stats["docs_skipped"] += int(first and bool(d.get("skip")))
            out = slice(lo - r0, hi - r0)
            targets[out] = d["stoks"][d["row_lo"] + 1:d["row_hi"] + 1]
            self._fill(d, out, ids, probs, flags, stats)
        self._projected_nll(ids, probs, flags, targets, stats)
        tspace = self._teacher_space(scored["docs"]) if self.cfg.keep_teacher_space else None
        return ids, probs, flags, stats, tspace

    def write(self, si: int, ci: int, ids, probs, flags, stats, tspace, cpu_s: float = 0.0) -> tuple[int, dict, float]:
        n = dc.write_chunk(self.cfg.out, si, ci, ids, probs, flags, bits=self.cfg.prob_bits,
                           level=self.cfg.zstd_level, stats=stats, format_version=self.cfg.format_version,
                           min_prob=self.cfg.min_prob)
        if tspace is not None:
            write_bytes_atomic(Path(self.cfg.keep_teacher_space) / f"s{si:05d}" / f"c{ci:06d}.dkt", tspace)
        return n, stats, cpu_s

    def _fill(self, d: dict, out: slice, ids, probs, flags, stats) -> None:
        """Project one document's teacher rows into the chunk's arrays at `out`."""
        stoks, row_lo, row_hi = d["stoks"], d["row_lo"], d["row_hi"]
        if d.get("skip"):
            return
        tgt_bytes = int(self.sv.piece_len[stoks[row_lo + 1:row_hi + 1]].sum())
        if self.identity:
            ids[out], probs[out] = identity_rows(d["topk_ids"][row_lo:row_hi, :self.k_s],
                                                 d["topk_lp"][row_lo:row_hi, :self.k_s])
            flags[out] = dc.FLAG_ALIGNED
            stats["teacher_nll_nats"] += float(-d["actual_lp"][row_lo:row_hi].astype(np.float64).sum())
        else:
            doc = DocTeacher(d["ttokens"], d["topk_ids"], d["topk_lp"], d["actual_lp"])
            ids[out], probs[out], flags[out] = project_document(stoks, doc, self.teacher_bytes, self.sv,
                                                                range(row_lo, row_hi), self.k_s)
            # the teacher's own NLL over the teacher tokens that start inside these rows' target bytes
            b0, b1 = d["sstarts"][row_lo], d["sstarts"][row_hi]
            ts = d["tstarts"][:-1]
            sel = np.flatnonzero((ts >= b0) & (ts < b1))  # teacher token sel+1 is predicted by row sel
            stats["teacher_nll_nats"] += float(-d["actual_lp"][sel].astype(np.float64).sum())
        stats["teacher_text_bytes"] += tgt_bytes
        stats["target_bytes"] += tgt_bytes

    def _projected_nll(self, ids, probs, flags, targets, stats) -> None:
        """NLL of the actual next tokens under the targets as they will be read back: a stored id's
        probability, else the residual spread evenly over the ids not stored."""
        qids, deq = dc.roundtrip_probs(ids, probs, self.cfg.format_version, self.cfg.prob_bits, self.cfg.min_prob)
        resid = np.float32(1.0) - deq.sum(axis=1, dtype=np.float32)
        rows = np.flatnonzero(flags != dc.FLAG_NONE)
        p_hit = (deq[rows] * (qids[rows] == targets[rows, None])).sum(axis=1)
        q = np.where(p_hit > 0, p_hit, resid[rows] / max(self.sv.vocab_size - self.k_s, 1)).astype(np.float64)
        stats["projected_nll_nats"] += float(-np.log(np.maximum(q, 1e-12)).sum())
        stats["rows_with_target"] += len(rows)
        stats["rows_aligned"] += int((flags[rows] == dc.FLAG_ALIGNED).sum())

    def _teacher_space(self, docs: list[dict]) -> bytes:
        """Teacher-space records of a chunk (--keep-teacher-space): b"DKTS" | uint32 header_len | JSON header
        | zstd of per-doc [tokens int32 [n], topk_ids int32 [n-1,k], topk_lp f32 [n-1,k], actual_lp f32 [n-1]]
        (rows not needed by this chunk hold NaN log-probabilities)."""
        import zstandard

        parts = []
        for d in docs:
            parts += [d["ttokens"].astype("<i4").tobytes(), d["topk_ids"].astype("<i4").tobytes(),
                      d["topk_lp"].astype("<f4").tobytes(), d["actual_lp"].astype("<f4").tobytes()]
        header = json.dumps({"format": "distill-teacher-space", "version": 1, "k": self.cfg.k,
                             "teacher": self.teacher_meta, "doc_tokens": [len(d["ttokens"]) for d in docs]}).encode()
        return b"DKTS" + len(header).to_bytes(4, "little") + header + zstandard.ZstdCompressor(level=3).compress(b"".join(parts))


class Precompute:
    def __init__(self, cfg: PrecomputeConfig, spec: TeacherSpec, backend: TeacherBackend):
        from distill.tokenizer import load_tokenizer, tokenizer_hash

        self.cfg, self.spec, self.backend = cfg, spec, backend
        self.sp = load_tokenizer(cfg.tokenizer)
        self.sv = StudentVocab(self.sp)
        self.paths = resolve_shards(cfg.shards)
        self.stream = _Stream(self.paths, self.sv.vocab_size)
        self.identity = spec.kind == "inhouse"
        if self.identity and backend.vocab_size != self.sv.vocab_size:
            raise DistillError(f"--teacher {cfg.teacher}: in-house teacher vocab {backend.vocab_size} differs from "
                               f"the student tokenizer's {self.sv.vocab_size} (not the same tokenizer)")
        # stored ids per row: k_s of the teacher's k (an in-house teacher's top-k_s of its descending top-k)
        self.k_s = min(cfg.k, cfg.k_student or cfg.k) if self.identity else (cfg.k_student or cfg.k)
        if self.k_s > self.sv.vocab_size:
            raise DistillError(f"--k {self.k_s}: larger than the student vocab ({self.sv.vocab_size})")
        if not self.identity:
            from teachers.registry import TeacherTokenizer

            self.ttok = TeacherTokenizer(spec)
            # model vocab may be padded past the tokenizer's: such ids spell no bytes
            extra = backend.vocab_size - len(self.ttok.token_bytes)
            self.ttok.token_bytes = self.ttok.token_bytes + [b""] * max(extra, 0)
        self.recs = [dc.shard_record(p) for p in self.paths]
        self.meta = {
            "teacher": {"id": spec.model_id, "revision": spec.revision, "kind": spec.kind},
            "backend": {"name": backend.name, "version": backend.version, "max_len": backend.max_len},
            "teacher_k": cfg.k,
            "projection": {"version": PROJECTION_VERSION, "kind": "identity" if self.identity else "topk-chain"},
            "student_vocab_size": self.sv.vocab_size,
        }
        self.tok_hash = tokenizer_hash(cfg.tokenizer)
        self.projector = ChunkProjector(cfg, self.identity, self.k_s, None if self.identity else self.ttok.token_bytes,
                                        self.meta["teacher"], sv=self.sv)

    # ------------------------------------------------------------------ plan / resume
    def _plan(self) -> dict:
        plan = {"format": dc.FORMAT, "format_version": self.cfg.format_version, "min_prob": self.cfg.min_prob, **self.meta, "k": self.k_s,
                "chunk_rows": self.cfg.chunk_rows, "prob_bits": self.cfg.prob_bits,
                "zstd_level": self.cfg.zstd_level, "batch_tokens": self.cfg.batch_tokens,
                "student_tokenizer_sha256": self.tok_hash, "shards": self.recs}
        return json.loads(json.dumps(plan))

    def chunks(self) -> list[tuple[int, int]]:
        return [(si, ci) for si, r in enumerate(self.recs)
                for ci in range(dc.num_chunks(r["tokens"], self.cfg.chunk_rows))]

    def _rows_of(self, si: int, ci: int) -> int:
        return min(self.cfg.chunk_rows, self.recs[si]["tokens"] - ci * self.cfg.chunk_rows)

    def run(self) -> dict:
        out = Path(self.cfg.out)
        plan = self._plan()
        plan_path = out / "plan.json"
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if old != plan:
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise DistillError(f"{out}: holds a run with different settings ({', '.join(diff)}); use a new --out")
        else:
            try:
                write_json_atomic(plan_path, plan)
            except OSError as e:
                raise DistillError(f"{out}: cannot write ({e.strerror or e})") from None
        mine = [c for n, c in enumerate(self.chunks()) if n % self.cfg.num_workers == self.cfg.worker_index]
        todo = [(si, ci) for si, ci in mine if not dc.chunk_path(out, si, ci).is_file()]
        total = sum(self._rows_of(*c) for c in mine)
        done = total - sum(self._rows_of(*c) for c in todo)
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                   desc="precompute", disable=not self.cfg.progress)
        t0, new_rows, new_bytes = time.time(), 0, 0
        run_stats = {"rows": 0, "rows_with_target": 0, "docs": 0, "docs_skipped": 0}
        self.timing = {"score_s": 0.0, "project_cpu_s": 0.0}  # for `distill bench precompute`

        def settle(res: tuple) -> None:
            nonlocal new_bytes
            nbytes, stats, cpu_s = res
            new_bytes += nbytes
            self.timing["project_cpu_s"] += cpu_s
            for key in run_stats:
                run_stats[key] += stats.get(key, 0)
            self._check_skips(run_stats, final=False)

        # --workers 1: projection in this process, compression + the atomic write of chunk c in a thread
        # (zstd releases the GIL) while chunk c+1 is scored. --workers N: projection, compression and the
        # write of each chunk in one of N processes while this one scores the next chunks. At most N
        # chunks in flight (memory stays bounded); each chunk's bytes depend only on the chunk, so the
        # order in which they finish is irrelevant and the output is identical to --workers 1.
        workers = max(1, self.cfg.projection_workers)
        pending: deque[Future] = deque()
        pool = self._pool(workers)
        try:
            for si, ci in todo:
                shown = [0]  # rows of this chunk the bar already shows (advanced per teacher batch)

                def advance(rows: int, shown=shown) -> None:
                    bar.update(rows)
                    shown[0] += rows

                scored = self.score_chunk(si, ci, advance)
                if workers == 1:
                    c0 = time.thread_time()
                    result = self.projector.project(scored)
                    cpu_s = time.thread_time() - c0
                    while pending:
                        settle(self._finish(pending.popleft()))
                    pending.append(pool.submit(self.projector.write, scored["si"], scored["ci"], *result, cpu_s=cpu_s))
                else:
                    while len(pending) >= workers:
                        settle(self._finish(pending.popleft()))
                    pending.append(pool.submit(_project_and_write, scored))
                new_rows += scored["n"]
                bar.update(scored["n"] - shown[0])  # the rest of the chunk
                bar.set_postfix_str(f"{new_bytes / max(new_rows - scored['n'], 1):.1f} B/tok")
            while pending:
                settle(self._finish(pending.popleft()))
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        secs = time.time() - t0
        summary = {"tokens_scored": new_rows, "seconds": round(secs, 3),
                   "tokens_per_s": round(new_rows / secs, 1) if secs > 0 else 0.0, **run_stats}
        summary["complete"] = all(dc.chunk_path(out, *c).is_file() for c in self.chunks())
        if summary["complete"]:
            manifest = dc.build_manifest(out, self.recs, self.tok_hash, self.k_s, self.cfg.chunk_rows,
                                         self.cfg.prob_bits, self.meta)
            self._check_skips(manifest["stats"], final=True)  # before the manifest: no silent CE cache
            self._report_skips(manifest["stats"], "all chunks")
            write_json_atomic(out / "manifest.json", manifest)
            for tmp in (out / "chunks").rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)  # leftovers of a killed write
            summary.update({k: manifest["stats"].get(k) for k in
                            ("tokens", "bytes_on_disk", "bytes_per_token", "aligned_fraction",
                             "projected_teacher_bpb", "teacher_bpb", "docs", "docs_skipped")})
        else:
            self._check_skips(run_stats, final=True)
            self._report_skips(run_stats, "this run")
        bpt = summary.get("bytes_per_token", new_bytes / max(new_rows, 1))
        print(f"precompute: {new_rows} tokens in {secs:.1f}s ({summary['tokens_per_s']} tok/s), {bpt:.2f} bytes/token"
              + ("" if summary["complete"] else " (other workers' chunks pending)"), file=sys.stderr)
        return summary

    def _pool(self, workers: int) -> Executor:
        if workers == 1:
            return ThreadPoolExecutor(max_workers=1)
        import multiprocessing as mp

        # spawn, never fork: this process holds the teacher (torch / CUDA state, OpenMP threads)
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.projector.state(),))

    def _report_skips(self, st: dict, scope: str) -> None:
        rows, tgt = int(st.get("rows", 0)), int(st.get("rows_with_target", 0))
        docs, skipped = int(st.get("docs", 0)), int(st.get("docs_skipped", 0))
        print(f"precompute: rows with targets {tgt}/{rows} ({tgt / max(rows, 1):.1%}), documents skipped "
              f"{skipped}/{docs} ({skipped / max(docs, 1):.1%}) [{scope}]", file=sys.stderr)

    def _check_skips(self, st: dict, final: bool) -> None:
        """More than MAX_SKIP_RATE of the documents without targets (the teacher tokenizer cannot spell the
        student's text, e.g. a normaliser adding a leading space) would quietly turn KD into CE: refuse,
        unless --allow-skips. Mid-run only once MIN_DOCS_FOR_CHECK documents were seen (fail early on
        hours-long passes)."""
        docs, skipped = int(st.get("docs", 0)), int(st.get("docs_skipped", 0))
        if self.cfg.allow_skips or docs == 0 or (not final and docs < MIN_DOCS_FOR_CHECK):
            return
        if skipped > MAX_SKIP_RATE * docs:
            raise DistillError(f"--teacher {self.cfg.teacher}: {skipped} of {docs} documents skipped "
                               f"({skipped / docs:.1%} > {MAX_SKIP_RATE:.0%}): its tokenizer does not reproduce the "
                               f"student's text, those rows would be plain CE; --allow-skips to accept")

    def _finish(self, fut: Future) -> tuple:
        try:
            return fut.result()
        except OSError as e:  # disk full, permissions...: the atomic write left nothing half-written
            raise DistillError(f"{self.cfg.out}: write failed ({e.strerror or e}); "
                               "fix it and rerun the same command to resume") from None
        except BrokenProcessPool:
            raise DistillError("--workers: a projection worker process died (out of memory?); rerun the same "
                               "command to resume") from None

    # ------------------------------------------------------------------ one chunk
    def process_chunk(self, si: int, ci: int, progress=None):
        """Targets of chunk (si, ci): ids [n,k_s], probs [n,k_s], flags [n], stats, teacher-space bytes."""
        return self.projector.project(self.score_chunk(si, ci, progress))

    def score_chunk(self, si: int, ci: int, progress=None) -> dict:
        """The teacher half of chunk (si, ci): the documents overlapping it with their teacher rows filled
        (plain arrays and ints: it crosses to a projection process as is)."""
        off = int(self.stream.offsets[si])
        shard_end = off + self.stream.sizes[si]
        r0 = off + ci * self.cfg.chunk_rows
        r1 = min(r0 + self.cfg.chunk_rows, shard_end)
        # each document's rows in this chunk that have a target (not the doc's last token, not the shard's)
        jobs = []
        for ds, de in self.stream.docs_overlapping(r0, r1):
            lo, hi = max(ds, r0), min(de - 1, r1, shard_end - 1)
            if lo < hi:
                # a document is counted once per shard: in the chunk holding its first row with a target
                jobs.append((ds, de, lo, hi, lo == max(ds, off)))
        docs = [self._prepare(ds, de, lo - ds, hi - ds) for ds, de, lo, hi, _ in jobs]
        seqs, where = [], []
        for d_i, d in enumerate(docs):
            for w in d["windows"]:
                seqs.append(d["ttokens"][w[0]:w[1]].tolist())
                where.append((d_i, w))
        t0 = time.perf_counter()
        scores = self._score(seqs, r1 - r0, progress)
        if hasattr(self, "timing"):
            self.timing["score_s"] += time.perf_counter() - t0
        check_scores(scores, seqs, self.cfg.k)
        for (d_i, (s, _e, lo, hi)), sc in zip(where, scores):
            d = docs[d_i]
            d["topk_ids"][lo:hi] = sc.topk_ids[lo - s:hi - s]
            d["topk_lp"][lo:hi] = sc.topk_logprobs[lo - s:hi - s]
            d["actual_lp"][lo:hi] = sc.actual_logprob[lo - s:hi - s]
        return {"si": si, "ci": ci, "r0": r0, "n": r1 - r0, "jobs": jobs, "docs": docs}

    def _score(self, seqs: list[list[int]], rows: int, progress=None):
        """backend.score; when the backend reports per batch (`on_progress`), `progress(r)` is called with the
        chunk rows that the teacher tokens scored so far stand for (the caller settles the exact count)."""
        if not seqs:
            return []
        if progress is None or not hasattr(self.backend, "on_progress"):
            return self.backend.score(seqs, self.cfg.k)
        total, state = sum(len(s) for s in seqs), {"done": 0, "shown": 0}

        def advance(n_tokens: int) -> None:
            state["done"] += n_tokens
            shown = min(rows, rows * state["done"] // max(total, 1))
            if shown > state["shown"]:
                progress(shown - state["shown"])
                state["shown"] = shown

        self.backend.on_progress = advance
        try:
            return self.backend.score(seqs, self.cfg.k)
        finally:
            self.backend.on_progress = None

    def _prepare(self, ds: int, de: int, row_lo: int, row_hi: int) -> dict:
        """Teacher tokens of one document and the windows needed for its student rows [row_lo, row_hi)."""
        stoks = self.stream.get(ds, de)
        if stoks[0] != BOS_ID:  # the stream starts mid-document: score the rest as a document of its own
            stoks = np.concatenate([[BOS_ID], stoks])
            row_lo, row_hi = row_lo + 1, row_hi + 1
        d = {"stoks": stoks, "row_lo": row_lo, "row_hi": row_hi}
        if self.identity:
            ttokens, t_lo, t_hi = stoks, row_lo, row_hi
        else:
            text = b"".join(self.sv.piece_bytes[int(t)] for t in stoks[1:])
            try:
                tids = self.ttok.encode(text.decode("utf-8"))
            except UnicodeDecodeError:
                tids = None
            if tids is None:  # the teacher tokenizer cannot spell this text exactly: no targets
                tids, d["skip"] = [], True
            elif tids and max(tids) >= self.backend.vocab_size:
                raise DistillError(f"--teacher {self.cfg.teacher}: tokenizer id {max(tids)} is outside the model's "
                                   f"vocab ({self.backend.vocab_size}); tokenizer and model do not match")
            ttokens = np.array([self.ttok.bos_id] + tids, dtype=np.int64)
            tstarts = np.concatenate([[0], np.cumsum([len(self.ttok.token_bytes[t]) for t in tids])]).astype(np.int64)
            sstarts = np.concatenate([[0], np.cumsum([len(self.sv.piece_bytes[int(t)]) for t in stoks[1:]])]).astype(np.int64)
            d.update(tstarts=tstarts, sstarts=sstarts)
            # teacher rows for the tokens spanning the needed student bytes, plus the chain's reach
            t_lo = max(int(np.searchsorted(tstarts, sstarts[row_lo], side="right")) - 1, 0)
            t_hi = min(int(np.searchsorted(tstarts, sstarts[row_hi], side="right")) + CHAIN_REACH, len(ttokens) - 1)
        n, k = len(ttokens), self.cfg.k
        d.update(ttokens=ttokens, topk_ids=np.zeros((max(n - 1, 0), k), np.int32),
                 topk_lp=np.full((max(n - 1, 0), k), np.nan, np.float32),
                 actual_lp=np.full(max(n - 1, 0), np.nan, np.float32))
        d["windows"] = [] if n < 2 else [
            (s, e, max(lo, t_lo), min(hi, t_hi)) for s, e, lo, hi in windows(n, self.backend.max_len)
            if lo < t_hi and hi > t_lo]
        return d


_WORKER: ChunkProjector | None = None  # the projector of a --workers process


def _init_worker(state: tuple) -> None:
    global _WORKER
    _WORKER = ChunkProjector(*state)


def _project_and_write(scored: dict) -> tuple[int, dict, float]:
    """A --workers process's job: project and write one chunk; returns (bytes, stats, projection CPU s)."""
    c0 = time.thread_time()
    result = _WORKER.project(scored)
    cpu_s = time.thread_time() - c0
    return _WORKER.write(scored["si"], scored["ci"], *result, cpu_s=cpu_s)


def longest_doc_bytes(paths: list[Path], piece_len: np.ndarray, block: int = 1 << 24) -> int:
    """Bytes of the longest document of the token stream (documents may straddle shards): an upper bound
    on any teacher's tokens for it (every teacher token spells >= 1 byte), so the longest window a pass
    can submit is this + 1 (the teacher BOS)."""
    best = cur = 0
    for p in paths:
        toks = read_shard(p, vocab_size=len(piece_len))
        for a in range(0, int(toks.shape[0]), block):
            blk = np.asarray(toks[a:a + block]).astype(np.int64)
            lens = piece_len[blk]
            cs = np.concatenate([[0], np.cumsum(lens)])
            bos = np.flatnonzero(blk == BOS_ID)
            if len(bos) == 0:
                cur += int(cs[-1])
                continue
            best = max(best, cur + int(cs[bos[0]]))  # the document running into this block ends here
            seg = cs[np.append(bos[1:], len(blk))] - cs[bos]
            best = max(best, int(seg[:-1].max(initial=0)))
            cur = int(seg[-1])
    return max(best, cur)


def run_precompute(cfg: PrecomputeConfig) -> dict:
    from distill.tokenizer import load_tokenizer
    from teachers.registry import resolve_teacher

    if cfg.k < 1:
        raise DistillError(f"--k {cfg.k}: must be >= 1")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise DistillError(f"--shard-index {cfg.worker_index}: must lie in [0, --num-shards={cfg.num_workers})")
    if cfg.keep_teacher_space and Path(cfg.out).resolve() == Path(cfg.keep_teacher_space).resolve():
        raise DistillError("--keep-teacher-space: must differ from --out (--out holds only the student-space cache)")
    spec = resolve_teacher(cfg.teacher)
    load_tokenizer(cfg.tokenizer)  # fail fast on bad input, before loading a large model
    for p in resolve_shards(cfg.shards):
        from distill.shards import read_header

        read_header(p)
    max_model_len = cfg.max_model_len
    if max_model_len is None and cfg.backend == "vllm":
        # vLLM sizes its KV layout and scheduler for max_model_len: give it what this pass needs, not the
        # model's 32k/128k context (the backend caps this at the context)
        from teachers.projection import StudentVocab

        piece_len = StudentVocab(load_tokenizer(cfg.tokenizer)).piece_len
        max_model_len = max(longest_doc_bytes(resolve_shards(cfg.shards), piece_len) + 1, 2)
    backend = make_backend(cfg.backend, spec, max_model_len=max_model_len, batch_tokens=cfg.batch_tokens,
                           max_k=cfg.k, device=cfg.device, dtype=cfg.dtype)
    try:
        if cfg.k > backend.max_k:
            raise DistillError(f"--k {cfg.k}: above the {backend.name} engine's limit ({backend.max_k})")
        return Precompute(cfg, spec, backend).run()
    finally:
        close = getattr(backend, "close", None)
        if close is not None:  # vLLM: stop the engine process(es) now, not in the interpreter's teardown
            close()
