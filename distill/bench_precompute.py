"""`distill bench precompute`: what bounds the teacher pass, scoring or projection, measured separately.

    distill bench precompute --teacher T --tokenizer S.model --docs F.jsonl [--k 32] [--k-student KS] [--max-docs N]
        [--workers N] [--projection-only] [--json]

Full pass (default): the documents are encoded with the student tokenizer into a token shard and
`distill teacher precompute` runs on it for real (--workers N projection processes beside the scoring
process); the pass records the seconds spent scoring (teacher forward) and projecting (CPU seconds, summed
over the workers), which give rows/s for each. `bound` is the side with the lower capacity: scoring rows/s
vs projection rows/s per core x workers.
--projection-only: no teacher forward. Teacher top-k is synthetic but realistic: at each teacher position
the k most frequent successors of the previous teacher token in these documents (bigram counts, with
smoothed probabilities; the actual token's log-probability from the same model), so the candidates,
their byte lengths and their spread over the vocabulary look like a real teacher's. Every row is projected
by `teachers.projection.project_document` (split over --workers processes by document).
The JSON also holds the figure for the record run: rows of the 7.2 B-token pass and the hours the
measured rates imply (scoring on this machine's engine; projection in core-hours).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from distill.bench import print_result
from distill.errors import DistillError

if TYPE_CHECKING:  # numpy loads inside the functions: `distill bench --help` stays fast
    import numpy as np

RECORD_TOKENS = 7_200_000_000  # the record run's training tokens = student rows of its teacher pass


def load_docs(path: str, max_docs: int | None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"--docs {path}: no such file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise DistillError(f"--docs {path}: line {n} is not a JSON object with a \"text\" field") from None
        if max_docs and len(out) >= max_docs:
            break
    if not out:
        raise DistillError(f"--docs {path}: no documents")
    return out


def aligned_docs(sv, ttok, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(student ids [BOS]+ids, teacher ids [BOS]+ids) of each document the teacher tokenizer spells exactly
    (the text is the student's decoding, as in the precompute)."""
    import numpy as np

    from distill.tokenizer import encode_docs

    out = []
    for sids in encode_docs(sv.sp, texts, num_threads=1):
        text = b"".join(sv.piece_bytes[t] for t in sids[1:])
        tids = ttok.encode(text.decode("utf-8", errors="strict")) if text else None
        if tids:
            out.append((np.asarray(sids, np.int64), np.asarray([ttok.bos_id] + tids, np.int64)))
    return out


def synthetic_teacher(tdocs: list[np.ndarray], k: int, alpha: float = 2.0):
    """DocTeacher per document from bigram statistics of the documents themselves (see the module doc)."""
    import numpy as np

    from teachers.projection import DocTeacher

    uni = Counter()
    big: dict[int, Counter] = defaultdict(Counter)
    for t in tdocs:
        uni.update(t[1:].tolist())
        for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
            big[a][b] += 1
    total = sum(uni.values())
    uni_top = [c for c, _ in uni.most_common(k)]
    punigram = {c: n / total for c, n in uni.items()}

    def dist(prev: int) -> tuple[list[int], list[float], Counter, int]:
        succ = big[prev]
        n = sum(succ.values())
        ids = [c for c, _ in succ.most_common(k)]
        ids += [c for c in uni_top if c not in set(ids)][: k - len(ids)]
        probs = np.asarray([(succ.get(c, 0) + alpha * punigram.get(c, 1e-9)) / (n + alpha) for c in ids])
        order = np.argsort(-probs, kind="stable")
        return np.asarray(ids, np.int32)[order], np.log(probs[order]).astype(np.float32), succ, n

    cache: dict[int, tuple] = {}
    out = []
    for t in tdocs:
        n = len(t)
        ids = np.zeros((n - 1, k), np.int32)
        lp = np.zeros((n - 1, k), np.float32)
        act = np.zeros(n - 1, np.float32)
        for j in range(n - 1):
            prev = int(t[j])
            if prev not in cache:
                cache[prev] = dist(prev)
            ids[j], lp[j], succ, cnt = cache[prev]
            a = int(t[j + 1])
            act[j] = math.log((succ.get(a, 0) + alpha * punigram.get(a, 1e-9)) / (cnt + alpha))
        out.append(DocTeacher(t, ids, lp, act))
    return out


def _project_slice(args: tuple) -> tuple[int, float]:
    """Worker: project every row of the given documents; (rows, CPU seconds)."""
    tokenizer, tb, sids, tdocs, k_s, reference = args
    from distill.tokenizer import load_tokenizer
    from teachers.projection import StudentVocab, project_document, project_rows_python

    sv = StudentVocab(load_tokenizer(tokenizer))
    sv.projector(tb)  # the per-pair tables are built once, outside the timing (as in a precompute run)
    fn = project_rows_python if reference else project_document
    c0, rows = time.thread_time(), 0
    for s, d in zip(sids, tdocs):
        fn(s, d, tb, sv, range(len(s) - 1), k_s)
        rows += len(s) - 1
    return rows, time.thread_time() - c0


def projection_only(teacher: str, tokenizer: str, docs: str, k: int, max_docs: int | None, workers: int,
                    reference: bool = False, k_student: int | None = None) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from distill.tokenizer import load_tokenizer
    from teachers.projection import StudentVocab
    from teachers.registry import TeacherTokenizer, resolve_teacher

    sv = StudentVocab(load_tokenizer(tokenizer))
    ttok = TeacherTokenizer(resolve_teacher(teacher))
    pairs = aligned_docs(sv, ttok, load_docs(docs, max_docs))
    t0 = time.perf_counter()
    tdocs = synthetic_teacher([p[1] for p in pairs], k)
    synth_s = time.perf_counter() - t0
    sids = [p[0] for p in pairs]
    res: dict = {"mode": "projection-only", "teacher_topk": "synthetic (bigram)", "synthesis_s": round(synth_s, 2)}
    slices = [(tokenizer, ttok.token_bytes, sids[w::workers], tdocs[w::workers], k_student or k)
              for w in range(workers)]
    for name, ref in (("", False),) + ((("reference_", True),) if reference else ()):
        t0 = time.perf_counter()
        if workers == 1:
            parts = [_project_slice(a + (ref,)) for a in slices]
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                parts = list(pool.map(_project_slice, [a + (ref,) for a in slices]))
        wall = time.perf_counter() - t0
        rows, cpu = sum(p[0] for p in parts), sum(p[1] for p in parts)
        res[f"{name}projection_rows_per_s_per_core"] = round(rows / cpu, 1)
        res[f"{name}projection_rows_per_s"] = round(rows / cpu * workers, 1)
        res[f"{name}projection_wall_s"] = round(wall, 2)
        res["rows"] = rows
    if reference:
        res["speedup_vs_reference"] = round(res["projection_rows_per_s_per_core"]
                                            / res["reference_projection_rows_per_s_per_core"], 2)
    res.update(docs=len(pairs), scoring_rows_per_s=None, bound=None)
    return res


def full_pass(teacher: str, tokenizer: str, docs: str, k: int, max_docs: int | None, workers: int,
              backend: str, max_model_len: int | None, dtype: str | None, k_student: int | None = None) -> dict:
    from distill.shards import write_shard
    from distill.tokenizer import encode_docs, load_tokenizer, pack_docs
    from teachers.backend import make_backend
    from teachers.precompute import Precompute, PrecomputeConfig
    from teachers.registry import resolve_teacher

    texts = load_docs(docs, max_docs)
    stream = pack_docs(encode_docs(load_tokenizer(tokenizer), texts, num_threads=1))
    with tempfile.TemporaryDirectory(prefix="bench_precompute_") as tmp:
        write_shard(Path(tmp) / "fineweb_bench_000000.bin", stream)
        cfg = PrecomputeConfig(teacher=teacher, tokenizer=tokenizer, shards=f"{tmp}/*.bin", out=f"{tmp}/out",
                               backend=backend, k=k, k_student=k_student, max_model_len=max_model_len, dtype=dtype,
                               projection_workers=workers, allow_skips=True, progress=False)
        spec = resolve_teacher(teacher)
        be = make_backend(backend, spec, max_model_len=max_model_len, batch_tokens=cfg.batch_tokens, max_k=k,
                          dtype=dtype)
        pc = Precompute(cfg, spec, be)
        summary = pc.run()
    rows = summary["tokens_scored"]
    score_rate = rows / max(pc.timing["score_s"], 1e-9)
    per_core = rows / max(pc.timing["project_cpu_s"], 1e-9)
    return {"mode": "full", "docs": len(texts), "rows": rows, "wall_s": summary["seconds"],
            "pass_rows_per_s": summary["tokens_per_s"], "scoring_rows_per_s": round(score_rate, 1),
            "projection_rows_per_s_per_core": round(per_core, 1),
            "projection_rows_per_s": round(per_core * workers, 1), "docs_skipped": summary.get("docs_skipped"),
            "bound": "scoring" if score_rate < per_core * workers else "projection", "backend": be.version}


def run_bench(args: argparse.Namespace) -> dict:
    for flag, v in (("--k", args.k), ("--workers", args.workers)):
        if v < 1:
            raise DistillError(f"{flag} {v}: must be >= 1")
    if args.k_student is not None and not 0 < args.k_student <= args.k:
        raise DistillError(f"--k-student {args.k_student}: expected 1..--k ({args.k})")
    if args.projection_only:
        res = projection_only(args.teacher, args.tokenizer, args.docs, args.k, args.max_docs, args.workers,
                              args.reference, args.k_student)
    else:
        res = full_pass(args.teacher, args.tokenizer, args.docs, args.k, args.max_docs, args.workers,
                        args.backend, args.max_model_len, args.dtype, args.k_student)
    res.update(workers=args.workers, k=args.k, k_student=args.k_student or args.k, teacher=args.teacher,
               cpu_count=os.cpu_count())
    # the record run: one row per training token; hours at the measured rates (this machine)
    res["record_rows"] = RECORD_TOKENS
    if res.get("scoring_rows_per_s"):
        res["record_scoring_hours"] = round(RECORD_TOKENS / res["scoring_rows_per_s"] / 3600, 1)
    res["record_projection_core_hours"] = round(RECORD_TOKENS / res["projection_rows_per_s_per_core"] / 3600, 1)
    res["record_projection_hours"] = round(RECORD_TOKENS / res["projection_rows_per_s"] / 3600, 1)
    return res


def _handler(args: argparse.Namespace) -> int:
    res = run_bench(args)
    line = (f"projection {res['projection_rows_per_s_per_core']:.0f} rows/s/core x {res['workers']} workers"
            + (f", scoring {res['scoring_rows_per_s']:.0f} rows/s: bound by {res['bound']}"
               if res.get("scoring_rows_per_s") else "")
            + f"; record pass ({RECORD_TOKENS / 1e9:.1f} B rows): {res['record_projection_core_hours']} "
              f"projection core-hours")
    return print_result(line, res, args.json)


def add_subparser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("precompute", help="teacher pass: scoring vs projection rows/s",
                                    description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="as for `distill teacher precompute` (a foreign tokenizer)")
    p.add_argument("--tokenizer", required=True, help="the student SentencePiece .model")
    p.add_argument("--docs", required=True, help="JSONL with a \"text\" field per line")
    p.add_argument("--k", type=int, default=32, help="teacher top-k (default 32)")
    p.add_argument("--k-student", type=int, default=None, help="student ids stored per row (default: --k)")
    p.add_argument("--max-docs", type=int, default=None, help="use the first N documents")
    p.add_argument("--workers", type=int, default=1, help="projection processes (default 1)")
    p.add_argument("--projection-only", action="store_true",
                   help="no teacher forward: synthetic bigram top-k through the projection only")
    p.add_argument("--reference", action="store_true",
                   help="--projection-only: also time the row-by-row reference projection, side by side")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="full pass: scoring engine")
    p.add_argument("--max-model-len", type=int, default=None, help="full pass: teacher window cap")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="full pass: dtype")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last on stdout)")
    p.set_defaults(func=_handler)
