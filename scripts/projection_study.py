"""What the projected targets look like at several teacher top-k, with and without the v3 segmentation rule.

Scores the first --max-docs documents once with a foreign teacher (transformers backend, top --k-max), then
for each k and each rule projects every row with `teachers.projection.project_document` (the product's code;
v2 = `SEGMENT_CONSISTENT` off, v3 = on) keeping --k-student ids, and reports per rule and k:
  projected bpb  NLL of the actual next student token under the targets as stored (a stored id's probability,
                 else the residual spread over the other ids), over the documents' bytes
  aligned / inside   rows whose student token starts on / inside a teacher token: their mean NLL and mean
                 largest stored probability
next to the teacher's own bpb on the same bytes. A projected bpb below the teacher's own is the label leaking
into the targets (the actual token is always a candidate), not a better teacher.

    python scripts/projection_study.py --teacher SmolLM2.gguf --tokenizer sp1024.model \\
        --docs ../shared/data/fineweb/fineweb_val_head_docs.jsonl --max-docs 37 --k 16 32 128 512 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="a foreign-tokenizer teacher (HF id, dir or .gguf)")
    ap.add_argument("--tokenizer", required=True, help="the student SentencePiece .model")
    ap.add_argument("--docs", required=True, help="JSONL with a \"text\" field per line")
    ap.add_argument("--max-docs", type=int, default=37)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 128, 512], help="teacher top-k values")
    ap.add_argument("--k-student", type=int, default=16, help="student ids stored per row (default 16)")
    ap.add_argument("--max-model-len", type=int, default=8192, help="teacher window (default 8192)")
    ap.add_argument("--json", action="store_true", help="one JSON line last")
    args = ap.parse_args(argv)

    import numpy as np

    import teachers.projection as proj
    from distill.bench_precompute import aligned_docs, load_docs
    from distill.tokenizer import load_tokenizer
    from teachers.backend_hf import HFBackend
    from teachers.registry import TeacherTokenizer, resolve_teacher

    sv = proj.StudentVocab(load_tokenizer(args.tokenizer))
    spec = resolve_teacher(args.teacher)
    ttok = TeacherTokenizer(spec)
    pairs = aligned_docs(sv, ttok, load_docs(args.docs, args.max_docs))
    kmax = max(args.k)
    backend = HFBackend(spec, max_model_len=args.max_model_len, batch_tokens=8192, max_k=kmax, device=None)
    tb = ttok.token_bytes + [b""] * max(backend.vocab_size - len(ttok.token_bytes), 0)
    kept = [p for p in pairs if len(p[1]) <= args.max_model_len]  # one window per document: exact targets
    if len(kept) < len(pairs):
        print(f"left out {len(pairs) - len(kept)} documents longer than --max-model-len {args.max_model_len} "
              "teacher tokens", file=sys.stderr)
    pairs = kept
    scores = backend.score([t.tolist() for _, t in pairs], kmax)
    n_bytes = sum(int(sv.piece_len[s[1:]].sum()) for s, _ in pairs)
    teacher_nll = -sum(float(sc.actual_logprob.astype(np.float64).sum()) for sc in scores)
    out = {"docs": len(pairs), "bytes": n_bytes, "rows": sum(len(s) - 1 for s, _ in pairs),
           "teacher_bpb": teacher_nll / n_bytes / math.log(2), "k_student": args.k_student, "results": []}
    print(f"{len(pairs)} docs, {out['rows']} student rows, {n_bytes} bytes; teacher's own bpb "
          f"{out['teacher_bpb']:.4f}", file=sys.stderr)
    saved = proj.SEGMENT_CONSISTENT
    try:
        for k in args.k:
            for rule, seg in (("v2", False), ("v3", True)):
                proj.SEGMENT_CONSISTENT = seg
                nll = {1: 0.0, 2: 0.0}
                maxp = {1: 0.0, 2: 0.0}
                cnt = {1: 0, 2: 0}
                for (sids, tids), sc in zip(pairs, scores):
                    doc = proj.DocTeacher(tids, sc.topk_ids[:, :k], sc.topk_logprobs[:, :k], sc.actual_logprob)
                    ids, probs, flags = proj.project_document(sids, doc, tb, sv, range(len(sids) - 1),
                                                              args.k_student)
                    tgt = sids[1:]
                    resid = np.maximum(1.0 - probs.sum(1), 0.0) / (sv.vocab_size - args.k_student)
                    hit = (probs * (ids == tgt[:, None])).sum(1)
                    p = np.where(hit > 0, hit, resid)
                    for f in (1, 2):
                        m = flags == f
                        nll[f] += float(-np.log(np.maximum(p[m], 1e-12)).sum())
                        maxp[f] += float(probs[m].max(1).sum()) if m.any() else 0.0
                        cnt[f] += int(m.sum())
                r = {"k": k, "rule": rule, "projected_bpb": (nll[1] + nll[2]) / n_bytes / math.log(2),
                     "aligned_nll": nll[1] / max(cnt[1], 1), "aligned_maxp": maxp[1] / max(cnt[1], 1),
                     "inside_nll": nll[2] / max(cnt[2], 1), "inside_maxp": maxp[2] / max(cnt[2], 1),
                     "aligned_rows": cnt[1], "inside_rows": cnt[2]}
                out["results"].append(r)
                print(f"k={k:4d} {rule}: projected bpb {r['projected_bpb']:.4f} | aligned nll {r['aligned_nll']:.3f} "
                      f"max p {r['aligned_maxp']:.3f} | inside nll {r['inside_nll']:.3f} max p {r['inside_maxp']:.3f}",
                      flush=True)
    finally:
        proj.SEGMENT_CONSISTENT = saved
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
