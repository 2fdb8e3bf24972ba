"""Run pipeline stages as subprocesses of the real CLI (what a user would type), for the demo and the
benchmarks: each stage reads the previous stage's files, a failure names the stage and shows its last
lines, and the JSON a `--json` command prints last is parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.errors import DistillError


def distill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", *args]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "student.train", *args]


def run_stage(name: str, cmd: list[str], log_path: Path, json_last: bool = False,
              env: dict | None = None, echo: bool = True) -> dict | None:
    """Run `cmd`, tee its output to `log_path`; raise DistillError naming the stage on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if echo:
        _echo(name, cmd)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=full_env)
        log.write(proc.stdout)
    dt = time.time() - t0
    if proc.returncode != 0:
        raise _failed(name, proc.returncode, log_path)
    if echo:
        print(f"[{name}] done in {dt:.1f}s", file=sys.stderr, flush=True)
    if json_last:
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
        if not lines:
            raise DistillError(f"stage '{name}' printed no JSON (log {log_path})")
        out = json.loads(lines[-1])
        out["_seconds"] = dt
        return out
    return {"_seconds": dt}


def run_side_by_side(stages: list[tuple[str, list[str], Path]], cpus: list[list[int]]) -> None:
    """Run `stages` (name, cmd, log) at the same time, stage i pinned to the cores `cpus[i]` with as many
    compute threads, so concurrent runs share the machine (and any outside load on it) evenly — the fair way
    to compare two trainings at equal wall-clock on a shared box. Waits for all; a failure names its stage
    (the others are stopped)."""
    procs = []
    t0 = time.time()
    try:
        for (name, cmd, log_path), cores in zip(stages, cpus):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            n = str(len(cores))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
            _echo(name, cmd, f" (cores {','.join(map(str, cores))})")
            pin = (lambda c=tuple(cores): os.sched_setaffinity(0, c)) if hasattr(os, "sched_setaffinity") else None
            with open(log_path, "w") as log:  # the child keeps its own handle
                procs.append((name, log_path, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                               env=env, preexec_fn=pin)))
        for name, log_path, proc in procs:
            if proc.wait() != 0:
                raise _failed(name, proc.returncode, log_path)
            print(f"[{name}] done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def split_cores(parts: int = 2) -> list[list[int]] | None:
    """This process's usable cores cut into `parts` equal groups (None when there are too few)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = len(cores) // parts
    return [cores[i * per:(i + 1) * per] for i in range(parts)] if per >= 1 else None


def _echo(name: str, cmd: list[str], where: str = "") -> None:
    print(f"[{name}]{where} $ {' '.join(_short(c) for c in cmd)}", file=sys.stderr, flush=True)


def _failed(name: str, rc: int, log_path: Path) -> DistillError:
    tail = log_path.read_text().strip().splitlines()[-5:]
    return DistillError(f"stage '{name}' failed (exit {rc}, log {log_path}): " + " | ".join(tail)[-600:])


def _short(s: str) -> str:
    return s if len(s) < 90 else s[:40] + "…" + s[-40:]
