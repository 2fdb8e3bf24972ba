"""The record recipe end to end on CPU (issue 12, acceptance 4): CaseOps shards of the FineWeb sample with
original-byte sidecars -> `python -m student.train --config configs/record_sp8192.toml` shrunk to a tiny model
(every record option still on: recurrence switched on mid-run, per-document attention, BOS packing, Polar-Express
Muon with weight decay, EMA, LR floor) -> `distill pack` -> `distill score` counting ORIGINAL bytes.

Run: python -m pytest -q tests/test_record_e2e.py      (~1-2 min on 2 CPU cores; needs ../shared/data)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.shards import HEADER_BYTES, read_shard, resolve_shards

REPO = Path(__file__).resolve().parents[1]
RECORD_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
TINY = ["--model.num_layers", "4", "--model.model_dim", "64", "--model.num_heads", "2", "--model.num_kv_heads", "1",
        "--model.loop_start", "1", "--model.loop_end", "2", "--model.parallel_start_layer", "3",
        "--model.xsa_last_n", "4", "--model.doc_max_len", "128",
        "--train.batch_tokens", "1024", "--train.seq_len", "256", "--train.max_steps", "6",
        "--train.max_wallclock_s", "0", "--train.compile_warmup_steps", "0", "--train.loop_enable_frac", "0.5",
        "--train.log_every", "1", "--optim.muon_momentum_warmup_steps", "3", "--eval.val_max_windows", "4",
        "--eval.val_batch_size", "4", "--train.seed", "0"]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def caseops(tmp_path_factory, shared_data, sample200_path):
    tok = shared_data / "tokenizers" / RECORD_TOKENIZER
    if not tok.exists():
        pytest.skip(f"{tok} not available")
    out = tmp_path_factory.mktemp("record_caseops")
    _run("-m", "distill.cli", "data", "build", "--caseops", "--docs", str(sample200_path), "--tokenizer", str(tok),
         "--out", str(out), "--val-docs", "8", "--max-docs", "40", "--workers", "1", "--no-curate")
    return out, tok


def test_record_recipe_trains_packs_and_scores_on_caseops(caseops, tmp_path, sample200_path):
    data, tok = caseops
    run = tmp_path / "run"
    _run("-m", "student.train", "--config", "configs/record_sp8192.toml", *TINY, "--out", str(run),
         "--data.train_shards", str(data / "fineweb_train_*.bin"), "--data.val_shards",
         str(data / "fineweb_val_*.bin"), "--data.tokenizer", str(tok))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "step_ms" in r]
    assert len(steps) == 6 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)
    # depth recurrence: off for the first half of training, on from loop_enable_frac on
    assert [bool(r.get("looping")) for r in steps] == [False, False, False, True, True, True]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["loop_count"] == 3 and cfg["data"]["packing"] == "bos" and cfg["optim"]["muon_wd"] == 0.095

    golf = tmp_path / "student.golf"
    packed = json.loads(_run("-m", "distill.cli", "pack", str(run), "--out", str(golf), "--bits", "8",
                             "--json").strip().splitlines()[-1])
    assert packed["artifact_bytes"] == packed["code_bytes"] + packed["model_bytes"] == \
        packed["code_bytes"] + golf.stat().st_size
    val_glob = str(data / "fineweb_val_*.bin")
    scores = {}
    for name, model in (("float", run), ("artifact", golf)):
        scores[name] = json.loads(_run("-m", "distill.cli", "score", str(model), "--tokenizer", str(tok), "--val",
                                       val_glob, "--seq-len", "256", "--json").strip().splitlines()[-1])
    # bytes: the ORIGINAL text's UTF-8 bytes. The sidecars (read here with numpy) hold exactly the val documents'
    # bytes, counted independently from the raw JSONL; the score counts the sidecar entries of its scored targets
    val_docs = [json.loads(ln)["text"] for ln in sample200_path.read_text(encoding="utf-8").splitlines()][:8]
    shards = resolve_shards(val_glob)
    side = np.concatenate([np.fromfile(p.parent / p.name.replace("fineweb_val_", "fineweb_val_bytes_"),
                                       dtype="<u2", offset=HEADER_BYTES) for p in shards]).astype(np.int64)
    stream = np.concatenate([np.asarray(read_shard(p)) for p in shards])
    assert len(side) == len(stream) and side.sum() == sum(len(d.encode("utf-8")) for d in val_docs)
    for s in scores.values():
        n = s["tokens"]
        assert s["bytes_source"] == "sidecar" and s["bytes"] == side[1 : 1 + n].sum()
        assert 0.5 < s["val_bpb"] < 20
    assert abs(scores["artifact"]["val_bpb"] - scores["float"]["val_bpb"]) < 0.05  # int8 round trip


def test_kd_into_the_record_student_with_bos_packing(caseops, tmp_path):
    """Distillation into the record recipe: a same-tokenizer teacher (a record-shaped run of our own) scores the
    CaseOps train shards, and the record student trains on CE + KD with BOS packing: every step has a KD term
    and the loss is the α-mix of its CE and KL."""
    data, tok = caseops
    common = [*TINY, "--data.train_shards", str(data / "fineweb_train_*.bin"), "--data.val_shards", "",
              "--data.tokenizer", str(tok)]
    teacher = tmp_path / "teacher"
    _run("-m", "student.train", "--config", "configs/record_sp8192.toml", *common, "--out", str(teacher))
    cache = tmp_path / "cache"
    _run("-m", "distill.cli", "teacher", "precompute", "--teacher", str(teacher), "--tokenizer", str(tok),
         "--shards", str(data / "fineweb_train_*.bin"), "--k", "8", "--out", str(cache), "--no-progress",
         "--format-version", "1")  # a 6-step teacher is near-uniform over 8,192 ids: format 2 would keep no entry
    run = tmp_path / "kd"
    _run("-m", "student.train", "--config", "configs/record_sp8192.toml", *common, "--out", str(run),
         "--teacher-cache", str(cache), "--kd.alpha", "0.5")
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"step_ms"' in ln]
    assert len(steps) == 6
    for r in steps:
        assert 0 < r["kd"] and abs(r["loss"] - (0.5 * r["ce"] + 0.5 * r["kd"])) < 0.02 * r["loss"]
