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
        print(f"[{name}] $ {' '.join(_short(c) for c in cmd)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=full_env)
        log.write(proc.stdout)
    dt = time.time() - t0
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise DistillError(f"stage '{name}' failed (exit {proc.returncode}, log {log_path}): "
                           + " | ".join(tail)[-600:])
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


def _short(s: str) -> str:
    return s if len(s) < 90 else s[:40] + "…" + s[-40:]
