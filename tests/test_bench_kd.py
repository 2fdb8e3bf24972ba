"""`distill bench kd`: an existing teacher cache is reused only when it holds what the run asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill.bench_kd import _check_cache
from distill.errors import DistillError
from teachers.projection import PROJECTION_VERSION


def _cache(tmp_path, name, teacher_k, k, kind="topk-chain", version=PROJECTION_VERSION):
    d = tmp_path / name
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "distill-cache", "format_version": 2, "k": k,
                                                 "teacher_k": teacher_k,
                                                 "projection": {"version": version, "kind": kind}}))
    return d


def test_matching_cache_is_reused(tmp_path):
    _check_cache(_cache(tmp_path, "a", 128, 16), 128, 16)
    _check_cache(_cache(tmp_path, "b", 16, 16), 16, 16)
    # an in-house teacher (same vocabulary, no projection) is not held to the projection version
    _check_cache(_cache(tmp_path, "c", 8, 4, kind="identity", version=0), 8, 4)


@pytest.mark.parametrize("teacher_k,k,want", [(16, 16, (128, 16)), (128, 128, (128, 16)), (128, 16, (16, 16)),
                                              (128, 32, (128, 16))])
def test_cache_of_another_top_k_is_refused_naming_it(tmp_path, teacher_k, k, want):
    d = _cache(tmp_path, "c", teacher_k, k)
    with pytest.raises(DistillError) as e:
        _check_cache(d, *want)
    msg = str(e.value)
    assert str(d) in msg and f"teacher top-k {teacher_k} with {k} stored ids" in msg
    assert f"--k {want[0]} --k-student {want[1]}" in msg and "\n" not in msg


def test_cache_of_an_older_projection_is_refused(tmp_path):
    d = _cache(tmp_path, "old", 16, 16, version=PROJECTION_VERSION - 1)
    with pytest.raises(DistillError, match=f"projection v{PROJECTION_VERSION - 1}, this version writes "
                                           f"v{PROJECTION_VERSION}"):
        _check_cache(d, 16, 16)


def test_manifest_without_teacher_k_reads_k(tmp_path):
    d = tmp_path / "pre"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"k": 16, "projection": {"version": PROJECTION_VERSION,
                                                                          "kind": "topk-chain"}}))
    _check_cache(d, 16, 16)
    with pytest.raises(DistillError):
        _check_cache(d, 128, 16)


def test_k_student_above_k_is_a_one_line_error_before_any_stage(tmp_path):
    w = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "kd", "--teacher", "x", "--train-docs",
                           str(tmp_path / "t.jsonl"), "--val-docs", str(tmp_path / "v.jsonl"), "--k", "16",
                           "--k-student", "32", "--workdir", str(w)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--k-student 32" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not w.exists()
