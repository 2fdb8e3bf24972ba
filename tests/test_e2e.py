"""End to end on real text: the demo pipeline (tokenizer → shards → in-house teacher → teacher cache → CE
and KD students → pack → score of the roundtripped artifact), shortened to 3 training steps per model.

Run: pytest -q tests/test_e2e.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "demo", "--workdir", str(wd), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd, proc


def test_demo_summary(demo):
    wd, proc = demo
    s = json.loads((wd / "summary.json").read_text())
    for key in ("artifact_path", "artifact_bytes", "checkpoint", "student_config", "tokenizer", "train_shards",
                "val_shards", "seq_len", "val_bpb", "val_loss", "teacher_checkpoint", "teacher_cache"):
        assert key in s, key
    assert s["model_bytes"] == os.path.getsize(s["artifact_path"])
    assert s["artifact_bytes"] == s["code_bytes"] + s["model_bytes"] and s["code_bytes"] > 10_000
    assert s["artifact_bytes"] <= 16_000_000
    # 3 steps of training: better than nothing (uniform over 1024 ids ≈ 10 bits/token ≈ 4+ bpb), finite
    assert 0.5 < s["val_bpb"] < 8.0 and np.isfinite(s["val_loss"])
    assert "final val_bpb" in proc.stdout


def test_demo_score_matches_independent_metric(demo):
    """`distill score` of the artifact == a plain float64 loop over the same windows via load_artifact."""
    import torch

    from distill.artifact import load_artifact
    from distill.shards import load_tokens
    from distill.tokenizer import load_tokenizer

    wd, _ = demo
    s = json.loads((wd / "summary.json").read_text())
    model = load_artifact(s["artifact_path"])
    sp = load_tokenizer(s["tokenizer"])
    toks = np.asarray(load_tokens(s["val_shards"])).astype(np.int64)
    L = s["seq_len"]
    n = ((len(toks) - 1) // L) * L + 1
    nll, nbytes = 0.0, 0
    for w in range(0, n - 1, L):
        x = torch.from_numpy(toks[w : w + L])[None]
        y = toks[w + 1 : w + L + 1]
        with torch.no_grad():
            lp = torch.log_softmax(model(x)[0].double(), -1).numpy()
        for i in range(L):
            nll -= lp[i, y[i]]
            piece = sp.id_to_piece(int(y[i]))
            if sp.is_control(int(y[i])) or sp.is_unknown(int(y[i])):
                b = 0
            elif sp.is_byte(int(y[i])):
                b = 1
            else:
                b = len(piece[1:].encode()) if piece.startswith("\u2581") else len(piece.encode())
                prev = int(toks[w + i])
                if piece.startswith("\u2581") and not (sp.is_control(prev) or sp.is_unknown(prev)):
                    b += 1
            nbytes += b
    bpb = nll / (np.log(2) * nbytes)
    assert n - 1 == json.loads((wd / "summary.json").read_text())["val_tokens"]
    assert nbytes == s["val_bytes"]
    assert abs(bpb - s["val_bpb"]) / bpb < 1e-4


def test_bench_kd_end_to_end(demo, tmp_path):
    """`distill bench kd` on the demo's own text and in-house teacher: every stage runs, the JSON contract
    holds (means = the per-seed values, a plot on disk, the settings echoed), and a rerun reuses every stage."""
    wd, _ = demo
    s = json.loads((wd / "summary.json").read_text())
    lines = (wd / "docs.jsonl").read_text().splitlines()
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join(lines[10:]) + "\n")
    val.write_text("\n".join(lines[:10]) + "\n")
    cmd = [sys.executable, "-m", "distill.cli", "bench", "kd", "--teacher", s["teacher_checkpoint"],
           "--train-docs", str(train), "--val-docs", str(val), "--tokenizer", s["tokenizer"], "--k", "8",
           "--minutes", "0.1", "--seeds", "1", "--workdir", str(tmp_path / "w"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(r["ce_bpb"]) == len(r["kd_bpb"]) == 1
    assert r["ce_bpb_mean"] == r["ce_bpb"][0] and r["kd_bpb_mean"] == r["kd_bpb"][0]
    assert 0.5 < r["ce_bpb_mean"] < 8.0 and 0.5 < r["kd_bpb_mean"] < 8.0
    assert r["teacher_bpb"] is not None and r["teacher_bpb"] > 0
    assert r["settings"]["k"] == 8 and r["settings"]["kd_top_k"] == 8 and r["settings"]["k_student"] == 8
    # k and k_s name the cache (one workdir holds several); the run used the one it names
    assert Path(r["settings"]["teacher_cache"]).name == "cache_f2_k8"
    assert json.loads((Path(r["settings"]["teacher_cache"]) / "manifest.json").read_text())["k"] == 8
    assert r["settings"]["kd_schedule"] == "constant" and r["settings"]["kd_target_temperature"] == 1.0
    assert r["settings"]["layout"] in ("side-by-side", "sequential")
    assert r["cache_format"] == 2 and 0 < r["cache_bytes_per_token"] < 40
    assert isinstance(r["noisy_seeds"], list) and all(ms > 0 for ms in r["ce_step_ms"] + r["kd_step_ms"])
    assert len(list((tmp_path / "w" / "runs").glob("*/bench_score.json"))) == 2  # scores memoized per run
    assert os.path.getsize(r["plot"]) > 1000
    # wall-clock budgets report the passes their runs saw too
    n_train = sum(sh["tokens"] for sh in json.loads((tmp_path / "w" / "train" / "manifest.json").read_text())["shards"])
    assert r["ce_passes"] == [pytest.approx(r["ce_tokens"][0] / n_train)] and r["kd_passes"][0] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["kd_bpb"] == r["kd_bpb"]
    # --passes: a step budget from the training tokens, the same for CE and KD, recorded in the JSON
    cmd_p = cmd + ["--passes", "0.5", "--kd-select-frac", "0.5", "--minutes", "5"]
    proc = subprocess.run(cmd_p, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rp = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((tmp_path / "w" / "train" / "manifest.json").read_text())
    train_tokens = sum(sh["tokens"] for sh in manifest["shards"])
    steps = max(1, round(0.5 * train_tokens / 4096))  # configs/demo_student.toml: 4,096 tokens per step
    assert rp["ce_steps"] == rp["kd_steps"] == [steps]
    assert rp["ce_passes"] == rp["kd_passes"] == [pytest.approx(steps * 4096 / train_tokens)]
    assert rp["settings"]["passes"] == 0.5 and rp["settings"]["kd_select_frac"] == 0.5
    assert rp["capped_seeds"] == [] and rp["noisy_seeds"] == []  # step budgets: no wall-clock noise to flag
    # a cap that stops the runs before their P passes: flagged, never passed off as an equal-token comparison
    capped = subprocess.run(cmd + ["--passes", "50", "--minutes", "0.05"], capture_output=True, text=True,
                            timeout=600)
    assert capped.returncode == 0, capped.stderr[-3000:]
    rc = json.loads(capped.stdout.strip().splitlines()[-1])
    assert rc["capped_seeds"] == [0] and min(rc["ce_steps"] + rc["kd_steps"]) < round(50 * train_tokens / 4096)
    assert "not an equal-token comparison" in capped.stderr
    names = {p.name for p in (tmp_path / "w" / "runs").iterdir()}
    # budget and the student config's content in the run names: never mixed with 0.1-min runs or another config's
    tag = "_c" + hashlib.sha256(Path(rp["settings"]["config"]).read_bytes()).hexdigest()[:8]
    assert names & {f"ce_p0p5_m5{tag}_sbs_s0", f"ce_p0p5_m5{tag}_s0"}
    assert any(n.startswith("kd_") and "_sel0p5_p0p5_m5" in n for n in names)
