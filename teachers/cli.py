"""`distill teacher precompute`: teacher targets for student token shards (see teachers/precompute.py).

Multi-GPU on one node (the 8-GPU layout): one precompute process per GPU, each with its own device and
worker index, same --out; each scores on its GPU and projects on --workers CPU processes of its own
(projection is CPU-bound: give each GPU's process enough cores that scoring stays the bound, e.g. 8 GPUs
x (1 + 4 workers) = 40 cores; `distill bench precompute` measures both rates):
    for i in $(seq 0 7); do
      CUDA_VISIBLE_DEVICES=$i distill teacher precompute --backend vllm ... --num-shards 8 --shard-index $i \
          --workers 4 --no-progress > log.$i 2>&1 &
    done; wait
(vLLM's own data parallelism, DISTILL_VLLM_ARGS='{"data_parallel_size": 8}', also works but funnels every
GPU's rows through one projecting process; one process per GPU scales the CPU side with the GPUs.)
Multi-node: the same with --num-shards = total workers over all nodes and --out on a shared filesystem
(or copy every worker's chunks/ into one directory and rerun the command once without --num-shards:
it finds every chunk present and only writes manifest.json).
"""

from __future__ import annotations

import json

from distill.errors import DistillError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("teacher", help="offline teacher scoring")
    sub = p.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND")
    pc = sub.add_parser("precompute", help="score token shards with a teacher; write the student-space cache")
    pc.add_argument("--teacher", required=True,
                    help="HF model id / transformers dir, a .gguf file, or a student checkpoint dir (same tokenizer)")
    pc.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="scoring engine (default hf)")
    pc.add_argument("--tokenizer", required=True, help="the student SentencePiece .model")
    pc.add_argument("--shards", required=True, help="glob of student token shards")
    pc.add_argument("--k", type=int, default=16, help="teacher top-k per position (default 16)")
    pc.add_argument("--k-student", type=int, default=None,
                    help="student ids stored per row after projection (default --k; an in-house teacher stores its top "
                         "min(--k, --k-student))")
    pc.add_argument("--out", required=True, help="cache directory (student space only)")
    pc.add_argument("--num-shards", type=int, default=1, help="number of parallel workers")
    pc.add_argument("--shard-index", type=int, default=0, help="this worker's index in [0, --num-shards)")
    pc.add_argument("--max-model-len", type=int, default=None,
                    help="cap on the teacher window (tokens). Default: the model's context; with --backend vllm, "
                         "what the pass needs (its longest document, an upper bound in teacher tokens, capped at "
                         "the context) so the engine does not reserve a 32k/128k-token KV layout for nothing")
    pc.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    pc.add_argument("--keep-teacher-space", default=None, metavar="DIR2", help="also keep teacher-space records here")
    pc.add_argument("--chunk-rows", type=int, default=65536, help="rows per cache chunk (default 65536)")
    pc.add_argument("--format-version", type=int, default=2, choices=[1, 2],
                    help="cache format: 2 (default) log-coded probabilities, entries below --min-prob folded into "
                         "the residual bucket (~half the bytes of 1); 1 keeps every entry with 12-bit sqrt codes")
    pc.add_argument("--min-prob", type=float, default=2e-3,
                    help="format 2: stored probabilities below this go to the residual bucket (default 2e-3)")
    pc.add_argument("--prob-bits", type=int, default=12, help="format 1: bits per probability code (default 12)")
    pc.add_argument("--zstd-level", type=int, default=12, help="zstd level (default 12)")
    pc.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    pc.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="teacher compute dtype (auto: hf: bf16/fp16 on GPU, bf16 on CPUs with native bf16, else "
                         "fp32; vllm: bf16/fp16 on GPU, fp32 on CPU). Effect on the targets (an estimate, not measured here): "
                         "top-k log-probs are a log-softmax of logits computed in this dtype; bfloat16 keeps 8 "
                         "significant bits (relative error 2^-9), i.e. 0.02-0.06 nats on logits of 10-30, so stored "
                         "probabilities move by a few %% and near-tied candidates may swap; float16 (11 bits) is ~8x "
                         "finer but can overflow on large activations; float32 matches the reference up to "
                         "summation order, at twice the weight memory and lower GPU throughput")
    pc.add_argument("--workers", type=int, default=1,
                    help="projection processes beside the scoring one (default 1: projection in-process, "
                         "after each chunk's scoring); N > 1 overlaps projection with scoring. Same output bytes")
    pc.add_argument("--allow-skips", action="store_true",
                    help="finish even when more than 1%% of the documents get no targets (the teacher tokenizer "
                         "cannot spell the text: those rows are plain CE); default: exit 2")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")
    pc.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    pc.set_defaults(func=_precompute)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _precompute(args) -> int:
    from teachers.precompute import PrecomputeConfig, run_precompute

    for flag, v, lo in (("--k", args.k, 1), ("--num-shards", args.num_shards, 1), ("--batch-tokens", args.batch_tokens, 2),
                        ("--chunk-rows", args.chunk_rows, 1), ("--workers", args.workers, 1)):
        if v < lo:
            raise DistillError(f"{flag} {v}: must be >= {lo}")
    if not 0 < args.min_prob < 0.5:
        raise DistillError(f"--min-prob {args.min_prob}: must lie in (0, 0.5)")
    if not 6 <= args.prob_bits <= 16:
        raise DistillError(f"--prob-bits {args.prob_bits}: must lie in [6, 16]")
    cfg = PrecomputeConfig(
        teacher=args.teacher, tokenizer=args.tokenizer, shards=args.shards, out=args.out, backend=args.backend,
        k=args.k, k_student=args.k_student, num_workers=args.num_shards, worker_index=args.shard_index,
        max_model_len=args.max_model_len, batch_tokens=args.batch_tokens, keep_teacher_space=args.keep_teacher_space,
        chunk_rows=args.chunk_rows, prob_bits=args.prob_bits, format_version=args.format_version,
        min_prob=args.min_prob, zstd_level=args.zstd_level, device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress, projection_workers=args.workers, allow_skips=args.allow_skips,
    )
    summary = run_precompute(cfg)
    if args.json:
        print(json.dumps(summary))
    return 0
