"""`distill bench loader`: can the KD loader keep a record-pace rank fed?

    distill bench loader --cache DIR --shards GLOB [--rows-per-step 65536] [--world 8] [--rank 0]
        [--workers 2] [--steps 40] [--warmup 4] [--device auto|cpu|cuda] [--step-ms 43.54] [--json]

One rank's `student.loader.DistributedLoader`, exactly as training builds it (same span arithmetic over
`--world` ranks, the same producer threads), is drained as fast as it goes: every step waits for the next
batch, moves it to the training device and — on CUDA — expands the compact teacher codes there (what
`Batch.to` does in training), so the rows counted are targets ready for the loss. Nothing else runs, so the
figure is the loader's ceiling; training needs it to exceed the pace `--rows-per-step` rows every `--step-ms`
(the challenge baseline: 13,780 steps in 600 s, 524,288 tokens per step = 65,536 per rank on 8 ranks).

Reported (JSON keys): rows_per_s_per_rank, needed_rows_per_s, headroom (their ratio), ms_per_step,
bytes_per_row (bytes that cross to the device per row: teacher ids + probability codes + x/y tokens),
target_bytes_per_row (the teacher part alone), cache_bytes_per_row (on disk), and the settings.
"""

from __future__ import annotations

import argparse
import sys
import time

from distill.bench import print_result
from distill.errors import DistillError

RECORD_STEP_MS = 600_000 / 13_780  # the challenge baseline's pace: 13,780 steps in 600 s on 8xH100


def measure_loader(cache: str, shards: str, rows_per_step: int = 65536, world: int = 8, rank: int = 0,
                   workers: int = 2, steps: int = 40, warmup: int = 4, device: str = "auto",
                   seq_len: int = 1024, step_ms: float = RECORD_STEP_MS, tokenizer: str | None = None,
                   prefetch: int = 4, progress: bool = True) -> dict:
    import torch

    from distill.cache import CacheReader
    from student.loader import DistributedLoader

    if rows_per_step % seq_len:
        raise DistillError(f"--rows-per-step {rows_per_step}: not a multiple of --seq-len {seq_len}")
    if not 0 <= rank < world:
        raise DistillError(f"--rank {rank}: must lie in [0, --world {world})")
    if steps < 1 or warmup < 0 or workers < 1:
        raise DistillError("--steps and --workers must be >= 1, --warmup >= 0")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda: no CUDA device here")
    reader = CacheReader(cache)
    cuda = dev.type == "cuda"
    loader = DistributedLoader(shards, seq_len, rows_per_step, rank=rank, world_size=world, cache_dir=cache,
                               tokenizer_path=tokenizer, prefetch=prefetch, pin_memory=cuda, device=dev,
                               workers=workers)
    from tqdm import tqdm

    moved = target_moved = 0
    try:
        bar = tqdm(total=warmup + steps, desc="loader", unit="step", file=sys.stderr, disable=not progress,
                   leave=False)
        t0 = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            b = loader.next_batch()
            if i >= warmup:
                tb = b.packed.nbytes() if b.packed is not None else 0
                moved += (b.x.numel() * b.x.element_size() + b.y.numel() * b.y.element_size()
                          + (tb if cuda else 0))
                target_moved += tb
            b = b.to(dev)
            if b.kd is None:
                raise DistillError(f"{cache}: the loader produced no teacher targets")
            if cuda:
                torch.cuda.synchronize()
            bar.update()
        secs = time.perf_counter() - t0
        bar.close()
    finally:
        loader.close()
    rows = steps * rows_per_step
    rate = rows / secs
    needed = rows_per_step / (step_ms / 1000.0)
    k = reader.k
    # on CPU nothing crosses a bus: report what the compact form moves on CUDA (uint16 ids + codes, int64 x/y)
    compact = k * (2 + (1 if reader.format_version >= 2 else 2))
    return {
        "rows_per_s_per_rank": rate, "needed_rows_per_s": needed, "headroom": rate / needed,
        "ms_per_step": secs / steps * 1000.0, "step_ms_needed": step_ms,
        "bytes_per_row": (moved / rows) if cuda else 16.0 + compact,
        "target_bytes_per_row": (target_moved / rows) if cuda else float(compact),
        "cache_bytes_per_row": reader.manifest.get("stats", {}).get("bytes_per_token"),
        "k": k, "format_version": reader.format_version, "rows_per_step": rows_per_step, "world": world,
        "rank": rank, "workers": workers, "steps": steps, "warmup": warmup, "device": str(dev),
        "seq_len": seq_len, "torch_threads": torch.get_num_threads(),
    }


def _handler(args: argparse.Namespace) -> int:
    res = measure_loader(args.cache, args.shards, args.rows_per_step, args.world, args.rank, args.workers,
                         args.steps, args.warmup, args.device, args.seq_len, args.step_ms, args.tokenizer,
                         progress=not args.json)
    line = (f"loader: {res['rows_per_s_per_rank'] / 1e6:.2f} M rows/s per rank ({res['ms_per_step']:.1f} ms per "
            f"{res['rows_per_step']}-row step) vs {res['needed_rows_per_s'] / 1e6:.2f} M needed at "
            f"{res['step_ms_needed']:.1f} ms/step: {res['headroom']:.2f}x; {res['bytes_per_row']:.0f} B/row to the "
            f"device ({res['device']}, {res['workers']} loader threads)")
    return print_result(line, res, args.json)


def add_subparser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("loader", help="KD loader throughput per rank vs the record pace",
                                    description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="teacher cache directory")
    p.add_argument("--shards", required=True, help="glob of the token shards the cache was built for")
    p.add_argument("--tokenizer", default=None, help="student tokenizer (checked against the cache if given)")
    p.add_argument("--rows-per-step", type=int, default=65536, help="rows (tokens) per rank per step (default 65536)")
    p.add_argument("--world", type=int, default=8, help="ranks the data is split over (default 8)")
    p.add_argument("--rank", type=int, default=0, help="the rank measured (default 0)")
    p.add_argument("--workers", type=int, default=2, help="loader producer threads (default 2, as on CUDA)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--steps", type=int, default=40, help="measured steps (default 40)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured first steps (default 4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where targets must be ready (default: cuda if present)")
    p.add_argument("--step-ms", type=float, default=RECORD_STEP_MS,
                   help=f"the pace to keep, ms per step (default {RECORD_STEP_MS:.2f}: the record pace)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (last on stdout)")
    p.set_defaults(func=_handler)
