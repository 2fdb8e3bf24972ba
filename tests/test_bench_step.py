"""`distill bench step`: the baseline and record configs (shrunk) step on synthetic shards at the same tokens per
step; the record config is measured with its depth-recurrence loop off and on.

Run: python -m pytest -q tests/test_bench_step.py      (~20 s)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from student.config import load_config
from student.model import GPT

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model.num_layers", "4", "--model.model_dim", "64", "--model.num_heads", "2", "--model.num_kv_heads", "1",
        "--model.loop_start", "1", "--model.loop_end", "2", "--model.parallel_start_layer", "3",
        "--model.xsa_last_n", "4", "--model.doc_max_len", "128"]


def test_bench_step_compares_configs_at_equal_tokens():
    cfgs = ["configs/baseline_sp1024.toml", "configs/record_sp8192.toml"]
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "step", "--config", cfgs[0], "--config",
                           cfgs[1], "--batch-tokens", "512", "--seq-len", "256", "--steps", "2", "--warmup", "1",
                           "--json", *TINY], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [e["label"] for e in r["entries"]] == ["baseline_sp1024", "record_sp8192 (loop off)",
                                                  "record_sp8192 (loop on)"]
    for e, cfg in zip(r["entries"], [cfgs[0], cfgs[1], cfgs[1]]):
        assert e["params"] == GPT(load_config(REPO / cfg, TINY).model).num_params()
        assert len(e["step_ms"]) == 3 and e["step_ms_median"] > 0
        assert abs(e["tokens_per_s"] - 512 / e["step_ms_median"] * 1000) < 1e-6 * e["tokens_per_s"]
    assert r["entries"][0]["ratio_to_first"] == 1.0 and r["batch_tokens"] == 512 and r["seq_len"] == 256
